"""The matrix product of an activation with one weight of this rank: which kernel runs it, for the device, the
weight's kind (dense, int8, int4) and the number of activation rows.

The kernels have names (KERNELS, per weight kind). Which one runs is the measured choice when one was made for
this weight's shape, dtype and row bucket (`kernel_choice.choose_kernels`, at model build, CPU only: it installs
the table here), else the static rule (`static_kernel`), which is what was fastest where it was tuned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_dist.model import native
from llama_dist.model.quant import Int4Weight, Int8Weight, QuantizedWeight


def local_linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """x @ weight.T with this rank's slice of the weight, by the kernel that streams it fastest on this device,
    weight kind and row count: the measured one if the table has it, else the static rule."""
    rows = x.numel() // x.shape[-1]
    name = None
    if _chosen and x.device.type == "cpu":
        name = _chosen.get((*weight_key(weight, x.dtype), row_bucket(rows)))
    if name is None:
        name = static_kernel(weight, x.device, x.dtype, rows)
    return run_kernel(name, x, weight, rows)


def run_kernel(name: str, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, rows: int | None = None):
    """x @ weight.T by the kernel `name` of the weight's kind (KERNELS); x of any leading shape."""
    rows = x.numel() // x.shape[-1] if rows is None else rows
    if isinstance(weight, QuantizedWeight):
        out = KERNELS[weight_kind(weight)][name](weight, x.reshape(rows, -1).contiguous())
        return out.view(*x.shape[:-1], weight.out_features)
    return KERNELS["dense"][name](x, weight, rows)


# ---- the candidates ---------------------------------------------------------------------------------------------


def _mv(x, weight, rows):  # one row only
    return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])


def _linear(x, weight, rows):
    return F.linear(x, weight)


def _matmul_transposed(x, weight, rows):
    return (weight @ x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], weight.shape[0])


def _linear_in_float32_blocks(x, weight, rows=None):
    x32 = x.reshape(-1, x.shape[-1]).float()
    blocks = [F.linear(x32, weight[start : start + _UPCAST_BLOCK_ROWS].float())
              for start in range(0, weight.shape[0], _UPCAST_BLOCK_ROWS)]
    return torch.cat(blocks, dim=-1).to(x.dtype).view(*x.shape[:-1], weight.shape[0])


# kind -> kernel name -> function. Dense: fn(x, weight, rows) with x of any leading shape; quantized: the weight's
# method, fn(weight, x) with x 2-D (rows, in_features) and contiguous.
KERNELS = {
    "dense": {"mv": _mv, "linear": _linear, "matmul_t": _matmul_transposed, "upcast_blocks": _linear_in_float32_blocks},
    "int8": {"int8pack": Int8Weight.mm_int8pack, "dequantized": Int8Weight.mm_dequantized,
             "mv_dequantized": Int8Weight.mv_dequantized, "native": Int8Weight.mm_native},
    "int4": {"int4pack": Int4Weight.mm_int4pack, "dequantized": Int4Weight.mm_dequantized},
    "int4_unpacked": {"dequantized": Int4Weight.mm_dequantized},
}


def candidates(kind: str, dtype: torch.dtype, rows: int) -> list[str]:
    """The kernels of a `kind` weight that can multiply `rows` rows of `dtype` activations on the CPU."""
    if kind == "dense":
        names = (["mv"] if rows == 1 else []) + ["linear", "matmul_t"]
        return names + (["upcast_blocks"] if dtype != torch.float32 else [])
    if kind == "int8":
        names = ["int8pack", "dequantized"] + (["mv_dequantized"] if rows == 1 else [])
        # The compiled kernel streams the whole weight once per 4 activation rows: made for decode, not prefill.
        return names + (["native"] if rows < _NATIVE_MAX_ROWS and native.int8_rows_available() else [])
    # A packed int4 weight dequantizes by multiplying with the identity (its layout is the kernel's business):
    # in_features / rows times the product's own work, it never wins, and timing it would eat the budget.
    return ["int4pack"] if kind == "int4" else ["dequantized"]


# Below this many rows the compiled int8 kernel is a candidate (the buckets up to 8-63 rows: decode, speculative
# verification).
_NATIVE_MAX_ROWS = 64


def usable(kind: str, name: str) -> bool:
    """Whether kernel `name` of a `kind` weight can run in this process (a compiled one only once built)."""
    return name in KERNELS.get(kind, {}) and (name != "native" or native.int8_rows_available())


def weight_kind(weight: torch.Tensor | QuantizedWeight) -> str:
    if isinstance(weight, Int8Weight):
        return "int8"
    if isinstance(weight, Int4Weight):
        return "int4" if weight.packed else "int4_unpacked"
    return "dense"


def weight_key(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> tuple:
    """(kind, out_features, in_features, activation dtype[, int4 group size]): what a kernel's speed depends on
    besides the row count."""
    if isinstance(weight, QuantizedWeight):
        kind = weight_kind(weight)
        group = (weight.group_size,) if isinstance(weight, Int4Weight) else ()
        return (kind, weight.out_features, weight.in_features, dtype, *group)
    return ("dense", weight.shape[0], weight.shape[1], dtype)


# Row buckets: (the first row count of the bucket, the row count timed for it). A bucket holds the row counts
# from its first to the next bucket's first - 1: 1, 2-7, 8-63, 64-255, 256+.
ROW_BUCKETS = ((1, 1), (2, 4), (8, 32), (64, 128), (256, 512))


def row_bucket(rows: int) -> int:
    """The index in ROW_BUCKETS of the bucket holding `rows`."""
    if rows < 8:
        return 0 if rows == 1 else 1
    return 2 if rows < 64 else (3 if rows < 256 else 4)


# ---- the measured table -----------------------------------------------------------------------------------------

# (*weight_key, row bucket) -> kernel name; empty: the static rule everywhere. Process-wide: the last model built
# sets it (a process runs one model; keys carry the shapes, so another model's weights fall back to the rule).
_chosen: dict[tuple, str] = {}


def install_kernel_table(table: dict[tuple, str]) -> None:
    """Make `table` the measured choices local_linear looks up (replacing any earlier table; {} for none). An entry
    whose kernel cannot run here (rank 0 chose a compiled kernel this rank could not build) is left to the static
    rule."""
    global _chosen
    _chosen = {key: name for key, name in table.items() if usable(key[0], name)}


def installed_kernel_table() -> dict[tuple, str]:
    return dict(_chosen)


# ---- the static rule ----------------------------------------------------------------------------------------------


def static_kernel(weight: torch.Tensor | QuantizedWeight, device: torch.device, dtype: torch.dtype, rows: int) -> str:
    """The kernel chosen by fixed rules (tuned on an Intel AMX machine; docs/performance.md has the measurements)."""
    if isinstance(weight, QuantizedWeight):
        return _quantized_kernel(weight, device, dtype, rows)
    if device.type == "cpu" and rows == 1:
        return "mv"
    if device.type == "cpu" and rows >= _UPCAST_ROWS and _SLOW_HALF_PRECISION.get(weight.dtype, False):
        return "upcast_blocks"
    if device.type == "cpu" and rows <= 64:
        return "matmul_t"
    return "linear"


# A CPU without native bf16/fp16 matrix units (AVX2 only, no AVX512-BF16/AMX) multiplies several half-precision rows
# at about one matrix-vector product's cost each; from this many rows, converting the weight to float32 block by
# block and multiplying there is faster (8192x2048, 2 cores: 32 rows 97 -> 42 ms, 128 rows 389 -> 108 ms,
# 512 rows 917 -> 119 ms; at 4 rows a wash).
_UPCAST_ROWS = 8
_UPCAST_BLOCK_ROWS = 1024  # 8 MiB of float32 weight at a time for a 2048-wide weight


# Whether this CPU lacks native matrix units for the dtype (read once: the check asks oneDNN).
_SLOW_HALF_PRECISION = {
    torch.bfloat16: not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    torch.float16: not torch.ops.mkldnn._is_mkldnn_fp16_supported(),
}


# 8192x2048, bf16: the int8 kernel takes 12.8 ms at 128 rows and 48 ms at 512; converting the weight and multiplying
# densely 15.5 and 30 ms.
_INT8_DEQUANTIZE_ROWS = 256


def _quantized_kernel(weight: QuantizedWeight, device: torch.device, dtype: torch.dtype, rows: int) -> str:
    """The kernel name of a quantized weight for `rows` rows of activations in `dtype` on `device`.

    CPU, measured (docs/performance.md, `python -m llama_dist.bench kernels`): with bf16 activations the int8 and
    int4 pack kernels beat dequantize-then-multiply up to a few hundred rows; from _INT8_DEQUANTIZE_ROWS (prefill)
    converting the int8 weight once and multiplying densely is faster (a packed int4 weight costs as much to unpack
    as to multiply, so it keeps its kernel); with fp32 activations the int8 kernel is scalar code, faster only for
    one row. On CUDA (not measured: no GPU was lent) a packed int4 weight runs the tensor-core kernel
    (`_weight_int4pack_mm`); an int8 weight runs as convert, multiply, scale (`mm_dequantized`), the form inductor
    fuses into one pass over the int8 values at batch 1 in the compiled decode step (gpt-fast's; `decode_step`
    turns on the coordinate-descent tuning that decomposes a one-row product for it), dequantized per call eagerly.
    """
    if isinstance(weight, Int8Weight):
        if device.type == "cpu" and (dtype == torch.bfloat16 or rows == 1) and rows < _INT8_DEQUANTIZE_ROWS:
            return "int8pack"
        return "dequantized"
    if isinstance(weight, Int4Weight) and weight.packed:
        return "int4pack"
    return "dequantized"
