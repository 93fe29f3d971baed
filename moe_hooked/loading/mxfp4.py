"""MXFP4 (OCP microscaling FP4) tensors, as gpt-oss checkpoints store their expert weights.

A tensor `X` is stored as `X_blocks` (uint8 [..., rows, groups, 16]: 32 FP4 E2M1 codes per
group, two per byte, low nibble first) and `X_scales` (uint8 [..., rows, groups]: one E8M0
power-of-two exponent per group, biased by 127). Dequantized, each group of 32 values is
code_value * 2 ** (scale - 127), and the result is laid out [..., groups * 32, rows] (the
[in, out] layout of the unquantized checkpoint).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, UInt8

FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The value of each 4-bit E2M1 code (sign bit, 2 exponent bits, 1 mantissa bit)."""
SCALE_BIAS = 127
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the dequantized tensor of `blocks` [..., rows, groups, bytes]: [..., groups * bytes * 2, rows]."""
    *prefix, rows, groups, n_bytes = blocks_shape
    return (*prefix, groups * n_bytes * 2, rows)


def dequantize(
    blocks: UInt8[torch.Tensor, "... rows groups bytes"], scales: UInt8[torch.Tensor, "... rows groups"]
) -> Float[torch.Tensor, "... in rows"]:
    """Exact float32 values of an MXFP4 tensor (every FP4 value times a power of two is a float32)."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., rows, groups, bytes, 2]
    values = table[codes].flatten(-2)  # [..., rows, groups, 32]
    values = torch.ldexp(values, (scales.int() - SCALE_BIAS)[..., None].float())
    return values.flatten(-2).transpose(-1, -2)
