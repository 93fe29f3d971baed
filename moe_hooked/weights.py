"""TransformerLens's weight API on `HookedMoETransformer` (a mixin): attention weights stacked
[layer head ...], the QK and OV circuits as `FactoredMatrix`es, and the (zero) output biases.

Layouts, as in TransformerLens: `W_Q`, `W_K`, `W_V` [layer head d_model d_head], `W_O`
[layer head d_head d_model], `b_Q`, `b_K`, `b_V` [layer head d_head], `b_O` [layer d_model].
With grouped-query attention `W_K`, `W_V`, `b_K`, `b_V` are repeated to one per query head
(as TransformerLens does); `blocks[l].attn.W_K` keeps one per key/value head. The circuits
ignore rotary (as TransformerLens's do).

MLP weights are per block, in TransformerLens's [in, out] layout: a dense block's
`blocks[l].mlp.W_in`, `W_gate` [d_model d_mlp] and `W_out` [d_mlp d_model] (likewise the shared
expert, `blocks[l].mlp.shared_expert`); the routed experts' `blocks[l].mlp.experts.W_in`,
`W_gate_in` [n_experts d_model d_expert] and `W_out` [n_experts d_expert d_model] (views of the
hub-layout parameters `W_up`, `W_gate`, `W_down`). A model loaded with `expert_memory` has no
stacked expert weights: `blocks[l].mlp.experts.expert_weights(e)` reads one expert's.
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from moe_hooked._tl import FactoredMatrix


class TransformerLensWeights:
    """Mixed into `HookedMoETransformer` (which provides `cfg` and `blocks`)."""

    def _stack(self, per_block) -> torch.Tensor:
        return torch.stack([per_block(block.attn) for block in self.blocks])

    def _per_query_head(self, kv_heads: torch.Tensor) -> torch.Tensor:
        return kv_heads.repeat_interleave(self.cfg.n_heads // self.cfg.n_key_value_heads, dim=0)

    def _bias(self, attn, name: str, n: int) -> Float[torch.Tensor, "n_heads d_head"]:
        bias = getattr(attn, name, None)
        if bias is None:
            return attn.w_q.new_zeros(n, self.cfg.d_head)
        return bias.view(n, self.cfg.d_head)

    @property
    def W_Q(self) -> Float[torch.Tensor, "layer head d_model d_head"]:
        return self._stack(lambda attn: attn.W_Q)

    @property
    def W_K(self) -> Float[torch.Tensor, "layer head d_model d_head"]:
        return self._stack(lambda attn: self._per_query_head(attn.W_K))

    @property
    def W_V(self) -> Float[torch.Tensor, "layer head d_model d_head"]:
        return self._stack(lambda attn: self._per_query_head(attn.W_V))

    @property
    def W_O(self) -> Float[torch.Tensor, "layer head d_head d_model"]:
        return self._stack(lambda attn: attn.W_O)

    @property
    def b_Q(self) -> Float[torch.Tensor, "layer head d_head"]:
        return self._stack(lambda attn: self._bias(attn, "b_q", self.cfg.n_heads))

    @property
    def b_K(self) -> Float[torch.Tensor, "layer head d_head"]:
        return self._stack(lambda attn: self._per_query_head(self._bias(attn, "b_k", self.cfg.n_key_value_heads)))

    @property
    def b_V(self) -> Float[torch.Tensor, "layer head d_head"]:
        return self._stack(lambda attn: self._per_query_head(self._bias(attn, "b_v", self.cfg.n_key_value_heads)))

    @property
    def b_O(self) -> Float[torch.Tensor, "layer d_model"]:
        """The attention output bias (gpt-oss's `o_proj.bias`), zero where the model has none."""
        zeros = self.W_O.new_zeros(self.cfg.d_model)
        return torch.stack([getattr(block.attn, "b_o", zeros) for block in self.blocks])

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q W_K^T per layer and head: [layer head d_model d_model] (rotary not included)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """W_V W_O per layer and head: [layer head d_model d_model]."""
        return FactoredMatrix(self.W_V, self.W_O)
