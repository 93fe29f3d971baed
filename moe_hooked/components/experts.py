"""The routed experts: stacked SwiGLU weights and a grouped (per-expert) dispatch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from moe_hooked.components.mlp import activation, clamped_swiglu
from moe_hooked.config import MoEConfig

if TYPE_CHECKING:  # the store builds on Experts, not the other way round
    from moe_hooked.components.expert_store import ExpertStore

HiddenEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(pre, pre_linear) [n k d_expert] -> post [n k d_expert]."""


def linear_then_bias(
    x: Float[torch.Tensor, "n d_in"],
    weight: Float[torch.Tensor, "d_out d_in"],
    bias: Float[torch.Tensor, " d_out"] | None,
) -> Float[torch.Tensor, "n d_out"]:
    """x W^T, then + bias as a second step (rounded twice in low precision, as gpt-oss's
    reference computes its experts; a fused `F.linear(x, W, b)` rounds once)."""
    out = F.linear(x, weight)
    return out if bias is None else out + bias


class Experts(nn.Module):
    """`n_experts` SwiGLU experts stored stacked.

    `W_gate`, `W_up` [n_experts, d_expert, d_model], `W_down` [n_experts, d_model, d_expert]
    (per expert the hub's [out, in] layout); with `cfg.expert_bias` also `b_gate`, `b_up`
    [n_experts, d_expert] and `b_down` [n_experts, d_model]. The hidden state is act(gate) * up,
    or gpt-oss's clamped SwiGLU when `cfg.swiglu_limit` is set.

    Offloaded (`offload`), the stacked weights and their views `W_in`, `W_gate_in`, `W_out` are
    gone (reading them raises an `AttributeError` that says so) and `weights(e)` comes from an
    `ExpertStore`, which reads each selected expert from the checkpoint on demand;
    `expert_weights(e)` reads one expert's weights in both cases.
    """

    PARAMS = ("W_gate", "W_up", "W_down")
    """The stacked per-expert weight matrices, each [n_experts, ...]."""
    BIASES = ("b_gate", "b_up", "b_down")
    """Their biases, present when `cfg.expert_bias` (gpt-oss)."""
    VIEWS = {"W_in": "W_up", "W_gate_in": "W_gate", "W_out": "W_down"}
    """TransformerLens-layout views (transposed) of the stacked parameters."""

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
        must be resident, as it is inside `forward`; see `expert_weights` outside it)."""
        if self.store is not None:
            return self.store.weights(self.store_name, e)
        return {name: getattr(self, name)[e] for name in self.param_names}

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Copies of expert `e`'s weights by parameter name, in memory or offloaded (then read
        through the store, which counts the read in its statistics), at any time.

        Hub layout, as the parameters: `W_gate`, `W_up` [d_expert d_model], `W_down`
        [d_model d_expert]; with `cfg.expert_bias` also `b_gate`, `b_up` [d_expert] and `b_down`
        [d_model]. `W_in[e]` is `expert_weights(e)["W_up"].T` (likewise `W_gate_in`, `W_out`).
        Editing the copies changes nothing in the model.
        """
        e = self.cfg.check_expert(e)
        with self._resident([e]):
            return {name: w.detach().clone() for name, w in self.weights(e).items()}

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        try:
            return super().__getattr__(name)
        except AttributeError:
            offloaded = self.__dict__.get("store") is not None
            if offloaded and (name in self.param_names or name in self.VIEWS):
                raise AttributeError(self._offloaded_message(name)) from None
            raise

    def _offloaded_message(self, name: str) -> str:
        param = self.VIEWS.get(name, name)
        one = f'expert_weights(e)["{param}"]' + (".T" if name in self.VIEWS else "")
        return (
            f"{self.store_name}.{name}: the routed experts of this model are offloaded (loaded with "
            f"expert_memory=...), so their stacked weights are not in memory. Read one expert's weights with "
            f"{self.store_name}.expert_weights(e) (copies; {name}[e] is {one}), or load the model "
            "without expert_memory to have the stacked weights"
        )

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
        """Expert `e`'s input projections: (pre = x W_gate^T [+ b_gate], pre_linear = x W_up^T [+ b_up])."""
        w = self.weights(e)
        return linear_then_bias(x, w["W_gate"], w.get("b_gate")), linear_then_bias(x, w["W_up"], w.get("b_up"))

    def activate(
        self, pre: Float[torch.Tensor, "... d_expert"], pre_linear: Float[torch.Tensor, "... d_expert"]
    ) -> Float[torch.Tensor, "... d_expert"]:
        """The gated activation (the same for every expert): post = act(pre) * pre_linear, or
        gpt-oss's clamped SwiGLU when `cfg.swiglu_limit` is set."""
        if self.cfg.swiglu_limit is None:
            return self.act(pre) * pre_linear
        return clamped_swiglu(pre, pre_linear, self.cfg.swiglu_limit, self.cfg.swiglu_alpha)

    def down(self, e: int, post: Float[torch.Tensor, "n d_expert"]) -> Float[torch.Tensor, "n d_model"]:
        """Expert `e`'s output projection (+ b_down)."""
        w = self.weights(e)
        return linear_then_bias(post, w["W_down"], w.get("b_down"))

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
            return self._per_slot(lambda e, rows: (self.expert(e, rows),), x, indices, weights, (d_model,))[0]
        pre, pre_linear = self._per_slot(self.hidden, x, indices, weights, (d_expert, d_expert))
        post = edit_hidden(pre, pre_linear)
        return self._per_slot(lambda e, rows: (self.down(e, rows),), post, indices, weights, (d_model,), True)[0]

    def _per_slot(
        self,
        fn: Callable[[int, torch.Tensor], tuple[torch.Tensor, ...]],
        x: Float[torch.Tensor, "n d_in"] | Float[torch.Tensor, "n k d_in"],
        indices: Int[torch.Tensor, "n k"],
        weights: Float[torch.Tensor, "n k"],
        d_outs: tuple[int, ...],
        per_slot_input: bool = False,
    ) -> tuple[Float[torch.Tensor, "n k d_out"], ...]:
        """`fn(e, rows)` -> one [rows d_out] tensor per entry of `d_outs`, on the rows of every
        slot whose weight is nonzero, grouped by expert; zeros in the other slots. The rows are
        `x`'s token rows, or with `per_slot_input` the slot rows of `x` [n k d_in]. Each expert's
        results are copied straight into their slots of the outputs."""
        n, k = indices.shape
        active = (weights != 0).flatten().nonzero().squeeze(1)  # flat slot ids
        expert_of_slot = indices.flatten()[active]
        slots = active[torch.argsort(expert_of_slot, stable=True)]
        counts = torch.bincount(expert_of_slot, minlength=self.cfg.n_experts).tolist()
        grouped_in = x.flatten(0, 1).index_select(0, slots) if per_slot_input else x.index_select(0, slots // k)
        rows, slots_of = dict(enumerate(grouped_in.split(counts))), dict(enumerate(slots.split(counts)))
        used = [e for e, count in enumerate(counts) if count]  # experts with no non-zero weight are never read
        new = x.new_empty if slots.numel() == n * k else x.new_zeros
        outs = tuple(new(n * k, d_out) for d_out in d_outs)
        groups = self._groups(used)
        for group in groups:
            with self._resident(group):
                if self.store is not None and len(groups) == 1 and not per_slot_input:  # room beside this layer
                    self.store.prefetch_next(self.store_name, x)
                for e in group:
                    for out, result in zip(outs, fn(e, rows[e])):
                        out.index_copy_(0, slots_of[e], result)
        return tuple(out.view(n, k, -1) for out in outs)

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
