"""Weight-only quantization: the schemes, the rounding, and the quantized weight objects.

Two schemes, both weight-only (activations, the KV cache, embedding and norms stay in the model dtype):

  int8  symmetric, one scale per output channel:      w[n, k] ~= q[n, k] * scale[n],            q in [-127, 127]
  int4  asymmetric, one scale and zero per group of   w[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g],
        `group_size` consecutive input values:         q in [0, 15], g = k // group_size

Per-output-channel scales commute with tensor parallelism: a column-parallel rank holds whole rows (its slice of
the scales), a row-parallel rank multiplies its partial sum by the full per-row scale before the all-reduce (the
loader reads each full row's largest value for it), so int8 gives the same model at every world size.
Groups are counted from the start of each rank's slice of the input dimension, so a row-parallel rank's groups are
the full weight's groups whenever its slice width is a multiple of the group size (the usual case); otherwise its
last group is shorter (zero-padded) and int4 values depend on the world size.

Scales and zeros are rounded to bfloat16 precision before the values are rounded against them, so a weight
quantizes to the same numbers whatever the model dtype (bf16 values are exact in fp32, and in fp16 in its normal
range), and a saved int8 checkpoint gives the same model as quantizing at load time.

A quantized weight is a module holding its tensors as buffers; `kernels.local_linear` picks which of its
kernels runs (the measurements that chose them are in docs/performance.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama_dist.errors import ConfigError
from llama_dist.model.weights import LAYER_MATMUL_WEIGHTS

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 128
# The params.json field of a quantized checkpoint naming its scheme (Meta's own files use "quantization_args").
PARAMS_FIELD = "weight_quantization"
SCALE_SUFFIX = "_scale"
# Quantization covers the inventory's LAYER_MATMUL_WEIGHTS, and the output projection unless it is kept in the
# model dtype; a saved int8 weight `X.weight` has its per-row scales in `X.weight_scale`.


@dataclass(frozen=True)
class QuantScheme:
    """How a model's matmul weights are quantized: `mode` int8 or int4 (group_size input values per group);
    quantize_output=False keeps the output projection in the model dtype."""

    mode: str
    group_size: int | None = None
    quantize_output: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"quantize must be one of {', '.join(MODES)} (or None), got {self.mode!r}")
        if self.mode == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError(
                f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {self.group_size!r}"
            )
        if self.mode == "int8" and self.group_size is not None:
            raise ConfigError("int8 uses one scale per output channel: it takes no group size")

    def covers(self, name: str) -> bool:
        """Whether the weight of Meta's name `name` is quantized under this scheme."""
        return name.endswith(LAYER_MATMUL_WEIGHTS) or (self.quantize_output and name == "output.weight")

    def to_params(self) -> dict:
        return {"mode": self.mode, "group_size": self.group_size, "quantize_output": self.quantize_output}

    @classmethod
    def from_params(cls, field: dict, where) -> QuantScheme:
        if not isinstance(field, dict) or "mode" not in field:
            raise ConfigError(f"{where}: {PARAMS_FIELD} must be an object with a 'mode', got {field!r}")
        return cls(field["mode"], field.get("group_size"), bool(field.get("quantize_output", True)))


def make_scheme(
    quantize: str | QuantScheme | None,
    int4_group_size: int = DEFAULT_INT4_GROUP_SIZE,
    keep_output_precision: bool = False,
) -> QuantScheme | None:
    """The scheme the user's flags ask for (None: no quantization); a bad mode or group size is a ConfigError."""
    if quantize is None or isinstance(quantize, QuantScheme):
        return quantize
    mode = str(quantize).lower()
    return QuantScheme(mode, int4_group_size if mode == "int4" else None, not keep_output_precision)


def round_to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


# ---- the rounding (float32 math on the weight as stored) ----------------------------------------------------


# Rows rounded (and packed) at a time: the float32 temporaries of a whole output projection (128256 x 2048) would
# be GiBs. A multiple of 64: the CPU int4 layout packs blocks of 64 rows, so packing by blocks changes nothing.
_ROW_BLOCK = 512


def quantize_int8(
    weight: torch.Tensor, row_absmax: torch.Tensor | None = None, block_done: Callable[[], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row) with weight ~= values * scale[:, None].

    row_absmax: the largest |w| of each full row, for a slice of the columns (a row-parallel rank's): its scales
    are then the full weight's. Default: this weight's own. block_done: called after each block of rows (the
    loader gives back the block's pages of a memory-mapped weight).
    """
    values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _ROW_BLOCK):
        stop = start + _ROW_BLOCK
        w = weight[start:stop].float()
        absmax = w.abs().amax(dim=1) if row_absmax is None else row_absmax[start:stop].float()
        scale = round_to_bf16((absmax / 127).clamp_min(1e-10))
        values[start:stop] = torch.round(w / scale[:, None]).clamp_(-127, 127)
        scales[start:stop] = scale
        if block_done is not None:
            block_done()
    return values, scales


def quantize_int4(
    weight: torch.Tensor, group_size: int, block_done: Callable[[], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 values in [0, 15] of shape (rows, padded columns), float32 scales and zeros of shape (rows, groups)).

    The columns are zero-padded to a whole number of groups. block_done: as for quantize_int8.
    """
    rows, cols = weight.shape
    padded = math.ceil(cols / group_size) * group_size
    values = torch.empty(rows, padded, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(rows, padded // group_size, dtype=torch.float32, device=weight.device)
    zeros = torch.empty_like(scales)
    for start in range(0, rows, _ROW_BLOCK):
        stop = start + _ROW_BLOCK
        block = weight[start:stop].float()
        groups = F.pad(block, (0, padded - cols)).reshape(block.shape[0], -1, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = round_to_bf16(((high - low) / 15).clamp_min(1e-10))
        zero = round_to_bf16(low + 8 * scale)
        q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15)
        values[start:stop] = q.reshape(block.shape[0], padded)
        scales[start:stop], zeros[start:stop] = scale, zero
        if block_done is not None:
            block_done()
    return values, scales, zeros


# ---- the weight objects ---------------------------------------------------------------------------------------


class QuantizedWeight(nn.Module):
    """A rank's quantized (out_features, in_features) weight; `dequantize()` gives it back in the scales' dtype."""

    out_features: int
    in_features: int

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}"


class Int8Weight(QuantizedWeight):
    """int8 values (out, in) and one scale per output row, in the model dtype (the kernels take it so)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(dtype).contiguous())

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype, row_absmax: torch.Tensor | None = None,
                 block_done: Callable[[], None] | None = None) -> Int8Weight:
        return cls(*quantize_int8(weight, row_absmax, block_done), dtype)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    # Kernels: x is 2-D (rows, in_features), contiguous, in the model dtype.
    def mm_int8pack(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)

    def mm_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        # The scale is applied to the (rows, out) product, not to the (out, in) weight: fewer multiplies.
        return F.linear(x, self.qweight.to(x.dtype)) * self.scale

    def mv_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.mv(self.qweight.to(x.dtype), x.view(-1)) * self.scale).view(1, -1)

    def mm_native(self, x: torch.Tensor) -> torch.Tensor:
        # Compiled for this CPU (model/native.py): converts the int8 values in registers; float32 sums.
        return torch.ops.llama_dist.int8_rows(x, self.qweight, self.scale)


def packs_int4(device: torch.device, out_features: int, dtype: torch.dtype) -> bool:
    """Whether an int4 weight of `out_features` rows for `dtype` activations on `device` is stored packed, two values
    a byte, in the layout of the device's int4 kernel: on a CPU (`_weight_int4pack_mm_for_cpu`) when the rows are a
    multiple of 16; on CUDA (`_weight_int4pack_mm`, tensor cores: compute capability 8.0 and up, bfloat16 only)
    when they are a multiple of 8. Otherwise one value a byte, multiplied dequantized. The memory check budgets
    weights by this (`checkpoint.memory`)."""
    device = torch.device(device)
    if device.type == "cpu":
        return out_features % 16 == 0
    if device.type == "cuda":
        return (dtype == torch.bfloat16 and out_features % 8 == 0
                and torch.cuda.get_device_capability(device) >= (8, 0))
    return False


def int4_inner_k_tiles(in_features: int) -> int:
    """The CUDA int4 layout's k tiles per 16-column step: the largest of 8, 4, 2 dividing the (group-padded) input
    width into whole tiles (a group is at least 32 columns, so 2 always does)."""
    return next(tiles for tiles in (8, 4, 2) if in_features % (tiles * 16) == 0)


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15] (rows, columns) in the layout of their device's int4 kernel, two values a byte."""
    if values.is_cuda:
        # Two values a byte, the even column high, then the tensor-core tiles (torchao's layout for this kernel).
        pairs = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(pairs, int4_inner_k_tiles(values.shape[1]))
    # By blocks of rows (the packing takes int32, 4 bytes a value) into one tensor, row for row.
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    packed = None
    for start in range(0, len(values), _ROW_BLOCK):
        block = pack(values[start : start + _ROW_BLOCK].to(torch.int32), 1)
        if packed is None:
            packed = torch.empty((len(values), block.shape[1]), dtype=block.dtype, device=block.device)
        packed[start : start + len(block)] = block
    return packed


class Int4Weight(QuantizedWeight):
    """int4 values in groups of `group_size` input columns, one scale and zero per (row, group).

    packed=True stores the values in the layout of their device's int4 kernel (`packs_int4` says when it can; the
    layouts depend on the device, and on a CPU maybe on its instruction set, so they are made per rank at load and
    never saved); otherwise one value a byte, for the dequantizing kernel. Scales and zeros are stored as the
    kernels want them: (groups, out, 2).
    """

    def __init__(self, values, scale, zero, group_size: int, in_features: int, dtype: torch.dtype, packed: bool):
        super().__init__()
        self.out_features, self.in_features = values.shape[0], in_features
        self.padded_in_features = values.shape[1]
        self.group_size = group_size
        self.packed = packed
        values = values.to(torch.uint8).contiguous()
        self.register_buffer("values", _pack_int4(values) if packed else values)
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous())

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int, dtype: torch.dtype, packed: bool,
                 block_done: Callable[[], None] | None = None) -> Int4Weight:
        return cls(*quantize_int4(weight, group_size, block_done), group_size, weight.shape[1], dtype, packed)

    def unpacked_values(self) -> torch.Tensor:
        if not self.packed:
            return self.values
        # The packed layout is the kernel's business: recover the values by multiplying with the identity (exact in
        # bfloat16, the CUDA kernel's one dtype: the values are 0..15).
        dtype = torch.bfloat16 if self.values.is_cuda else torch.float32
        eye = torch.eye(self.padded_in_features, dtype=dtype, device=self.values.device)
        ones = torch.ones_like(self.scales_and_zeros, dtype=dtype)
        ones[..., 1] = 8.0  # scale 1, zero 8: the kernel returns the raw values
        return self._int4pack_mm(eye, ones).t().float().round().to(torch.uint8)

    def _int4pack_mm(self, x: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        if self.values.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x, self.values, self.group_size, scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.values, self.group_size, scales_and_zeros)

    def dequantize(self) -> torch.Tensor:
        values = self.unpacked_values().view(self.out_features, -1, self.group_size).to(self.scales_and_zeros.dtype)
        scale, zero = self.scales_and_zeros.transpose(0, 1).unbind(-1)  # (out, groups) each
        weight = (values - 8) * scale[..., None] + zero[..., None]
        return weight.view(self.out_features, -1)[:, : self.in_features]

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.padded_in_features - self.in_features
        return F.pad(x, (0, extra)) if extra else x

    # Kernels: x is 2-D (rows, in_features), contiguous, in the model dtype.
    def mm_int4pack(self, x: torch.Tensor) -> torch.Tensor:
        return self._int4pack_mm(self._padded(x), self.scales_and_zeros)

    def mm_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))
