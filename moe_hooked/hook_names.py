"""Hook-name shorthands: TransformerLens's, plus the MoE hook points under `blocks.{l}.mlp.`."""

from __future__ import annotations

from transformer_lens.utilities import get_act_name as tl_get_act_name

MOE_HOOKS = (
    "router_logits",
    "router_probs",
    "topk_indices",
    "topk_weights",
    "expert_pre",
    "expert_pre_linear",
    "expert_post",
    "expert_out",
    "all_expert_out",
    "routed_out",
    "shared_out",
    "shared_gate",
)


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Full hook name for a shorthand, e.g. ("router_logits", 3) -> "blocks.3.mlp.hook_router_logits".

    Names that are not MoE shorthands are resolved by TransformerLens's `get_act_name`
    (so "resid_mid", "pattern", "scale" with "ln2", ... work as there).
    """
    if name in MOE_HOOKS:
        if layer is None:
            raise ValueError(f"'{name}' is a per-layer MoE hook: give a layer index")
        return f"blocks.{layer}.mlp.hook_{name}"
    return tl_get_act_name(name, layer, layer_type)
