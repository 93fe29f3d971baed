"""The MoE router: logits -> softmax -> top-k slots and their weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from moe_hooked.config import MoEConfig


class Router(nn.Module):
    """Linear router `weight` [n_experts, d_model] (the hub's `mlp.gate.weight`), and `bias`
    [n_experts] when `cfg.router_bias` (gpt-oss).

    The three steps are separate methods so that the MoE block can put a hook point
    between each: editing the logits changes the probabilities, editing the
    probabilities changes the selection.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        if cfg.router_bias:
            self.bias = nn.Parameter(torch.empty(cfg.n_experts))

    def logits(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... n_experts"]:
        return F.linear(x, self.weight, getattr(self, "bias", None))

    def probs(self, logits: Float[torch.Tensor, "... n_experts"]) -> Float[torch.Tensor, "... n_experts"]:
        """Softmax in float32 or in the logits' dtype, as `cfg.router_dtype` says."""
        dtype = torch.float32 if self.cfg.router_dtype == "float32" else logits.dtype
        return F.softmax(logits, dim=-1, dtype=dtype)

    def select(
        self, probs: Float[torch.Tensor, "... n_experts"], out_dtype: torch.dtype
    ) -> tuple[Int[torch.Tensor, "... k"], Float[torch.Tensor, "... k"]]:
        """Top-k expert ids (slot 0 = highest probability) and their weights in `out_dtype`."""
        weights, indices = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.cfg.norm_topk_eps)
        return indices, weights.to(out_dtype)
