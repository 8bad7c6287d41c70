"""The GPU test set (issue 11): skipped without CUDA, run by one command on a machine with a GPU:

    LLAMA_DIST_GPU_TESTS=1 python -m pytest -q tests/gpu

(the variable stops tests/conftest.py from hiding CUDA, as it does for the CPU suite). Every case starts real ranks
(`run_local`) on the bundled checkpoints/tiny: world size 1 on NCCL with the default (compiled) decode step in bf16,
fp16 and fp32 (fp32 greedy tokens equal to the CPU's, computed in the same run), 2 and 4 ranks sharing one GPU over
gloo equal to 1 rank, chat, hidden states and attentions, the shared-GPU error on NCCL, and the compiled decode step
equal to eager, one host sync per engine step, and the CUDA int4 layout. `bash launch/run_on_gpu.sh` installs what
a GPU machine lacks, then runs this and the benchmarks. Tensor parallelism over NCCL needs a GPU per rank: on one GPU
only world size 1 runs on NCCL (more ranks share it over gloo).
"""

import os

import pytest
import torch
from gpu_workers import GEN_LEN, PROMPTS, generation_worker, start_worker, sync_worker

from llama_dist.dist.local_launch import run_local
from llama_dist.model.quant import Int4Weight, packs_int4


def _why_not_run() -> str | None:
    if os.environ.get("LLAMA_DIST_GPU_TESTS") != "1":
        return "GPU test: run with LLAMA_DIST_GPU_TESTS=1 (the CPU suite hides CUDA)"
    return None if torch.cuda.is_available() else "GPU test: no CUDA device"


pytestmark = pytest.mark.skipif(_why_not_run() is not None, reason=_why_not_run() or "")

FP32_CLOSE = 1e-4  # GPU vs CPU kernels, float32, relative to the largest magnitude of the reference


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def cpu_reference() -> dict:
    return run_local(generation_worker, 1, ["float32"], device="cpu", timeout_s=300)[0]


@pytest.fixture(scope="module")
def nccl_one_rank() -> dict:
    """What a user gets on one GPU: NCCL, the decode step compiled (the default on CUDA)."""
    return run_local(generation_worker, 1, ["float32", "bfloat16", "float16"], timeout_s=300)[0]


@pytest.fixture(scope="module")
def nccl_eager() -> dict:
    return run_local(generation_worker, 1, ["float32"], compile=False, timeout_s=300)[0]


def assert_inspection_close(got: dict, want: dict) -> None:
    assert rel_diff(got["logits"], want["logits"]) < FP32_CLOSE
    for key in ("hidden_states", "attentions"):
        assert len(got[key]) == len(want[key])
        for mine, theirs in zip(got[key], want[key]):
            assert rel_diff(mine, theirs) < FP32_CLOSE, key
    assert got["cache"].keys() == want["cache"].keys()
    for name, tensor in got["cache"].items():
        assert rel_diff(tensor, want["cache"][name]) < FP32_CLOSE, name


def test_one_rank_on_nccl_generates_like_the_cpu(nccl_one_rank, cpu_reference):
    assert nccl_one_rank["backend"] == "nccl+gloo" and nccl_one_rank["device"] == "cuda:0"
    assert nccl_one_rank["compiled"] and not cpu_reference["compiled"]
    assert cpu_reference["backend"] == "gloo" and cpu_reference["device"] == "cpu"
    assert nccl_one_rank["float32"]["tokens"] == cpu_reference["float32"]["tokens"]
    for got, want in zip(nccl_one_rank["float32"]["logprobs"], cpu_reference["float32"]["logprobs"]):
        assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precisions_on_nccl_continue_the_sequences(nccl_one_rank, dtype):
    result = nccl_one_rank[dtype]
    assert result["texts"][0].split()[:4] == ["five", "six", "seven", "eight"], result["texts"]
    assert result["texts"][1].split()[:4] == ["e", "f", "g", "h"], result["texts"]
    assert all(torch.isfinite(torch.tensor(lp)).all() for lp in result["logprobs"])
    # A half precision may part from float32 late in a sequence, not at its first tokens.
    for got, want in zip(result["tokens"], nccl_one_rank["float32"]["tokens"]):
        assert got[:4] == want[:4]


def test_chat_on_nccl_answers_like_the_cpu(nccl_one_rank, cpu_reference):
    assert all(answer["role"] == "assistant" and answer["content"] for answer in nccl_one_rank["chat"])
    assert nccl_one_rank["chat"] == cpu_reference["chat"]


def test_hidden_states_and_attentions_on_nccl_match_the_cpu(nccl_one_rank, cpu_reference):
    assert_inspection_close(nccl_one_rank["inspection"], cpu_reference["inspection"])


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_sharing_one_gpu_over_gloo_equal_one_rank(nccl_eager, ranks):
    # Eager: a CUDA graph cannot capture gloo's collectives.
    results = run_local(generation_worker, ranks, ["float32"], backend="gloo", device="cuda:0", compile=False,
                        timeout_s=300)
    for result in results:  # every rank returns the same
        assert result["backend"] == "gloo" and result["device"] == "cuda:0"
        assert result["float32"]["tokens"] == nccl_eager["float32"]["tokens"]
        assert result["chat"] == nccl_eager["chat"]
        assert_inspection_close(result["inspection"], nccl_eager["inspection"])


def test_two_nccl_ranks_on_one_gpu_are_refused_by_name():
    messages = run_local(start_worker, 2, env={"CUDA_VISIBLE_DEVICES": "0"}, timeout_s=120)
    for message in messages:
        assert message.startswith("ranks 0, 1 would share cuda:0 on "), message
        assert "2 ranks run there on 1 visible GPU(s)" in message and "--nproc_per_node 1" in message, message


def test_compiled_decode_equals_eager(nccl_one_rank, nccl_eager):
    assert nccl_one_rank["compiled"] and not nccl_eager["compiled"]
    compiled, eager = nccl_one_rank["float32"], nccl_eager["float32"]
    assert len(compiled["tokens"]) == len(PROMPTS)
    assert compiled["tokens"] == eager["tokens"]
    for got, want in zip(compiled["logprobs"], eager["logprobs"]):
        assert got == pytest.approx(want, abs=1e-4)


def test_an_engine_step_syncs_the_host_once():
    """Rank 0 reads its sampled tokens back once a step; nothing else waits on the GPU (a step's inputs go over in
    pinned, non-blocking copies; the compiled decode step replays a CUDA graph)."""
    steps = run_local(sync_worker, 1, timeout_s=300)[0]
    assert len(steps) == GEN_LEN and steps[0][0] and not any(prefilled for prefilled, _, _ in steps[1:])
    for prefilled, synced, blocking in steps:
        assert synced <= 1 and blocking <= 1, steps


@pytest.mark.parametrize("out_features, in_features, group_size", [(256, 2048, 128), (72, 352, 32), (64, 160, 64)])
def test_cuda_int4_layout_holds_the_values_and_multiplies_like_the_dequantized_weight(out_features, in_features,
                                                                                       group_size):
    """The CUDA tensor-core layout (`_convert_weight_to_int4pack`, two values a byte, the even column high): the
    values it holds come back unchanged, half a byte each, and its kernel computes the dequantized product."""
    device = torch.device("cuda")
    assert packs_int4(device, out_features, torch.bfloat16) and not packs_int4(device, out_features, torch.float16)
    weight = torch.randn(out_features, in_features, generator=torch.Generator(device).manual_seed(0), device=device)
    packed = Int4Weight.quantize(weight, group_size, torch.bfloat16, packed=True)
    plain = Int4Weight.quantize(weight, group_size, torch.bfloat16, packed=False)
    padded = plain.values.shape[1]
    assert packed.values.is_cuda and packed.values.dim() == 4 and packed.values.nbytes * 2 == out_features * padded
    assert torch.equal(packed.unpacked_values(), plain.values)
    for rows in (1, 7, 40):
        x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
        assert rel_diff(packed.mm_int4pack(x), plain.mm_dequantized(x)) < 1e-2
