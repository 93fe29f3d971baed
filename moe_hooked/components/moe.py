"""The MoE block: router, routed experts and an optional (gated) shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from moe_hooked.components.experts import Experts
from moe_hooked.components.hook_point import MoEHookPoint
from moe_hooked.components.mlp import GatedMLP
from moe_hooked.components.router import Router
from moe_hooked.config import MoEConfig


class MoEBlock(nn.Module):
    """mlp_out = sum_k w_k * E_{i_k}(x) [+ g(x) * S(x)].

    Hook points (shapes with `k = cfg.top_k`):
    `hook_router_logits`, `hook_router_probs` [batch pos n_experts] (probs: softmax or sigmoid scores);
    `hook_selection_scores` [batch pos n_experts] (only with `cfg.router_selection_bias`: the scores
    plus the bias, which the top-k ranks; -inf where a logit is -inf);
    `hook_topk_indices`, `hook_topk_weights` [batch pos k];
    `hook_expert_out` [batch pos k d_model] (unweighted, per slot);
    `hook_all_expert_out` [batch pos n_experts d_model] (only when `compute_all_experts`);
    `hook_routed_out` [batch pos d_model]; shared expert: `hook_shared_gate` [batch pos 1]
    (gated models), `hook_shared_out` [batch pos d_model].
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        if cfg.d_shared_expert:
            self.shared_expert = GatedMLP(cfg.d_model, cfg.d_shared_expert, cfg.act_fn)
            self.hook_shared_out = MoEHookPoint()
        if cfg.shared_expert_gated:
            self.w_shared_gate = nn.Parameter(torch.empty(1, cfg.d_model))
            self.hook_shared_gate = MoEHookPoint()
        self.compute_all_experts = False
        self.hook_router_logits = MoEHookPoint()
        self.hook_router_probs = MoEHookPoint()
        if cfg.router_selection_bias:
            self.hook_selection_scores = MoEHookPoint()
        self.hook_topk_indices = MoEHookPoint()
        self.hook_topk_weights = MoEHookPoint()
        self.hook_expert_out = MoEHookPoint()
        self.hook_all_expert_out = MoEHookPoint()
        self.hook_routed_out = MoEHookPoint()

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        logits = self.hook_router_logits(self.router.logits(x))
        probs = self.hook_router_probs(self.router.probs(logits))
        selection = self.router.selection_scores(logits, probs)
        if self.cfg.router_selection_bias:
            selection = self.hook_selection_scores(selection)
        indices, weights = self.router.select(probs, selection, out_dtype=x.dtype)
        indices = self.hook_topk_indices(indices)
        weights = self.hook_topk_weights(weights)
        flat_x = x.flatten(0, 1)
        expert_out = self.experts(flat_x, indices.flatten(0, 1), weights.flatten(0, 1))
        expert_out = self.hook_expert_out(expert_out.unflatten(0, x.shape[:2]))
        if self.compute_all_experts:
            self.hook_all_expert_out(self.experts.forward_all(flat_x).unflatten(0, x.shape[:2]))
        routed = self.hook_routed_out((weights.unsqueeze(-1) * expert_out).sum(dim=-2))
        if not self.cfg.d_shared_expert:
            return routed
        return routed + self.hook_shared_out(self.shared(x))

    def shared(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """The shared expert's output, times its sigmoid gate where the model has one."""
        out = self.shared_expert(x)
        if not self.cfg.shared_expert_gated:
            return out
        return self.hook_shared_gate(torch.sigmoid(F.linear(x, self.w_shared_gate))) * out
