"""RMS normalisation, as the Llama/OLMoE/Qwen/DeepSeek families compute it."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn

from moe_hooked.components.hook_point import MoEHookPoint


class RMSNormPre(nn.Module):
    """x * rsqrt(mean(x^2) + eps), computed in float32 and cast back; no gain.

    Hooks: `hook_scale` [batch pos 1] (the divisor), `hook_normalized` [batch pos d].
    """

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.hook_scale = MoEHookPoint()
        self.hook_normalized = MoEHookPoint()

    def normalize(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        x32 = x.float()
        inverse = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = inverse.reciprocal()
        hooked_scale = self.hook_scale(scale)
        if hooked_scale is not scale:  # a hook replaced the scale: divide by the new one
            inverse = hooked_scale.reciprocal()
        return self.hook_normalized((x32 * inverse).to(x.dtype))

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        return self.normalize(x)


class RMSNorm(RMSNormPre):
    """`RMSNormPre` followed by a learned gain `w` [d] (applied in the input dtype)."""

    def __init__(self, d: int, eps: float):
        super().__init__(eps)
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        return self.w * self.normalize(x)
