"""Hub tensor names shared by the Llama-derived MoE families (OLMoE, Qwen-MoE, DeepSeekMoE).

A weight map sends each hub key to a `Target`: a parameter of `HookedMoETransformer`
and, for stacked expert weights, the expert index to fill.
"""

from __future__ import annotations

from typing import NamedTuple

from moe_hooked.config import MoEConfig
from moe_hooked.loading.errors import UnsupportedArchitectureError

class Target(NamedTuple):
    param: str
    expert: int | None = None


def weight_names(cfg: MoEConfig, shared_expert: str | None = None, shared_gate: str | None = None) -> dict[str, Target]:
    """Every hub key a checkpoint of this architecture holds, mapped to its destination.

    `shared_expert` is the hub's name of the shared-expert MLP under `mlp.` (e.g.
    "shared_expert" or "shared_experts"); `shared_gate` the name of its gate linear.
    """
    names = {
        "model.embed_tokens.weight": Target("embed.W_E"),
        "model.norm.weight": Target("unembed.gain"),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = Target("unembed.weight")
    for layer in range(cfg.n_layers):
        names |= _block_names(cfg, layer, shared_expert, shared_gate)
    return names


def _block_names(cfg: MoEConfig, layer: int, shared_expert: str | None, shared_gate: str | None) -> dict[str, Target]:
    hub, ours = f"model.layers.{layer}.", f"blocks.{layer}."
    names = {
        hub + "input_layernorm.weight": Target(ours + "ln1.w"),
        hub + "post_attention_layernorm.weight": Target(ours + "ln2.w"),
    }
    for proj in "qkvo":
        names[f"{hub}self_attn.{proj}_proj.weight"] = Target(f"{ours}attn.w_{proj}")
    if cfg.qkv_bias:
        for proj in "qkv":
            names[f"{hub}self_attn.{proj}_proj.bias"] = Target(f"{ours}attn.b_{proj}")
    if cfg.qk_norm:
        for proj in "qk":
            names[f"{hub}self_attn.{proj}_norm.weight"] = Target(f"{ours}attn.{proj}_norm.w")
    if not cfg.is_moe_layer(layer):
        return names | _mlp_names(hub + "mlp.", ours + "mlp.")
    names[hub + "mlp.gate.weight"] = Target(ours + "mlp.router.weight")
    for expert in range(cfg.n_experts):
        for proj, param in (("gate", "W_gate"), ("up", "W_up"), ("down", "W_down")):
            names[f"{hub}mlp.experts.{expert}.{proj}_proj.weight"] = Target(f"{ours}mlp.experts.{param}", expert)
    if shared_expert:
        names |= _mlp_names(f"{hub}mlp.{shared_expert}.", ours + "mlp.shared_expert.")
    if shared_gate:
        names[f"{hub}mlp.{shared_gate}.weight"] = Target(ours + "mlp.w_shared_gate")
    return names


def _mlp_names(hub: str, ours: str) -> dict[str, Target]:
    return {f"{hub}{proj}_proj.weight": Target(f"{ours}w_{proj}") for proj in ("gate", "up", "down")}


def rope_theta(hf_config) -> float:
    """RoPE base of a transformers config; only plain (unscaled) RoPE is supported."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedArchitectureError(f"RoPE scaling '{rope_type}' is not supported yet; only plain RoPE is")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
