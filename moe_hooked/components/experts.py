"""The routed experts: stacked SwiGLU weights and a grouped (per-expert) dispatch."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from moe_hooked.components.mlp import activation, clamped_swiglu
from moe_hooked.config import MoEConfig

if TYPE_CHECKING:  # the store builds on Experts, not the other way round
    from moe_hooked.components.expert_store import ExpertStore


class Experts(nn.Module):
    """`n_experts` SwiGLU experts stored stacked.

    `W_gate`, `W_up` [n_experts, d_expert, d_model], `W_down` [n_experts, d_model, d_expert]
    (per expert the hub's [out, in] layout); with `cfg.expert_bias` also `b_gate`, `b_up`
    [n_experts, d_expert] and `b_down` [n_experts, d_model]. The hidden state is act(gate) * up,
    or gpt-oss's clamped SwiGLU when `cfg.swiglu_limit` is set.

    Offloaded (`offload`), the stacked weights are gone and `weights(e)` comes from an
    `ExpertStore`, which reads each selected expert from the checkpoint on demand.
    """

    PARAMS = ("W_gate", "W_up", "W_down")
    """The stacked per-expert weight matrices, each [n_experts, ...]."""
    BIASES = ("b_gate", "b_up", "b_down")
    """Their biases, present when `cfg.expert_bias` (gpt-oss)."""

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
        self.store: ExpertStore | None = None
        self.store_name = ""

    @property
    def param_names(self) -> tuple[str, ...]:
        """The stacked per-expert parameters of this model, each [n_experts, ...]."""
        return self.PARAMS + (self.BIASES if self.cfg.expert_bias else ())

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one expert's slice of each stacked parameter, e.g. {"W_gate": (d_expert, d_model)}."""
        return {name: tuple(getattr(self, name).shape[1:]) for name in self.param_names}

    def offload(self, store: ExpertStore, name: str) -> None:
        """Drop the stacked weights; read them from `store` (under this module's `name`) instead."""
        for param in self.param_names:
            delattr(self, param)
        self.store, self.store_name = store, name

    def weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert `e`'s weights by parameter name (from the store when offloaded: the expert
        must be resident, as it is inside `forward`)."""
        if self.store is not None:
            return self.store.weights(self.store_name, e)
        return {name: getattr(self, name)[e] for name in self.param_names}

    def expert(self, e: int, x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_model"]:
        """Expert `e` applied to the rows of `x`."""
        w = self.weights(e)
        gate = F.linear(x, w["W_gate"], w.get("b_gate"))
        up = F.linear(x, w["W_up"], w.get("b_up"))
        if self.cfg.swiglu_limit is None:
            hidden = self.act(gate) * up
        else:
            hidden = clamped_swiglu(gate, up, self.cfg.swiglu_limit, self.cfg.swiglu_alpha)
        return F.linear(hidden, w["W_down"], w.get("b_down"))

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
        starts = [0] + torch.tensor(counts).cumsum(0).tolist()
        grouped_in = x[slots // k]
        grouped_out = torch.empty_like(grouped_in)
        used = [e for e, count in enumerate(counts) if count]  # experts with no non-zero weight are never read
        groups = self._groups(used)
        for group in groups:
            with self._resident(group):
                if self.store is not None and len(groups) == 1:  # the budget has room beside this layer
                    self.store.prefetch_next(self.store_name, x)
                for e in group:
                    grouped_out[starts[e] : starts[e + 1]] = self.expert(e, grouped_in[starts[e] : starts[e + 1]])
        if slots.numel() == n * k:  # every slot computed: undo the sort with one gather
            return grouped_out[torch.argsort(slots)].view(n, k, -1)
        out = x.new_zeros(n * k, x.shape[-1])
        out[slots] = grouped_out
        return out.view(n, k, -1)

    def forward_all(self, x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n n_experts d_model"]:
        """Every expert on every token (memory: n * n_experts * d_model values)."""
        outs = {}
        for group in self._groups(range(self.cfg.n_experts)):
            with self._resident(group):
                outs |= {e: self.expert(e, x) for e in group}
        return torch.stack([outs[e] for e in range(self.cfg.n_experts)], dim=1)

    def _groups(self, experts: Sequence[int]) -> list[list[int]]:
        """`experts` in groups that can be resident together (one group when not offloaded)."""
        return [list(experts)] if self.store is None else self.store.groups(self.store_name, experts)

    def _resident(self, experts: list[int]) -> contextlib.AbstractContextManager:
        """Keep `experts` resident within the context (a no-op when not offloaded)."""
        if self.store is None:
            return contextlib.nullcontext()
        return self.store.resident(self.store_name, experts)

    def _check_range(self, indices: torch.Tensor) -> None:
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.cfg.n_experts):
            bad = indices[(indices < 0) | (indices >= self.cfg.n_experts)].unique().tolist()
            raise ValueError(
                f"expert ids {bad} are out of range: valid ids are 0..{self.cfg.n_experts - 1} "
                "(check hooks that edit hook_topk_indices)"
            )
