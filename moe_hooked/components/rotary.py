"""Rotary position embedding (rotate-half RoPE), plain or with YaRN scaling.

YaRN (Peng et al. 2023, https://arxiv.org/abs/2309.00071) follows transformers'
`_compute_yarn_parameters`: per frequency, a linear ramp between the interpolated
(divided by `factor`) and the original inverse frequency, and cos/sin multiplied by an
attention factor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import nn

YARN_KEYS = frozenset(
    {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
     "mscale", "mscale_all_dim", "truncate", "attention_factor"}
)
"""The keys of a `rope_parameters` dict with `rope_type` "yarn" that `RotaryEmbedding` reads."""


def rotate_half(x: Float[torch.Tensor, "... d_head"]) -> Float[torch.Tensor, "... d_head"]:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(
    x: Float[torch.Tensor, "... d_rot"],
    cos: Float[torch.Tensor, "... d_rot"],
    sin: Float[torch.Tensor, "... d_rot"],
) -> Float[torch.Tensor, "... d_rot"]:
    """x * cos + rotate_half(x) * sin in the dtype of the tables (float32 tables rotate a
    low-precision `x` in float32), returned in `x`'s dtype."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(yarn: Mapping) -> float:
    """The factor cos and sin are multiplied by: `attention_factor` if given, else
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else mscale(factor)."""
    if yarn.get("attention_factor") is not None:
        return float(yarn["attention_factor"])
    factor, mscale, mscale_all_dim = yarn["factor"], yarn.get("mscale"), yarn.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def _correction_dim(n_rotations: float, dim: int, base: float, n_pos: int) -> float:
    """The dimension whose wavelength makes `n_rotations` turns over `n_pos` positions."""
    return (dim * math.log(n_pos / (n_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, yarn: Mapping, device: torch.device | None = None) -> Float[torch.Tensor, " half"]:
    """YaRN inverse frequencies [dim // 2] in float32: frequencies turning more than `beta_fast`
    times over the original context are kept, those turning fewer than `beta_slow` times are
    divided by `factor`, a linear ramp blends the ones in between."""
    factor, n_pos = yarn["factor"], yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1
    low, high = _correction_dim(beta_fast, dim, base, n_pos), _correction_dim(beta_slow, dim, base, n_pos)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as the reference: avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotate-half RoPE, computed in float32 then cast to the input dtype.

    `yarn`: YaRN parameters (a transformers `rope_parameters` dict with `rope_type` "yarn"
    and `factor` set), or None for plain RoPE. Holds no buffers, so a model built on the
    meta device needs no re-initialisation.
    """

    def __init__(self, d_head: int, theta: float, yarn: Mapping | None = None):
        super().__init__()
        self.d_head = d_head
        self.theta = theta
        self.yarn = dict(yarn) if yarn is not None else None
        self.attention_factor = yarn_attention_factor(yarn) if yarn is not None else 1.0

    def inv_freq(self, device: torch.device) -> Float[torch.Tensor, " half"]:
        if self.yarn is not None:
            return yarn_inv_freq(self.d_head, self.theta, self.yarn, device)
        exponents = torch.arange(0, self.d_head, 2, dtype=torch.int64, device=device).float() / self.d_head
        return 1.0 / (self.theta**exponents)

    def forward(
        self, n_pos: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Float[torch.Tensor, "pos d_head"], Float[torch.Tensor, "pos d_head"]]:
        positions = torch.arange(n_pos, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq(device))
        angles = torch.cat((freqs, freqs), dim=-1)
        if self.attention_factor == 1.0:
            return angles.cos().to(dtype), angles.sin().to(dtype)
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)
