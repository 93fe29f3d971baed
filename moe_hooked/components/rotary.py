"""Rotary position embedding (rotate-half RoPE)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn


def rotate_half(x: Float[torch.Tensor, "... d_head"]) -> Float[torch.Tensor, "... d_head"]:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotate-half RoPE, computed in float32 then cast to the input dtype.

    Holds no buffers, so a model built on the meta device needs no re-initialisation.
    """

    def __init__(self, d_head: int, theta: float):
        super().__init__()
        self.d_head = d_head
        self.theta = theta

    def forward(
        self, n_pos: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Float[torch.Tensor, "pos d_head"], Float[torch.Tensor, "pos d_head"]]:
        exponents = torch.arange(0, self.d_head, 2, dtype=torch.int64, device=device).float() / self.d_head
        inv_freq = 1.0 / (self.theta**exponents)
        positions = torch.arange(n_pos, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)
