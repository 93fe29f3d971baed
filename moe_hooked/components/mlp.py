"""Dense SwiGLU MLP: the MLP of dense layers and the shared expert of MoE layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from moe_hooked.components.hook_point import MoEHookPoint

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def activation(name: str):
    """The elementwise activation called `name` in a config.json (`hidden_act`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation '{name}': supported are {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def clamped_swiglu(
    gate: Float[torch.Tensor, "... d"], up: Float[torch.Tensor, "... d"], limit: float, alpha: float
) -> Float[torch.Tensor, "... d"]:
    """gpt-oss's SwiGLU: with g = min(gate, limit) and u = clamp(up, -limit, limit),
    (u + 1) * g * sigmoid(alpha * g)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class GatedMLP(nn.Module):
    """down(act(x W_gate^T) * (x W_up^T)).

    Weights in the hub's [out, in] layout: `w_gate`, `w_up` [d_mlp, d_model],
    `w_down` [d_model, d_mlp]. Hooks as in TransformerLens's gated MLP:
    `hook_pre` = x W_gate^T (before the activation), `hook_pre_linear` = x W_up^T,
    `hook_post` = act(pre) * pre_linear, each [batch pos d_mlp].
    """

    def __init__(self, d_model: int, d_mlp: int, act_fn: str):
        super().__init__()
        self.act = activation(act_fn)
        self.w_gate = nn.Parameter(torch.empty(d_mlp, d_model))
        self.w_up = nn.Parameter(torch.empty(d_mlp, d_model))
        self.w_down = nn.Parameter(torch.empty(d_model, d_mlp))
        self.hook_pre = MoEHookPoint()
        self.hook_pre_linear = MoEHookPoint()
        self.hook_post = MoEHookPoint()

    @property
    def W_in(self) -> Float[torch.Tensor, "d_model d_mlp"]:
        """TransformerLens layout of `w_up`."""
        return self.w_up.T

    @property
    def W_gate(self) -> Float[torch.Tensor, "d_model d_mlp"]:
        """TransformerLens layout of `w_gate`."""
        return self.w_gate.T

    @property
    def W_out(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        """TransformerLens layout of `w_down`."""
        return self.w_down.T

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(x, self.w_gate))
        pre_linear = self.hook_pre_linear(F.linear(x, self.w_up))
        post = self.hook_post(self.act(pre) * pre_linear)
        return F.linear(post, self.w_down)
