"""RMS normalisation, as the Llama/OLMoE/Qwen/DeepSeek/gpt-oss families compute it."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn

from moe_hooked.components.hook_point import MoEHookPoint


class RMSNormPre(nn.Module):
    """x * rsqrt(mean(x^2) + eps), computed in float32 and cast back; no gain.

    With `gain_float32` (gpt-oss) the result stays in float32, for a gain to be applied
    before the cast back, as that family's reference does; otherwise (Llama and the others)
    it is cast to the input dtype here, and a gain multiplies the cast value.

    Hooks: `hook_scale` [batch pos 1] (the divisor), `hook_normalized` [batch pos d] (float32
    with `gain_float32`, else the input dtype).
    """

    def __init__(self, eps: float, gain_float32: bool = False):
        super().__init__()
        self.eps = eps
        self.gain_float32 = gain_float32
        self.hook_scale = MoEHookPoint()
        self.hook_normalized = MoEHookPoint()

    def normalize(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        x32 = x.float()
        inverse = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = inverse.reciprocal()
        hooked_scale = self.hook_scale(scale)
        if hooked_scale is not scale:  # a hook replaced the scale: divide by the new one
            inverse = hooked_scale.reciprocal()
        normalized = x32 * inverse
        return self.hook_normalized(normalized if self.gain_float32 else normalized.to(x.dtype))

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        return self.normalize(x)


class RMSNorm(RMSNormPre):
    """`RMSNormPre` followed by a learned gain `w` [d], applied in float32 with `gain_float32`
    (gpt-oss), else to the normalized value already cast to the input dtype; the result is
    in the input dtype either way."""

    def __init__(self, d: int, eps: float, gain_float32: bool = False):
        super().__init__(eps, gain_float32)
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        return (self.w * self.normalize(x)).to(x.dtype)
