"""`MoEActivationCache`: TransformerLens's activation cache with the MoE hook shorthands."""

from __future__ import annotations

import torch
from transformer_lens import ActivationCache

from moe_hooked import attribution
from moe_hooked.hook_names import MOE_HOOKS, get_act_name


class MoEActivationCache(ActivationCache):
    """TransformerLens's `ActivationCache`, also resolving MoE shorthands such as
    `cache["router_logits", 3]` to `blocks.3.mlp.hook_router_logits`."""

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple) and isinstance(key[0], str):
            layer = key[1] if len(key) > 1 else None
            if isinstance(layer, int) and layer < 0:
                layer += self.model.cfg.n_layers
            key = get_act_name(key[0], layer, *key[2:])
        return super().__getitem__(key)

    # ------------------------------------------------------------------ per expert (see attribution.py)
    def expert_output(self, layer: int, expert: int, weighted: bool = False) -> torch.Tensor:
        """Expert `expert`'s output [batch pos d_model] at MoE layer `layer`, by expert id
        (zero where not selected); `weighted`: times its routing weight."""
        return attribution.expert_output(self, layer, expert, weighted)

    def expert_selected(self, layer: int, expert: int) -> torch.Tensor:
        """[batch pos] True where MoE layer `layer` routed the token to `expert`."""
        return attribution.expert_selected(self, layer, expert)

    def decompose_resid_by_expert(self, layer: int | None = None, pos_slice=None, apply_ln: bool = False, return_labels: bool = False):
        """The residual stream as embed, attention, dense MLPs, each routed expert and the shared
        expert per layer: see `moe_hooked.attribution.decompose_resid_by_expert`."""
        return attribution.decompose_resid_by_expert(self, layer, pos_slice, apply_ln, return_labels)

    def stack_neuron_results(self, layer: int, pos_slice=None, neuron_slice=None, return_labels: bool = False, **kwargs):
        """TransformerLens's `stack_neuron_results` for dense and MoE blocks (routed and shared
        expert neurons): see `moe_hooked.attribution.stack_neuron_results`."""
        return attribution.stack_neuron_results(self, layer, pos_slice, neuron_slice, return_labels, **kwargs)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> torch.Tensor:
        """TransformerLens's `stack_activation`; a MoE hook name ("router_logits", "expert_out",
        ...) stacks the MoE layers below `layer` only: entry i is layer `cfg.moe_layers[i]`."""
        if activation_name not in MOE_HOOKS:
            return super().stack_activation(activation_name, layer, sublayer_type)
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        return torch.stack([self[(activation_name, moe)] for moe in self.model.cfg.moe_layers if moe < layer])
