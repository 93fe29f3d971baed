"""The MoE router: logits -> scores -> (selection scores) -> top-k slots and their weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from moe_hooked.config import MoEConfig


class Router(nn.Module):
    """Linear router `weight` [n_experts, d_model] (the hub's `mlp.gate.weight`), and `bias`
    [n_experts] when `cfg.router_bias` (gpt-oss).

    The steps are separate methods so that the MoE block can put a hook point
    between each: editing the logits changes the probabilities, editing the
    probabilities (or the selection scores) changes the selection.

    With `cfg.router_selection_bias` it also holds `selection_bias` [n_experts] (the hub's
    `mlp.gate.e_score_correction_bias`), which steers the choice of experts but not their weights.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        if cfg.router_bias:
            self.bias = nn.Parameter(torch.empty(cfg.n_experts))
        if cfg.router_selection_bias:
            self.selection_bias = nn.Parameter(torch.empty(cfg.n_experts))

    def logits(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... n_experts"]:
        """x W^T (+ `bias`), in float32 when `cfg.router_logits_float32` (else in the model dtype)."""
        bias = getattr(self, "bias", None)
        if self.cfg.router_logits_float32:
            return F.linear(x.float(), self.weight.float(), None if bias is None else bias.float())
        return F.linear(x, self.weight, bias)

    def probs(self, logits: Float[torch.Tensor, "... n_experts"]) -> Float[torch.Tensor, "... n_experts"]:
        """Softmax (or sigmoid, `cfg.router_scoring`) in float32 or in the logits' dtype, as `cfg.router_dtype` says."""
        dtype = torch.float32 if self.cfg.router_dtype == "float32" else logits.dtype
        if self.cfg.router_scoring == "sigmoid":
            return torch.sigmoid(logits.to(dtype))
        return F.softmax(logits, dim=-1, dtype=dtype)

    def route(
        self, x: Float[torch.Tensor, "... d_model"]
    ) -> tuple[Int[torch.Tensor, "... k"], Float[torch.Tensor, "... k"]]:
        """The whole routing of `x` without hook points in between (logits -> probs ->
        selection scores -> top-k), for code that predicts routing, such as the expert store's
        read-ahead; the MoE block runs the same steps with a hook point between each."""
        logits = self.logits(x)
        probs = self.probs(logits)
        return self.select(logits, probs, self.selection_scores(logits, probs), x.dtype)

    def selection_scores(
        self, logits: Float[torch.Tensor, "... n_experts"], probs: Float[torch.Tensor, "... n_experts"]
    ) -> Float[torch.Tensor, "... n_experts"]:
        """What the top-k ranks: `probs` (+ `selection_bias`), and -inf where a logit is -inf.

        An expert whose logit is -inf is thus never chosen, whatever its bias or its group
        (this is how `ablate_experts(mode="reroute")` masks an expert out).
        """
        scores = probs + self.selection_bias.to(probs.dtype) if self.cfg.router_selection_bias else probs
        return scores.masked_fill(logits == float("-inf"), float("-inf"))

    def select(
        self,
        logits: Float[torch.Tensor, "... n_experts"],
        probs: Float[torch.Tensor, "... n_experts"],
        selection_scores: Float[torch.Tensor, "... n_experts"],
        model_dtype: torch.dtype,
    ) -> tuple[Int[torch.Tensor, "... k"], Float[torch.Tensor, "... k"]]:
        """Top-k expert ids by selection score (slot 0 = highest) and their weights, in
        float32 with `cfg.topk_weights_float32`, else in `model_dtype`.

        The weights are the chosen experts' `probs`, renormalised to sum to one when
        `cfg.norm_topk_prob`, or with `cfg.router_topk_softmax` the softmax of their `logits`;
        then times `cfg.routed_scaling_factor`.
        """
        indices = self.eligible(selection_scores).topk(self.cfg.top_k, dim=-1).indices
        if self.cfg.router_topk_softmax:
            weights = F.softmax(logits.gather(-1, indices), dim=-1)  # in the logits' dtype
        else:
            weights = probs.gather(-1, indices)
            if self.cfg.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + self.cfg.norm_topk_eps)
        dtype = torch.float32 if self.cfg.topk_weights_float32 else model_dtype
        return indices, (weights * self.cfg.routed_scaling_factor).to(dtype)

    def eligible(self, scores: Float[torch.Tensor, "... n_experts"]) -> Float[torch.Tensor, "... n_experts"]:
        """`scores` with -inf outside each token's `cfg.topk_groups` best expert groups.

        A group's rank is its best score ("max") or the sum of its two best ("top2_sum"), as
        `cfg.group_score` says. With one group every expert stays eligible.
        """
        cfg = self.cfg
        if cfg.topk_groups == cfg.n_expert_groups:
            return scores
        grouped = scores.unflatten(-1, (cfg.n_expert_groups, -1))  # [... group expert_in_group]
        if cfg.group_score == "max":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        kept = group_scores.topk(cfg.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, kept, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)
