"""Llama.build / generate / completions / streaming on real gloo ranks with a random model."""

import shutil

import pytest
import torch

from llama_dist.generation import Llama
from llama_dist.local_launch import run_local
from multirank import tiny_args, write_checkpoint

VOCAB = 400  # the size of the conftest SentencePiece model
PROMPTS = [[1, 17, 42, 99, 7, 250], [1, 5], [1, 300, 301, 302]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_model_path):
    path = tmp_path_factory.mktemp("gen_ckpt")
    write_checkpoint(path, tiny_args(vocab_size=VOCAB, n_kv_heads=2), num_shards=1, seed=11)
    shutil.copy(spm_model_path, path / "tokenizer.model")
    return str(path)


class _StopAt:
    """The real tokenizer with one more stop token."""

    def __init__(self, tokenizer, extra_stop):
        self._tok, self.stop_tokens = tokenizer, list(tokenizer.stop_tokens) + [extra_stop]

    def __getattr__(self, name):
        return getattr(self._tok, name)


def generation_worker(ckpt: str) -> dict:
    llm = Llama.build(ckpt, f"{ckpt}/tokenizer.model", max_seq_len=48, max_batch_size=3, dtype="float32")
    out = {}
    out["batch"], out["batch_logprobs"] = llm.generate(PROMPTS, 8, temperature=0, logprobs=True)
    out["alone"] = [llm.generate([p], 8, temperature=0)[0][0] for p in PROMPTS]
    out["echo"], out["echo_logprobs"] = llm.generate(PROMPTS[:1], 4, temperature=0, logprobs=True, echo=True)
    # The log-softmax of one plain forward over the echoed sequence, to compare logprobs with.
    seq = torch.tensor([out["echo"][0]])
    out["plain_logits"] = llm.model(seq, 0).logits[0]

    stop = out["alone"][0][2]  # stop at the third token greedy decoding produces for prompt 0
    llm.tokenizer = _StopAt(llm.tokenizer, stop)
    out["stopped"] = llm.generate(PROMPTS, 8, temperature=0)[0]
    llm.tokenizer = llm.tokenizer._tok

    out["stream"] = [(s.tokens, s.texts) for s in llm.generate_stream(PROMPTS, 6, temperature=0)]
    out["text"] = llm.text_completion(["one two three", "hello"], temperature=0, max_gen_len=5, logprobs=True)
    out["chat"] = llm.chat_completion([[{"role": "user", "content": "hello"}]], temperature=0, max_gen_len=5)
    out["long"] = llm.generate([[1] * 45], 10, temperature=0)[0][0]  # runs into max_seq_len=48
    return out


def sampled_worker(ckpt: str) -> list[list[int]]:
    # Each rank seeds differently: only rank 0's generator may decide the tokens.
    rank = int(__import__("os").environ["RANK"])
    llm = Llama.build(ckpt, f"{ckpt}/tokenizer.model", max_seq_len=48, max_batch_size=3, seed=100 + rank)
    torch.manual_seed(rank)
    return llm.generate(PROMPTS, 12, temperature=0.8, top_p=0.95)[0]


@pytest.fixture(scope="module")
def results(ckpt):
    return {n: run_local(generation_worker, n, ckpt, timeout_s=240) for n in (1, 2)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_rank_returns_the_same(results, world_size):
    ranks = results[world_size]
    for other in ranks[1:]:
        for key in ("batch", "batch_logprobs", "alone", "stopped", "stream", "text", "chat"):
            assert other[key] == ranks[0][key], key


@pytest.mark.parametrize("world_size", [1, 2])
def test_ragged_greedy_batch_equals_each_prompt_alone(results, world_size):
    out = results[world_size][0]
    assert out["batch"] == out["alone"]
    assert all(len(t) == 8 for t in out["batch"])  # no stop token in a random model's first 8
    assert results[world_size][0]["batch"] == results[1][0]["batch"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_logprobs_are_log_softmax_of_a_plain_forward(results, world_size):
    out = results[world_size][0]
    seq = out["echo"][0]
    expected = torch.log_softmax(out["plain_logits"], dim=-1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
    got = torch.tensor(out["echo_logprobs"][0][1:])
    assert torch.allclose(got, expected, atol=1e-4)
    assert out["echo_logprobs"][0][0] == 0.0  # nothing predicts the first token
    for tokens, logprobs in zip(out["batch"], out["batch_logprobs"]):
        assert len(tokens) == len(logprobs)


def test_echo_returns_prompt_then_generation(results):
    out = results[1][0]
    assert out["echo"][0] == PROMPTS[0] + out["alone"][0][:4]


@pytest.mark.parametrize("world_size", [1, 2])
def test_stop_token_ends_only_its_sequence(results, world_size):
    out = results[world_size][0]
    assert out["stopped"][0] == out["alone"][0][:2]  # stop token excluded
    for got, full in zip(out["stopped"][1:], out["alone"][1:]):
        assert full[: len(got)] == got


def test_stream_yields_the_generated_tokens_and_text(results):
    out = results[2][0]
    streamed = [[t for tokens, _ in out["stream"] if (t := tokens[i]) is not None] for i in range(len(PROMPTS))]
    assert streamed == [a[:6] for a in out["alone"]]


def test_text_and_chat_completion_shapes(results):
    out = results[2][0]
    assert len(out["text"]) == 2
    for item in out["text"]:
        assert isinstance(item["generation"], str)
        assert len(item["tokens"]) == len(item["logprobs"]) <= 5
    assert out["chat"][0]["generation"]["role"] == "assistant"
    assert isinstance(out["chat"][0]["generation"]["content"], str)


def test_generation_is_cut_at_max_seq_len(results):
    assert len(results[1][0]["long"]) == 48 - 45


def test_sampled_output_identical_on_all_ranks_despite_different_seeds(ckpt):
    per_rank = run_local(sampled_worker, 2, ckpt, timeout_s=120)
    assert per_rank[0] == per_rank[1]
    assert any(len(t) > 0 for t in per_rank[0])
