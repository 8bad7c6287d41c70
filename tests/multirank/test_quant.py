"""Weight-only int8 / int4 quantization (llama_dist/quant.py) under tensor parallelism.

Each world size is one run_local launch covering every case. The reference quantizes the FULL weights here, in
plain torch (written apart from quant.py, from the scheme's definition), and runs the unsharded float64 reference
Llama on the dequantized weights: with the same scales, ranks and kernels may differ from it by summation order
only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import raises_naming, reference_logits, rel_diff, tiny_args, write_checkpoint

from llama_dist import cli
from llama_dist.checkpoint.convert import write_quantized
from llama_dist.checkpoint.loader import load_model
from llama_dist.checkpoint.memory import memory_needed
from llama_dist.dist.groups import init_distributed, shutdown_distributed
from llama_dist.dist.local_launch import run_local
from llama_dist.errors import ConfigError
from llama_dist.model.quant import Int4Weight, Int8Weight, QuantScheme, make_scheme

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
# head_dim 32, FFN 384, vocab 128: at 4 ranks every slice is a whole number of 32-wide groups and 16-row blocks.
ALIGNED = tiny_args(dim=128, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=128)
# FFN 352 (not a multiple of 64: w2's last group is padded) and vocab 120 (not a multiple of 16: the output
# cannot use the packed int4 kernel and runs dequantized).
RAGGED = tiny_args(dim=128, n_heads=4, n_kv_heads=2, vocab_size=120, multiple_of=32)
TOKENS = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(5))
DECODE_FROM = 6


# ---- the reference: the scheme's definition on full weights ---------------------------------------------------


def bf16_precision(t):
    return t.to(torch.bfloat16).to(torch.float32)


# The scheme rounds in float32 (values near a rounding boundary depend on it); dequantizes exactly in float64.
def reference_int8(weight):
    w = weight.to(torch.float32)
    scale = bf16_precision(torch.clamp(w.abs().max(dim=1).values / 127, min=1e-10))
    values = torch.clamp(torch.round(w / scale.unsqueeze(1)), -127, 127)
    return values.double() * scale.double().unsqueeze(1)


def reference_int4(weight, group_size):
    out_features, in_features = weight.shape
    columns = []
    for start in range(0, in_features, group_size):
        group = weight[:, start : start + group_size].to(torch.float32)
        # A short last group is padded with zeros, which take part in its range.
        padding = torch.zeros(out_features, group_size - group.shape[1])
        full = torch.cat([group, padding], dim=1)
        low, high = full.min(dim=1).values, full.max(dim=1).values
        scale = bf16_precision(torch.clamp((high - low) / 15, min=1e-10))
        zero = bf16_precision(low + 8 * scale)
        values = torch.clamp(torch.round((group - zero[:, None]) / scale[:, None] + 8), 0, 15)
        columns.append((values.double() - 8) * scale.double()[:, None] + zero.double()[:, None])
    return torch.cat(columns, dim=1)


def reference_quantized(weights, mode, group_size=None, quantize_output=True):
    linear = ("attention.wq.", "attention.wk.", "attention.wv.", "attention.wo.", "feed_forward.w")
    out = {}
    for name, w in weights.items():
        if any(part in name for part in linear) or (quantize_output and name == "output.weight"):
            out[name] = reference_int8(w) if mode == "int8" else reference_int4(w, group_size)
        else:
            out[name] = w
    return out


# ---- the rank worker: every case of one world size ---------------------------------------------------------------


def quantized_logits_worker(jobs: dict[str, dict]) -> dict[str, dict]:
    """On each rank: load each job's checkpoint with its quantize setting; full-sequence logits and prefill+decode
    logits (the decode steps run the one-row kernels)."""
    init_distributed()
    results = {}
    for name, job in jobs.items():
        model = load_model(job["ckpt"], max_seq_len=16, max_batch_size=2, dtype=job.get("dtype", torch.float32),
                           quantize=job.get("quantize"))
        steps = [model(TOKENS[:, :DECODE_FROM], 0).logits]
        for pos in range(DECODE_FROM, TOKENS.shape[1]):
            steps.append(model(TOKENS[:, pos : pos + 1], pos).logits)
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (Int8Weight, Int4Weight))})
        packed = sorted({m.packed for m in model.modules() if isinstance(m, Int4Weight)})
        # What the weights take as stored: every parameter and every quantized weight's buffers.
        nbytes = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
        results[name] = {"full": model(TOKENS, 0).logits, "incremental": torch.cat(steps, dim=1), "kinds": kinds,
                         "packed": packed, "nbytes": nbytes}
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    aligned = write_checkpoint(root / "aligned", ALIGNED, num_shards=2)
    ragged = write_checkpoint(root / "ragged", RAGGED)
    write_quantized(root / "aligned", root / "aligned_int8", QuantScheme("int8"))
    # Llama 2 style shards (embedding split by width, rope.freqs, vocab_size -1), same weights.
    write_checkpoint(root / "llama2", ALIGNED, num_shards=2, family="llama2")
    write_quantized(root / "llama2", root / "llama2_int8", QuantScheme("int8"))
    return root, {"aligned": aligned, "ragged": ragged}


def _jobs(root, world):
    aligned, ragged, saved = str(root / "aligned"), str(root / "ragged"), str(root / "aligned_int8")
    jobs = {
        "float": {"ckpt": aligned},
        "int8": {"ckpt": aligned, "quantize": "int8"},
        "int4-g32": {"ckpt": aligned, "quantize": make_scheme("int4", 32)},
        "saved-int8": {"ckpt": saved},
        "saved-int8-asked": {"ckpt": saved, "quantize": "int8"},
        "saved-int8-llama2": {"ckpt": str(root / "llama2_int8")},
    }
    if world == 1:
        jobs["int8-output-kept"] = {"ckpt": aligned, "quantize": make_scheme("int8", keep_output_precision=True)}
        jobs["int4-g128"] = {"ckpt": aligned, "quantize": make_scheme("int4", 128)}
        jobs["ragged-int4-g64"] = {"ckpt": ragged, "quantize": make_scheme("int4", 64)}
        jobs["int8-bf16"] = {"ckpt": aligned, "quantize": "int8", "dtype": torch.bfloat16}
        jobs["int4-g32-bf16"] = {"ckpt": aligned, "quantize": make_scheme("int4", 32), "dtype": torch.bfloat16}
    return jobs


def _expected(weights, name):
    aligned, ragged = weights["aligned"], weights["ragged"]
    if name == "float":
        return reference_logits(aligned, ALIGNED, TOKENS)
    if name.startswith(("int8", "saved-int8")):
        kept = name == "int8-output-kept"
        return reference_logits(reference_quantized(aligned, "int8", quantize_output=not kept), ALIGNED, TOKENS)
    if name.startswith("int4"):
        group = int(name.split("-g")[1].split("-")[0])
        return reference_logits(reference_quantized(aligned, "int4", group), ALIGNED, TOKENS)
    assert name == "ragged-int4-g64"
    return reference_logits(reference_quantized(ragged, "int4", 64), RAGGED, TOKENS)


@pytest.fixture(scope="module", params=[1, 2, 4])
def loaded(request, checkpoints):
    """(world size, every rank's results of every job at that world size)."""
    root, _ = checkpoints
    return request.param, run_local(quantized_logits_worker, request.param, _jobs(root, request.param))


def test_quantized_logits_match_the_full_weight_reference(checkpoints, loaded):
    root, weights = checkpoints
    world, results = loaded
    for name in _jobs(root, world):
        expected = _expected(weights, name)
        # fp32 activations: summation order only. bf16 activations: their rounding, on top of the weights'.
        tolerance = 3e-2 if name.endswith("bf16") else 2e-5
        for rank, result in enumerate(results):
            for kind in ("full", "incremental"):
                diff = rel_diff(result[name][kind], expected)
                assert diff < tolerance, f"{name} at {world} rank(s), rank {rank}, {kind}: {diff:.2e}"
    rank0 = results[0]
    assert rank0["float"]["kinds"] == []
    assert rank0["int8"]["kinds"] == rank0["saved-int8"]["kinds"] == ["Int8Weight"]
    assert rank0["int4-g32"]["kinds"] == ["Int4Weight"] and rank0["int4-g32"]["packed"] == [True]
    # The saved checkpoint is the same model as quantizing at load time, at any world size.
    assert torch.equal(rank0["saved-int8"]["full"], rank0["int8"]["full"])
    assert torch.equal(rank0["saved-int8-llama2"]["full"], rank0["int8"]["full"])
    # Quantization changes the model: the test could tell a float model from a quantized one.
    assert rel_diff(rank0["int4-g32"]["full"], rank0["float"]["full"]) > 1e-3
    if world == 1:
        assert rank0["ragged-int4-g64"]["packed"] == [False, True]  # the 120-row output runs dequantized
        assert rel_diff(rank0["int8-output-kept"]["full"], rank0["int8"]["full"]) > 0


def test_the_memory_check_budgets_the_weights_as_stored(checkpoints, loaded):
    """The check before loading counts what loading then holds, byte for byte: int4 at half a byte a value where it
    is packed, a byte where it is not (the ragged model's 120-row output), scales and zeros, padded groups."""
    root, _ = checkpoints
    world, results = loaded
    for name, job in _jobs(root, world).items():
        args = RAGGED if "ragged" in job["ckpt"] else ALIGNED
        scheme = make_scheme(job.get("quantize") or ("int8" if "saved" in name else None))
        weights, _ = memory_needed(args, world, job.get("dtype", torch.float32), scheme, max_batch_size=2,
                                   max_seq_len=16, device="cpu")
        assert weights == results[0][name]["nbytes"], f"{name} at {world} rank(s)"


# ---- kernels, one by one, against the dequantized weight ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_every_kernel_computes_the_dequantized_product(dtype, rows):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=gen)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    int8 = Int8Weight.quantize(weight, dtype)
    int4 = Int4Weight.quantize(weight, 32, dtype, packed=True)
    int4_plain = Int4Weight.quantize(weight, 32, dtype, packed=False)
    assert torch.equal(int4.dequantize(), int4_plain.dequantize())
    for quantized, kernels in ((int8, ("mm_int8pack", "mm_dequantized", "mv_dequantized")),
                               (int4, ("mm_int4pack",)), (int4_plain, ("mm_dequantized",))):
        expected = x.double() @ quantized.dequantize().double().t()
        for kernel in kernels:
            if kernel.startswith("mv") and rows != 1:
                continue
            got = getattr(quantized, kernel)(x.contiguous())
            assert got.dtype == dtype and got.shape == (rows, 48)
            assert rel_diff(got, expected) < (2e-2 if dtype == torch.bfloat16 else 1e-5), (kernel, rows, dtype)


def test_quantized_values_and_scales():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    int8 = Int8Weight.quantize(weight, torch.float32)
    assert int8.qweight.dtype == torch.int8 and int8.qweight.abs().max() == 127
    assert torch.allclose(int8.dequantize().double(), reference_int8(weight))
    int4 = Int4Weight.quantize(weight, 32, torch.float32, packed=False)
    assert int4.values.min() == 0 and int4.values.max() == 15
    assert torch.allclose(int4.dequantize().double(), reference_int4(weight, 32))
    # Error bounds of the schemes: half a step.
    step8 = weight.abs().amax(1, keepdim=True) / 127
    assert ((int8.dequantize() - weight).abs() <= step8 * 0.51).all()


def test_rounding_and_packing_by_blocks_of_rows_change_nothing(monkeypatch):
    """Large weights are quantized and packed a block of rows at a time (bounded temporaries)."""
    from llama_dist.model import quant

    weight = torch.randn(160, 64, generator=torch.Generator().manual_seed(2))
    whole8, whole4 = Int8Weight.quantize(weight, torch.float32), Int4Weight.quantize(weight, 32, torch.float32, True)
    monkeypatch.setattr(quant, "_ROW_BLOCK", 64)  # the packed layout's blocks are 64 rows: a multiple of them
    blocks8, blocks4 = Int8Weight.quantize(weight, torch.float32), Int4Weight.quantize(weight, 32, torch.float32, True)
    assert torch.equal(whole8.qweight, blocks8.qweight) and torch.equal(whole8.scale, blocks8.scale)
    assert torch.equal(whole4.values, blocks4.values) and torch.equal(whole4.scales_and_zeros, blocks4.scales_and_zeros)


# ---- saving, schemes, errors ----------------------------------------------------------------------------------------


def test_saved_checkpoint_holds_int8_and_names_its_scheme(checkpoints):
    root, _ = checkpoints
    saved = root / "aligned_int8"
    params = json.loads((saved / "params.json").read_text())
    assert params["weight_quantization"] == {"mode": "int8", "group_size": None, "quantize_output": True}
    shards = [torch.load(saved / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    assert shards[0]["layers.0.attention.wq.weight"].dtype == torch.int8
    assert shards[0]["layers.0.attention.wq.weight_scale"].shape == (ALIGNED.dim // 2,)  # split with its rows
    assert shards[0]["layers.0.attention.wo.weight_scale"].shape == (ALIGNED.dim,)  # whole: a row split
    assert shards[0]["tok_embeddings.weight"].dtype == torch.float32
    float_bytes = sum((root / "aligned" / f"consolidated.0{i}.pth").stat().st_size for i in range(2))
    int8_bytes = sum((saved / f"consolidated.0{i}.pth").stat().st_size for i in range(2))
    assert int8_bytes < 0.6 * float_bytes


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_scheme("int3"), "int3"),
        (lambda: make_scheme("int4", 48), "48"),
        (lambda: QuantScheme("int8", 32), "no group size"),
        (lambda: write_quantized("unused", "unused", QuantScheme("int4", 32)), "int4"),
    ],
)
def test_bad_mode_or_group_size_is_a_config_error(call, message):
    with raises_naming(ConfigError, message):
        call()


def test_a_saved_scheme_cannot_load_as_another(checkpoints):
    root, _ = checkpoints
    init_distributed()
    try:
        with raises_naming(ConfigError, "int8", "int4"):
            load_model(root / "aligned_int8", quantize=make_scheme("int4", 32), max_seq_len=16)
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("flags, message", [(["--quantize", "int3"], "int3"), (["--quantize", "int4",
                                             "--int4_group_size", "100"], "100")])
def test_bad_quantize_flag_is_one_error_line(capsys, flags, message):
    rc = cli.main(["generate", "--prompt", "one two", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err and err.startswith("llama-dist: error:")


def test_quantize_command_and_quantized_generation(tmp_path, capsys):
    """The bundled model quantized by the command, then generating from it (greedy, as the float model does)."""
    assert cli.main(["quantize", str(TINY), str(tmp_path / "tiny_int8")]) == 0
    assert (tmp_path / "tiny_int8" / "tokenizer.model").is_file()
    outputs = {}
    for name, flags in {"float": [], "int8": ["--quantize", "int8"], "saved": ["--ckpt_dir", tmp_path / "tiny_int8"],
                        "int4": ["--quantize", "int4", "--int4_group_size", "32"]}.items():
        assert cli.main(["generate", "--prompt", "one two three four", "--temperature", "0", "--max_gen_len", "8",
                         *map(str, flags)]) == 0
        lines = capsys.readouterr().out.splitlines()
        outputs[name] = lines[lines.index("> one two three four") + 1]
    assert outputs["float"].startswith("five six seven")
    assert outputs["int8"] == outputs["saved"] == outputs["float"]
    assert outputs["int4"].startswith("five six")
