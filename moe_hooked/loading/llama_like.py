"""Hub tensor names shared by the Llama-derived MoE families (attention, norms, dense MLPs).

A weight map sends each hub key to a `Target`: a parameter of `HookedMoETransformer`
and, for stacked expert weights, the expert index to fill. What differs between families
(how a MoE layer names its router and experts) is data of each family module, passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from moe_hooked.components.rotary import YARN_KEYS
from moe_hooked.config import MoEConfig
from moe_hooked.loading.errors import UnsupportedArchitectureError

class Target(NamedTuple):
    """Where (part of) one hub tensor goes: parameter `param`, its expert `expert` if set.

    `interleave` (offset, step) takes every step-th column of the hub tensor's last dim from
    `offset` (gpt-oss's fused gate_up_proj: gate (0, 2), up (1, 2)); `transpose` swaps the
    last two dims (hub tensors stored [in, out]). Both are views, so exporting writes back
    through the same view (`checkpoint.hub_view`).
    """

    param: str
    expert: int | None = None
    interleave: tuple[int, int] | None = None
    transpose: bool = False


WeightMap = Mapping[str, "Target | tuple[Target, ...]"]
"""Hub names under a layer's prefix (`model.layers.{l}.`) -> our names under `blocks.{l}.`
(a tuple when one hub tensor fills several parameters). A `{e}` in a hub name stands for
each routed-expert index: the target then fills that expert of its stacked parameter."""

PER_EXPERT_SWIGLU: WeightMap = {
    "mlp.gate.weight": Target("mlp.router.weight"),
    "mlp.experts.{e}.gate_proj.weight": Target("mlp.experts.W_gate"),
    "mlp.experts.{e}.up_proj.weight": Target("mlp.experts.W_up"),
    "mlp.experts.{e}.down_proj.weight": Target("mlp.experts.W_down"),
}
"""The router and routed experts as OLMoE, Qwen-MoE and DeepSeekMoE name them: one
`{gate,up,down}_proj` per expert under `mlp.experts.{e}`, the router `mlp.gate`."""


def swiglu_names(hub: str, ours: str) -> dict[str, Target]:
    """A dense SwiGLU MLP `{hub}{gate,up,down}_proj.weight` -> `{ours}w_{gate,up,down}`."""
    return {f"{hub}{proj}_proj.weight": Target(f"{ours}w_{proj}") for proj in ("gate", "up", "down")}


AttentionNames = Callable[[MoEConfig, str, str], dict[str, Target]]
"""(cfg, hub prefix of a layer, our prefix of a block) -> the attention's weight names."""


def weight_names(
    cfg: MoEConfig, moe: WeightMap, attention_names: AttentionNames | None = None
) -> dict[str, Target | tuple[Target, ...]]:
    """Every hub key a checkpoint of this architecture holds, mapped to its destination.

    `moe` is the family's map of a MoE layer's MLP weights (router, experts, shared expert);
    `attention_names` names the attention's weights (default: Llama's, `llama_attention_names`);
    norms and the dense MLP of non-MoE layers are named alike in every family.
    """
    names = {
        "model.embed_tokens.weight": Target("embed.W_E"),
        "model.norm.weight": Target("unembed.gain"),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = Target("unembed.weight")
    for layer in range(cfg.n_layers):
        names |= _block_names(cfg, layer, moe, attention_names or llama_attention_names)
    return names


def _block_names(
    cfg: MoEConfig, layer: int, moe: WeightMap, attention_names: AttentionNames
) -> dict[str, Target | tuple[Target, ...]]:
    hub, ours = f"model.layers.{layer}.", f"blocks.{layer}."
    names = {
        hub + "input_layernorm.weight": Target(ours + "ln1.w"),
        hub + "post_attention_layernorm.weight": Target(ours + "ln2.w"),
    } | attention_names(cfg, hub, ours)
    if not cfg.is_moe_layer(layer):
        return names | swiglu_names(hub + "mlp.", ours + "mlp.")
    for hub_name, targets in moe.items():
        experts = range(cfg.n_experts) if "{e}" in hub_name else [None]
        for expert in experts:
            placed = tuple(t._replace(param=ours + t.param, expert=expert) for t in as_targets(targets))
            names[hub + hub_name.format(e=expert)] = placed if len(placed) > 1 else placed[0]
    return names


def as_targets(value: Target | tuple[Target, ...]) -> tuple[Target, ...]:
    """The targets of one weight-map entry (a single `Target` or a tuple of them)."""
    return (value,) if isinstance(value, Target) else tuple(value)


def llama_attention_names(cfg: MoEConfig, hub: str, ours: str) -> dict[str, Target]:
    """Llama's `self_attn.{q,k,v,o}_proj` (+ q/k/v and o biases, sinks and q/k norms where the config says)."""
    names = {f"{hub}self_attn.{proj}_proj.weight": Target(f"{ours}attn.w_{proj}") for proj in "qkvo"}
    if cfg.qkv_bias:
        for proj in "qkv":
            names[f"{hub}self_attn.{proj}_proj.bias"] = Target(f"{ours}attn.b_{proj}")
    if cfg.o_bias:
        names[f"{hub}self_attn.o_proj.bias"] = Target(f"{ours}attn.b_o")
    if cfg.attn_sinks:
        names[f"{hub}self_attn.sinks"] = Target(f"{ours}attn.sinks")
    if cfg.qk_norm:
        for proj in "qk":
            names[f"{hub}self_attn.{proj}_norm.weight"] = Target(f"{ours}attn.{proj}_norm.w")
    return names


def common_fields(hf: Mapping) -> dict:
    """The `MoEConfig` fields every Llama-derived config.json spells the same way.

    `hf` is the config as a dict with the family's defaults filled in.
    """
    heads = hf["num_attention_heads"]
    return dict(
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_key_value_heads=hf.get("num_key_value_heads") or heads,
        d_head=hf.get("head_dim") or hf["hidden_size"] // heads,
        d_vocab=hf["vocab_size"],
        n_ctx=hf["max_position_embeddings"],
        **rope_fields(hf),
        eps=hf["rms_norm_eps"],
        tie_word_embeddings=hf["tie_word_embeddings"],
        act_fn=hf["hidden_act"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def sliding_window_fields(window: int | None, layers: Iterable[int]) -> dict:
    """`sliding_window` and `sliding_window_layers` for a window (None: none) on `layers`."""
    return dict(sliding_window=window, sliding_window_layers=tuple(layers) if window else ())


def rope_fields(hf: Mapping) -> dict:
    """`rope_theta` and `rope_yarn` of a config dict: plain RoPE or YaRN, nothing else.

    Raises `UnsupportedArchitectureError` naming any other RoPE scaling type, or a YaRN
    parameter `RotaryEmbedding` does not read.
    """
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return dict(rope_theta=theta)
    if rope_type != "yarn":
        raise UnsupportedArchitectureError(
            f"RoPE scaling '{rope_type}' (rope_type in config.json's rope_parameters) is not supported: "
            "moe_hooked implements plain RoPE and 'yarn'"
        )
    unknown = sorted(params.keys() - YARN_KEYS - {"type"})
    if unknown:
        raise UnsupportedArchitectureError(f"YaRN RoPE parameters {unknown} are not supported (known: {sorted(YARN_KEYS)})")
    yarn = {key: params[key] for key in sorted(YARN_KEYS - {"rope_type", "rope_theta"}) if key in params}
    yarn.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    if yarn.get("factor") is None:
        yarn["factor"] = hf["max_position_embeddings"] / yarn["original_max_position_embeddings"]
    return dict(rope_theta=theta, rope_yarn=yarn)
