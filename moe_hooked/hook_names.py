"""Hook-name shorthands: TransformerLens's, plus the MoE hook points under `blocks.{l}.mlp.`;
and the errors for names that do not exist, with the closest existing ones suggested."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from moe_hooked._tl import get_act_name as tl_get_act_name

MOE_HOOKS = (
    "router_logits",
    "router_probs",
    "selection_scores",
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
TL_SHORTHANDS = (
    "embed", "pos_embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_in", "mlp_in",
    "q_input", "k_input", "v_input", "k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores",
    "pre", "post", "mid", "pre_linear", "scale", "normalized",
    "attn", "attn_logits", "key", "query", "value", "mlp_pre", "mlp_mid", "mlp_post",  # TransformerLens's aliases
)
"""The shorthands TransformerLens's `get_act_name` resolves (names and aliases)."""
_MOE_HOOK_NAME = re.compile(r"blocks\.(\d+)\.mlp\.hook_(\w+)")


class HookNameError(KeyError):
    """A hook name that does not exist (in the model or the cache); the message suggests close ones."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0])


MLA_HOOKS = ("q_latent", "kv_latent", "k_rope")
"""Multi-head latent attention's own hook points, under `blocks.{l}.attn.`."""


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Full hook name for a shorthand, e.g. ("router_logits", 3) -> "blocks.3.mlp.hook_router_logits".

    MLA shorthands ("q_latent", "kv_latent", "k_rope") resolve under `blocks.{l}.attn.`.
    Names that are not MoE shorthands are resolved by TransformerLens's `get_act_name`
    (so "resid_mid", "pattern", "scale" with "ln2", ... work as there); an unknown shorthand
    raises `HookNameError` with the closest known ones.
    """
    for shorthands, module, kind in ((MOE_HOOKS, "mlp", "MoE"), (MLA_HOOKS, "attn", "attention")):
        if name in shorthands:
            if layer is None:
                raise ValueError(f"'{name}' is a per-layer {kind} hook: give a layer index")
            return f"blocks.{layer}.{module}.hook_{name}"
    is_full_name = ("." in name or name.startswith("hook_")) and layer is None and layer_type is None
    shorthand = re.match(r"[a-z_]+?(?=\d|$)", name)
    if not is_full_name and (shorthand is None or shorthand.group(0) not in TL_SHORTHANDS):
        raise HookNameError(f"unknown activation name '{name}'{_suggest(name, MOE_HOOKS + MLA_HOOKS + TL_SHORTHANDS)}")
    return tl_get_act_name(name, layer, layer_type)


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def unknown_hook_error(name: str, known: Iterable[str], moe_layers: Sequence[int], where: str = "this model") -> HookNameError:
    """The error for a hook `name` that is not among `known` (the hook names of `where`).

    A MoE hook asked for at a dense layer says so and lists the MoE layers; anything else
    lists the closest known names.
    """
    moe = _MOE_HOOK_NAME.fullmatch(name)
    if moe and moe.group(2) in MOE_HOOKS and int(moe.group(1)) not in moe_layers:
        return HookNameError(
            f"'{name}' does not exist: layer {moe.group(1)} is dense (an MLP without a router), "
            f"so it has no MoE hooks; the MoE layers are {list(moe_layers)}"
        )
    return HookNameError(f"'{name}' is not a hook point of {where}{_suggest(name, known)}")


class HookPointNames(dict):
    """`HookedRootModule.mod_dict` / `hook_dict`, with a helpful `HookNameError` for unknown names."""

    def __init__(self, entries: dict, moe_layers: Sequence[int]):
        super().__init__(entries)
        self.moe_layers = list(moe_layers)

    def __missing__(self, name: str):
        raise unknown_hook_error(name, (n for n in self if "hook_" in n), self.moe_layers)
