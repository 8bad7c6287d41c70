"""The bundled toy checkpoint (checkpoints/tiny) really generates: greedy counting and alphabet, 1 and 2 ranks."""

from pathlib import Path

import pytest

from llama_dist.dist.local_launch import run_local

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
PROMPTS = ["one two three four", "a b c d", "monday tuesday", "the cat sat on"]


def tiny_worker(ckpt: str) -> list[dict]:
    from llama_dist.llm import Llama

    llm = Llama.build(ckpt, f"{ckpt}/tokenizer.model", max_seq_len=128, max_batch_size=4, dtype="float32")
    # logprobs=True only to get the tokens back; the log probabilities themselves may differ in the last
    # bits across world sizes, the chosen tokens may not.
    out = llm.text_completion(PROMPTS, temperature=0, max_gen_len=16, logprobs=True)
    return [{"generation": r["generation"], "tokens": r["tokens"]} for r in out]


@pytest.fixture(scope="module")
def results():
    # The bundled model is part of the product: a missing file is a failure, not a skip.
    missing = [f for f in ("params.json", "consolidated.00.pth", "tokenizer.model") if not (TINY / f).is_file()]
    assert not missing, f"{TINY} lacks {missing}: run python checkpoints/make_tiny.py"
    return {n: run_local(tiny_worker, n, str(TINY), timeout_s=120) for n in (1, 2)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_tiny_model_counts_and_recites_the_alphabet(results, world_size):
    counting, alphabet = results[world_size][0][:2]
    assert counting["generation"].strip().startswith("five six seven"), counting["generation"]
    assert alphabet["generation"].strip().startswith("e f g"), alphabet["generation"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_tiny_model_same_output_on_every_rank(results, world_size):
    ranks = results[world_size]
    assert len(ranks) == world_size
    for other in ranks[1:]:
        assert other == ranks[0]


def test_tiny_model_same_output_for_every_world_size(results):
    assert results[2][0] == results[1][0]
