"""The decode step (llama_dist.engine.decode_step): compiled equals eager, is traced once per (batch, context) bucket,
and decodes rows at their own positions, at 1 and 2 gloo ranks (the compiled step's collectives are functional ones
inside the graph); how the runner chooses eager, compiled or CUDA graphs."""

import shutil

import pytest
import torch
from helpers import SPM_VOCAB, rel_diff, tiny_args, write_checkpoint

from llama_dist.dist.local_launch import run_local
from llama_dist.engine.decode_step import (
    RECOMPILE_SLACK,
    DecodeStep,
    StepMode,
    bucket_for,
    default_buckets,
    default_context_buckets,
    step_mode,
)
from llama_dist.llm import Llama

MAX_SEQ_LEN, MAX_BATCH = 48, 3
BLOCKS = 3  # a row's blocks: MAX_SEQ_LEN over the engine's default block size, 16
ARGS = tiny_args(vocab_size=SPM_VOCAB, n_kv_heads=2)
RAGGED = [[1, 17, 42, 99, 7, 250], [1, 5], [1, 300, 301, 302]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_model_path) -> str:
    out = tmp_path_factory.mktemp("engine") / "ckpt"
    write_checkpoint(out, ARGS, seed=5)
    shutil.copy(spm_model_path, out / "tokenizer.model")
    return str(out)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def engine_worker(ckpt: str) -> dict:
    torch._dynamo.reset()
    llm = Llama.build(ckpt, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH, dtype="float32", compile=False)
    runner = llm.engine.runner  # it owns the eager/compiled choice of decode-only steps
    eager_step, compiled_step = runner.decode_step, DecodeStep(llm.model, StepMode.COMPILED, buckets=(MAX_BATCH,))
    out = {"default_mode": runner.decode_step.mode}

    # Greedy generation, eager then compiled: ragged prompts, then batches of 1 and 2 rows, 40 decode steps.
    def generations():
        return [llm.generate(RAGGED, 40, temperature=0)[0], llm.generate(RAGGED[:1], 10, temperature=0)[0],
                llm.generate(RAGGED[1:], 12, temperature=0, logprobs=True)]

    out["eager"] = generations()
    runner.decode_step, runner.compiled = compiled_step, True
    graphs_before = _unique_graphs()
    out["compiled"] = generations()
    out["graphs"] = _unique_graphs() - graphs_before
    out["compile_s"] = compiled_step.compile_s

    # Buckets: 1 row runs the 1-row step, 2 rows the 3-row step padded; one trace per bucket.
    runner.decode_step = DecodeStep(llm.model, StepMode.COMPILED, buckets=(1, MAX_BATCH))
    graphs_before = _unique_graphs()
    out["bucketed"] = [llm.generate(RAGGED[:1], 10, temperature=0)[0], llm.generate(RAGGED[1:], 12, temperature=0)[0]]
    out["bucket_graphs"] = _unique_graphs() - graphs_before
    out["bucket_compiles"] = sorted(runner.decode_step.compile_s)

    # One step of rows at different positions (the server's case): the same logits eager and compiled.
    with torch.inference_mode():
        tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11]] * MAX_BATCH)
        llm.model(tokens, 0)  # fill the cache of every slot up to position 6
        step_tokens, positions = torch.tensor([3, 4, 5]), torch.tensor([2, 6, 4])
        out["step_eager"] = eager_step(step_tokens, positions, length=7)
        out["step_compiled"] = compiled_step(step_tokens, positions)
        # What the eager step means, written out: row i's forward over its own prefix with the new token last.
        prefix = [torch.cat((tokens[i, : positions[i]], step_tokens[i : i + 1])) for i in range(MAX_BATCH)]
        out["step_reference"] = [llm.model(p[None], 0, last_only=True).logits[0, -1] for p in prefix]
    out["graphs_after_step"] = _unique_graphs() - graphs_before

    # Context buckets of 1, 2 and 3 blocks: the 40-token generation crosses from one to the next (rows of 6 to 46
    # positions); each step reads the bucket holding its longest row, and equals eager.
    runner.decode_step = DecodeStep(llm.model, StepMode.COMPILED, buckets=(1, MAX_BATCH), context_buckets=(1, 2, 3))
    out["recompile_limit"] = torch._dynamo.config.recompile_limit
    out["context_bucketed"] = [llm.generate(RAGGED, 40, temperature=0)[0],
                               llm.generate(RAGGED[1:], 12, temperature=0, logprobs=True)]
    out["context_compiles"] = sorted(runner.decode_step.compile_s)

    # A server warms every (batch, context) bucket before it listens: no trace is left for its requests.
    runner.decode_step = DecodeStep(llm.model, StepMode.COMPILED, buckets=(1, MAX_BATCH), context_buckets=(2, 3))
    out["warmed"] = llm.engine.warm_up()
    out["warm_compiles"] = sorted(runner.decode_step.compile_s)
    graphs_warm = _unique_graphs()
    out["after_warm"] = [llm.generate(RAGGED[:1], 10, temperature=0)[0], llm.generate(RAGGED[1:], 12, temperature=0)[0],
                         llm.generate(RAGGED, 40, temperature=0)[0]]
    out["graphs_after_warm"] = _unique_graphs() - graphs_warm
    return out


@pytest.fixture(scope="module")
def results(ckpt):
    return {n: run_local(engine_worker, n, ckpt, timeout_s=600) for n in (1, 2)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_compiled_greedy_generation_equals_eager(results, world_size):
    for rank_out in results[world_size]:
        assert rank_out["compiled"][:2] == rank_out["eager"][:2]
        (tokens_e, logprobs_e), (tokens_c, logprobs_c) = rank_out["eager"][2], rank_out["compiled"][2]
        assert tokens_c == tokens_e
        for a, b in zip(logprobs_c, logprobs_e):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world_size", [1, 2])
def test_compiled_step_is_traced_once_across_steps_and_ragged_batches(results, world_size):
    for rank_out in results[world_size]:
        # 40 + 10 + 12 decode steps at batch 3, 1 and 2, then rows at three different positions: one graph.
        assert rank_out["graphs"] == 1
        assert rank_out["graphs_after_step"] == 1
        assert list(rank_out["compile_s"]) == [(MAX_BATCH, BLOCKS)] and rank_out["compile_s"][MAX_BATCH, BLOCKS] > 0


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_smaller_batch_runs_the_smallest_bucket_that_holds_it(results, world_size):
    for rank_out in results[world_size]:
        assert rank_out["bucketed"] == [rank_out["eager"][1], rank_out["eager"][2][0]]
        # Both buckets ran; only the 1-row one was traced anew (the 3-row shape's trace above is reused).
        assert rank_out["bucket_compiles"] == [(1, BLOCKS), (MAX_BATCH, BLOCKS)] and rank_out["bucket_graphs"] == 1


@pytest.mark.parametrize("world_size", [1, 2])
def test_warm_up_compiles_every_bucket_before_the_first_request(results, world_size):
    for rank_out in results[world_size]:
        shapes = [(rows, blocks) for rows in (1, MAX_BATCH) for blocks in (2, 3)]
        assert rank_out["warmed"] == shapes and rank_out["warm_compiles"] == sorted(shapes)
        assert rank_out["graphs_after_warm"] == 0  # generation after the warm-up traces nothing
        assert rank_out["after_warm"] == [rank_out["eager"][1], rank_out["eager"][2][0], rank_out["eager"][0]]


def test_default_buckets_are_powers_of_two_and_the_maximum():
    assert default_buckets(1) == (1,) and default_buckets(3) == (1, 2, 3) and default_buckets(8) == (1, 2, 4, 8)
    assert default_buckets(20) == (1, 2, 4, 8, 16, 20)


@pytest.mark.parametrize("world_size", [1, 2])
def test_rows_at_their_own_positions_match_a_plain_forward(results, world_size):
    main = results[world_size][0]
    assert main["step_compiled"].shape == (MAX_BATCH, SPM_VOCAB)
    assert rel_diff(main["step_compiled"], main["step_eager"]) <= 1e-5
    for i, reference in enumerate(main["step_reference"]):
        assert rel_diff(main["step_eager"][i], reference) <= 1e-5
    if world_size > 1:  # eager, only rank 0 receives the logits it samples from
        assert results[world_size][1]["step_eager"] is None


@pytest.mark.parametrize("world_size", [1, 2])
def test_compiled_with_context_buckets_equals_eager(results, world_size):
    for rank_out in results[world_size]:
        tokens, (tokens_2, logprobs_2) = rank_out["context_bucketed"]
        assert tokens == rank_out["eager"][0]
        assert tokens_2 == rank_out["eager"][2][0]
        for a, b in zip(logprobs_2, rank_out["eager"][2][1]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
        # Rows of up to 6 + 39 positions at batch 3 ran every context bucket; the prompts of 2 and 4 tokens with 12
        # more (at most 15 positions: 1 block) only the first, at batch 3 (2 rows pad up to the 3-row bucket).
        assert rank_out["context_compiles"] == [(MAX_BATCH, 1), (MAX_BATCH, 2), (MAX_BATCH, 3)]
        # Dynamo's limit on traces of the step holds every shape (2 batch x 3 context buckets) and some slack.
        assert rank_out["recompile_limit"] >= 2 * 3 + RECOMPILE_SLACK


def test_context_buckets_are_powers_of_two_of_blocks_from_256_positions_and_a_whole_row():
    assert default_context_buckets(3, 16) == (3,)  # a row shorter than the smallest bucket: one shape
    assert default_context_buckets(512, 16) == (16, 32, 64, 128, 256, 512)  # 8192 positions in blocks of 16
    assert default_context_buckets(100, 16) == (16, 32, 64, 100)
    assert default_context_buckets(8, 64) == (4, 8) and default_context_buckets(1, 8192) == (1,)
    buckets = default_context_buckets(100, 16)
    assert [bucket_for(buckets, b) for b in (1, 16, 17, 64, 65, 100)] == [16, 16, 32, 64, 100, 100]


def test_the_runner_compiles_on_cuda_only_and_captures_graphs_only_around_nccl(results):
    assert results[1][0]["default_mode"] == results[2][1]["default_mode"] == StepMode.EAGER  # CPU: eager
    cases = {  # (device, backend of CUDA collectives, world size, compile flag) -> how decode steps run
        ("cpu", None, 1, None): StepMode.EAGER,
        ("cpu", "gloo", 2, True): StepMode.COMPILED,
        ("cuda", None, 1, None): StepMode.CUDA_GRAPHS,
        ("cuda", "nccl", 8, None): StepMode.CUDA_GRAPHS,
        ("cuda", "gloo", 1, None): StepMode.CUDA_GRAPHS,  # one rank: no collective to capture
        ("cuda", "gloo", 2, None): StepMode.COMPILED,  # ranks sharing a GPU: gloo's collectives run on the host
        ("cuda", "gloo", 2, True): StepMode.COMPILED,
        ("cuda", "nccl", 2, False): StepMode.EAGER,
    }
    for (device, backend, world, compile), mode in cases.items():
        assert step_mode(device, backend, world, compile) == mode, (device, backend, world, compile)
