"""The matrix product of an activation with one weight of this rank: which kernel runs it, for the device, the
weight's kind (dense, int8, int4) and the number of activation rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_dist.model.quant import Int4Weight, Int8Weight, QuantizedWeight


def local_linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """x @ weight.T with this rank's slice of the weight, by the kernel that streams it fastest on this device,
    weight kind and row count (docs/performance.md has the measurements)."""
    rows = x.numel() // x.shape[-1]
    if isinstance(weight, QuantizedWeight):
        kernel = _quantized_kernel(weight, x.device, x.dtype, rows)
        return kernel(x.reshape(rows, -1).contiguous()).view(*x.shape[:-1], weight.out_features)
    if x.device.type == "cpu" and rows == 1:
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    if x.device.type == "cpu" and rows >= _UPCAST_ROWS and _SLOW_HALF_PRECISION.get(weight.dtype, False):
        return _linear_in_float32_blocks(x, weight)
    if x.device.type == "cpu" and rows <= 64:
        return (weight @ x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


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


def _linear_in_float32_blocks(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x32 = x.reshape(-1, x.shape[-1]).float()
    blocks = [F.linear(x32, weight[start : start + _UPCAST_BLOCK_ROWS].float())
              for start in range(0, weight.shape[0], _UPCAST_BLOCK_ROWS)]
    return torch.cat(blocks, dim=-1).to(x.dtype).view(*x.shape[:-1], weight.shape[0])


# 8192x2048, bf16: the int8 kernel takes 12.8 ms at 128 rows and 48 ms at 512; converting the weight and multiplying
# densely 15.5 and 30 ms.
_INT8_DEQUANTIZE_ROWS = 256


def _quantized_kernel(weight: QuantizedWeight, device: torch.device, dtype: torch.dtype, rows: int):
    """The kernel of a quantized weight for `rows` rows of activations in `dtype` on `device`.

    CPU, measured (docs/performance.md, `python -m llama_dist.bench kernels`): with bf16 activations the int8 and
    int4 pack kernels beat dequantize-then-multiply up to a few hundred rows; from _INT8_DEQUANTIZE_ROWS (prefill)
    converting the int8 weight once and multiplying densely is faster (a packed int4 weight costs as much to unpack
    as to multiply, so it keeps its kernel); with fp32 activations the int8 kernel is scalar code, faster only for
    one row. Elsewhere (CUDA: not measured) the weight is dequantized.
    """
    if isinstance(weight, Int8Weight):
        if device.type == "cpu" and (dtype == torch.bfloat16 or rows == 1) and rows < _INT8_DEQUANTIZE_ROWS:
            return weight.mm_int8pack
        return weight.mm_dequantized
    if isinstance(weight, Int4Weight) and weight.packed:
        return weight.mm_int4pack
    return weight.mm_dequantized


def packs_int4(device: torch.device, out_features: int) -> bool:
    """Whether an int4 weight on `device` is stored in the packed layout of the CPU int4 kernel (which needs
    the row count to be a multiple of 16); otherwise it keeps one value a byte and runs dequantized."""
    return torch.device(device).type == "cpu" and out_features % 16 == 0
