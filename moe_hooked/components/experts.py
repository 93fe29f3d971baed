"""The routed experts: stacked SwiGLU weights and a grouped (per-expert) dispatch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from moe_hooked.components.mlp import activation, clamped_swiglu
from moe_hooked.config import MoEConfig


class Experts(nn.Module):
    """`n_experts` SwiGLU experts stored stacked.

    `W_gate`, `W_up` [n_experts, d_expert, d_model], `W_down` [n_experts, d_model, d_expert]
    (per expert the hub's [out, in] layout); with `cfg.expert_bias` also `b_gate`, `b_up`
    [n_experts, d_expert] and `b_down` [n_experts, d_model]. The hidden state is act(gate) * up,
    or gpt-oss's clamped SwiGLU when `cfg.swiglu_limit` is set.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.act = activation(cfg.act_fn)
        self.W_gate = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert, cfg.d_model))
        self.W_up = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert, cfg.d_model))
        self.W_down = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_expert))
        if cfg.expert_bias:
            self.b_gate = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert))
            self.b_up = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert))
            self.b_down = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))

    def expert(self, e: int, x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_model"]:
        """Expert `e` applied to the rows of `x`."""
        bias = self.cfg.expert_bias
        gate = F.linear(x, self.W_gate[e], self.b_gate[e] if bias else None)
        up = F.linear(x, self.W_up[e], self.b_up[e] if bias else None)
        if self.cfg.swiglu_limit is None:
            hidden = self.act(gate) * up
        else:
            hidden = clamped_swiglu(gate, up, self.cfg.swiglu_limit, self.cfg.swiglu_alpha)
        return F.linear(hidden, self.W_down[e], self.b_down[e] if bias else None)

    def forward(
        self,
        x: Float[torch.Tensor, "n d_model"],
        indices: Int[torch.Tensor, "n k"],
        weights: Float[torch.Tensor, "n k"],
    ) -> Float[torch.Tensor, "n k d_model"]:
        """Unweighted output of the expert in each slot.

        Tokens are grouped by expert so that each expert runs once on all its tokens.
        Slots whose weight is zero are not computed and hold zeros.
        """
        n, k = indices.shape
        self._check_range(indices)
        active = (weights != 0).flatten().nonzero().squeeze(1)  # flat slot ids
        expert_of_slot = indices.flatten()[active]
        order = torch.argsort(expert_of_slot, stable=True)
        slots = active[order]
        counts = torch.bincount(expert_of_slot, minlength=self.cfg.n_experts).tolist()
        grouped_in = x[slots // k]
        grouped_out = torch.empty_like(grouped_in)
        start = 0
        for e, count in enumerate(counts):
            if count:
                grouped_out[start : start + count] = self.expert(e, grouped_in[start : start + count])
                start += count
        if slots.numel() == n * k:  # every slot computed: undo the sort with one gather
            return grouped_out[torch.argsort(slots)].view(n, k, -1)
        out = x.new_zeros(n * k, x.shape[-1])
        out[slots] = grouped_out
        return out.view(n, k, -1)

    def forward_all(self, x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n n_experts d_model"]:
        """Every expert on every token (memory: n * n_experts * d_model values)."""
        return torch.stack([self.expert(e, x) for e in range(self.cfg.n_experts)], dim=1)

    def _check_range(self, indices: torch.Tensor) -> None:
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.cfg.n_experts):
            bad = indices[(indices < 0) | (indices >= self.cfg.n_experts)].unique().tolist()
            raise ValueError(
                f"expert ids {bad} are out of range: valid ids are 0..{self.cfg.n_experts - 1} "
                "(check hooks that edit hook_topk_indices)"
            )
