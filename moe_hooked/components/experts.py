"""The routed experts: stacked SwiGLU weights and a grouped (per-expert) dispatch."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from moe_hooked.components.mlp import activation
from moe_hooked.config import MoEConfig

HiddenEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(pre, pre_linear) [n k d_expert] -> post [n k d_expert]."""


class Experts(nn.Module):
    """`n_experts` SwiGLU experts stored stacked.

    `W_gate`, `W_up` [n_experts, d_expert, d_model], `W_down` [n_experts, d_model, d_expert]
    (per expert the hub's [out, in] layout).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.act = activation(cfg.act_fn)
        self.W_gate = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert, cfg.d_model))
        self.W_up = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert, cfg.d_model))
        self.W_down = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_expert))

    @property
    def W_in(self) -> Float[torch.Tensor, "n_experts d_model d_expert"]:
        """TransformerLens layout of `W_up` (a view)."""
        return self.W_up.transpose(-2, -1)

    @property
    def W_gate_in(self) -> Float[torch.Tensor, "n_experts d_model d_expert"]:
        """TransformerLens layout of `W_gate` (a view; `W_gate` itself is the hub layout)."""
        return self.W_gate.transpose(-2, -1)

    @property
    def W_out(self) -> Float[torch.Tensor, "n_experts d_expert d_model"]:
        """TransformerLens layout of `W_down` (a view)."""
        return self.W_down.transpose(-2, -1)

    def expert(self, e: int, x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_model"]:
        """Expert `e` applied to the rows of `x`: its three stages composed."""
        return self.down(e, self.activate(*self.hidden(e, x)))

    def hidden(
        self, e: int, x: Float[torch.Tensor, "n d_model"]
    ) -> tuple[Float[torch.Tensor, "n d_expert"], Float[torch.Tensor, "n d_expert"]]:
        """Expert `e`'s input projections: (pre = x W_gate^T, pre_linear = x W_up^T)."""
        return F.linear(x, self.W_gate[e]), F.linear(x, self.W_up[e])

    def activate(
        self, pre: Float[torch.Tensor, "... d_expert"], pre_linear: Float[torch.Tensor, "... d_expert"]
    ) -> Float[torch.Tensor, "... d_expert"]:
        """The gated activation, post = act(pre) * pre_linear (the same for every expert)."""
        return self.act(pre) * pre_linear

    def down(self, e: int, post: Float[torch.Tensor, "n d_expert"]) -> Float[torch.Tensor, "n d_model"]:
        """Expert `e`'s output projection."""
        return F.linear(post, self.W_down[e])

    def forward(
        self,
        x: Float[torch.Tensor, "n d_model"],
        indices: Int[torch.Tensor, "n k"],
        weights: Float[torch.Tensor, "n k"],
        edit_hidden: HiddenEdit | None = None,
    ) -> Float[torch.Tensor, "n k d_model"]:
        """Unweighted output of the expert in each slot.

        Tokens are grouped by expert so that each expert runs once on all its tokens.
        Slots whose weight is zero are not computed and hold zeros.

        `edit_hidden(pre, pre_linear) -> post`, each [n k d_expert] (zeros in slots not
        computed), replaces `activate` when given: the experts then run in two passes (input
        projections of every slot, then `edit_hidden`, then the output projections), so that
        the caller sees and may edit the hidden activations of all slots at once.
        """
        self._check_range(indices)
        d_model, d_expert = self.cfg.d_model, self.cfg.d_expert
        if edit_hidden is None:
            return self._per_slot(self.expert, x, indices, weights, d_model)
        both = self._per_slot(lambda e, rows: torch.cat(self.hidden(e, rows), -1), x, indices, weights, 2 * d_expert)
        post = edit_hidden(*both.chunk(2, dim=-1))
        return self._per_slot(self.down, post, indices, weights, d_model, per_slot_input=True)

    def _per_slot(
        self,
        fn: Callable[[int, torch.Tensor], torch.Tensor],
        x: Float[torch.Tensor, "n d_in"] | Float[torch.Tensor, "n k d_in"],
        indices: Int[torch.Tensor, "n k"],
        weights: Float[torch.Tensor, "n k"],
        d_out: int,
        per_slot_input: bool = False,
    ) -> Float[torch.Tensor, "n k d_out"]:
        """`fn(e, rows)` -> [rows d_out] on the rows of every slot whose weight is nonzero,
        grouped by expert; zeros in the other slots. The rows are `x`'s token rows, or with
        `per_slot_input` the slot rows of `x` [n k d_in]."""
        n, k = indices.shape
        active = (weights != 0).flatten().nonzero().squeeze(1)  # flat slot ids
        expert_of_slot = indices.flatten()[active]
        order = torch.argsort(expert_of_slot, stable=True)
        slots = active[order]
        counts = torch.bincount(expert_of_slot, minlength=self.cfg.n_experts).tolist()
        grouped_in = x.flatten(0, 1)[slots] if per_slot_input else x[slots // k]
        chunks = [fn(e, rows) for e, rows in enumerate(grouped_in.split(counts)) if rows.shape[0]]
        grouped_out = torch.cat(chunks) if chunks else grouped_in.new_zeros(0, d_out)
        if slots.numel() == n * k:  # every slot computed: undo the sort with one gather
            return grouped_out[torch.argsort(slots)].view(n, k, -1)
        out = grouped_out.new_zeros(n * k, grouped_out.shape[-1])
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
