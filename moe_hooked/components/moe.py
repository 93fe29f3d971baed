"""The MoE block: router, routed experts and an optional (gated) shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from moe_hooked.components.experts import Experts, HiddenEdit
from moe_hooked.components.hook_point import MoEHookPoint
from moe_hooked.components.mlp import GatedMLP
from moe_hooked.components.router import Router
from moe_hooked.config import MoEConfig


def weighted_sum(
    weights: Float[torch.Tensor, "batch pos k"],
    expert_out: Float[torch.Tensor, "batch pos k d_model"],
    indices: Int[torch.Tensor, "batch pos k"],
) -> Float[torch.Tensor, "batch pos d_model"]:
    """sum_k w_k * out_k as the references accumulate it: each product in the promoted dtype of
    the two (float32 with float32 weights), cast to the outputs' dtype, and the products added
    one by one in that dtype in ascending expert id order (the order of their per-expert loop)."""
    terms = (weights.unsqueeze(-1) * expert_out).to(expert_out.dtype)
    order = indices.argsort(dim=-1, stable=True)
    terms = terms.gather(-2, order.unsqueeze(-1).expand_as(terms))
    total = terms[..., 0, :]
    for slot in range(1, terms.shape[-2]):
        total = total + terms[..., slot, :]
    return total


class MoEBlock(nn.Module):
    """mlp_out = sum_k w_k * E_{i_k}(x) [+ g(x) * S(x)].

    Hook points (shapes with `k = cfg.top_k`):
    `hook_router_logits`, `hook_router_probs` [batch pos n_experts] (probs: softmax or sigmoid scores);
    `hook_selection_scores` [batch pos n_experts] (only with `cfg.router_selection_bias`: the scores
    plus the bias, which the top-k ranks; -inf where a logit is -inf);
    `hook_topk_indices`, `hook_topk_weights` [batch pos k];
    `hook_expert_out` [batch pos k d_model] (unweighted, per slot);
    inside the routed experts, per slot as `hook_expert_out` (zeros in slots not computed):
    `hook_expert_pre` (x W_gate^T), `hook_expert_pre_linear` (x W_up^T), `hook_expert_post`
    (act(pre) * pre_linear, what W_down reads), each [batch pos k d_expert] and editable, like
    TransformerLens's `mlp.hook_pre` / `hook_pre_linear` / `hook_post`. They cost a second
    dispatch over the experts, so they run only while one of them has a hook;
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
        self.hook_expert_pre = MoEHookPoint()
        self.hook_expert_pre_linear = MoEHookPoint()
        self.hook_expert_post = MoEHookPoint()
        self.hook_expert_out = MoEHookPoint()
        self.hook_all_expert_out = MoEHookPoint()
        self.hook_routed_out = MoEHookPoint()

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        logits = self.hook_router_logits(self.router.logits(x))
        probs = self.hook_router_probs(self.router.probs(logits))
        selection = self.router.selection_scores(logits, probs)
        if self.cfg.router_selection_bias:
            selection = self.hook_selection_scores(selection)
        indices, weights = self.router.select(logits, probs, selection, x.dtype)
        indices = self.hook_topk_indices(indices)
        weights = self.hook_topk_weights(weights)
        flat_x = x.flatten(0, 1)
        edit = self._edit_hidden(x.shape[:2]) if self._hidden_is_hooked() else None
        expert_out = self.experts(flat_x, indices.flatten(0, 1), weights.flatten(0, 1), edit)
        expert_out = self.hook_expert_out(expert_out.unflatten(0, x.shape[:2]))
        if self.compute_all_experts:
            self.hook_all_expert_out(self.experts.forward_all(flat_x).unflatten(0, x.shape[:2]))
        routed = self.hook_routed_out(weighted_sum(weights, expert_out, indices))
        if not self.cfg.d_shared_expert:
            return routed
        return routed + self.hook_shared_out(self.shared(x))

    def _hidden_is_hooked(self) -> bool:
        return any(h.is_hooked for h in (self.hook_expert_pre, self.hook_expert_pre_linear, self.hook_expert_post))

    def _edit_hidden(self, batch_pos: torch.Size) -> HiddenEdit:
        """The hooks on the experts' hidden activations, as `Experts.forward`'s `edit_hidden`."""

        def edit(pre: torch.Tensor, pre_linear: torch.Tensor) -> torch.Tensor:
            pre = self.hook_expert_pre(pre.unflatten(0, batch_pos))
            pre_linear = self.hook_expert_pre_linear(pre_linear.unflatten(0, batch_pos))
            return self.hook_expert_post(self.experts.activate(pre, pre_linear)).flatten(0, 1)

        return edit

    def shared(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """The shared expert's output, times its sigmoid gate where the model has one."""
        out = self.shared_expert(x)
        if not self.cfg.shared_expert_gated:
            return out
        return self.hook_shared_gate(torch.sigmoid(F.linear(x, self.w_shared_gate))) * out
