"""DeepSeekMoE v1 (`model_type` "deepseek", e.g. deepseek-ai/deepseek-moe-16b-base and -chat).

Llama attention (no bias, no GQA in the released models, rotate-half RoPE) with
DeepSeekMoE's MLPs:

- layer i is a MoE block iff `i >= first_k_dense_replace` and `i % moe_layer_freq == 0`;
  the other layers are dense SwiGLU MLPs of width `intermediate_size`
  (`mlp.{gate,up,down}_proj`);
- a MoE block routes to `num_experts_per_tok` of `n_routed_experts` SwiGLU experts of
  width `moe_intermediate_size` (router `mlp.gate`): weights = top-k of
  softmax(x W_r^T), not renormalised unless `norm_topk_prob` (then w / (sum w + 1e-20),
  and only when top-k > 1), no scaling factor;
- its `n_shared_experts` shared experts are one ungated SwiGLU MLP of width
  `n_shared_experts * moe_intermediate_size` (`mlp.shared_experts`), added to the routed
  sum and exposed as `hook_shared_out`.

Router precision: the original code computes the router softmax in the model dtype
(no upcast), and so does this module (`cfg.router_dtype == "model"`). In bfloat16
that picks different experts than float32 for a fraction of tokens. To compute the
router probabilities and top-k weights in float32 instead (the logits x W_r^T stay in
the model dtype), load with::

    HookedMoETransformer.from_pretrained(name, dtype="bfloat16", router_dtype="float32")

transformers has no config class for DeepSeekMoE v1 (the checkpoints ship remote
code that no longer imports under transformers 5), so `config_from_hf` reads the raw
config.json, taking absent keys from `DEFAULTS` (the defaults of that remote
`DeepseekConfig`). Only the v1 variant is implemented; see `SUPPORTED`.
"""

from __future__ import annotations

from moe_hooked.config import MoEConfig
from moe_hooked.loading import llama_like
from moe_hooked.loading.errors import UnsupportedArchitectureError

MODEL_TYPE = "deepseek"
PREPENDS_BOS = True
NORM_TOPK_EPS = 1e-20

DEFAULTS = dict(
    vocab_size=102400,
    hidden_size=4096,
    intermediate_size=11008,
    moe_intermediate_size=1407,
    num_hidden_layers=30,
    num_attention_heads=32,
    num_key_value_heads=None,
    n_shared_experts=None,
    n_routed_experts=None,
    num_experts_per_tok=None,
    moe_layer_freq=1,
    first_k_dense_replace=0,
    norm_topk_prob=False,
    scoring_func="softmax",
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    pad_token_id=None,
    bos_token_id=100000,
    eos_token_id=100001,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    rope_scaling=None,
    attention_bias=False,
)

SUPPORTED = (
    "moe_hooked supports DeepSeekMoE v1 (e.g. deepseek-ai/deepseek-moe-16b-base): softmax scoring, greedy "
    "top-k, routed_scaling_factor 1, multi-head attention without bias, plain RoPE. A DeepSeek-V2/V3 "
    "checkpoint (multi-head latent attention, grouped or sigmoid routing) says model_type 'deepseek_v2' or "
    "'deepseek_v3' in its config.json and loads through those families"
)


def _check_variant(raw: dict) -> None:
    """Raise `UnsupportedArchitectureError` for any config that is not DeepSeekMoE v1."""
    problems = []
    if raw["scoring_func"] != "softmax":
        problems.append(f"scoring_func '{raw['scoring_func']}'")
    if raw.get("topk_method", "greedy") != "greedy":
        problems.append(f"topk_method '{raw['topk_method']}'")
    if raw.get("routed_scaling_factor", 1.0) != 1.0:
        problems.append(f"routed_scaling_factor {raw['routed_scaling_factor']}")
    for key in ("kv_lora_rank", "q_lora_rank"):
        if raw.get(key) is not None:
            problems.append(f"{key} {raw[key]} (multi-head latent attention)")
    if raw["rope_scaling"] is not None:
        problems.append(f"rope_scaling {raw['rope_scaling']}")
    if raw["attention_bias"]:
        problems.append("attention_bias true")
    if raw["n_routed_experts"] is None or raw["num_experts_per_tok"] is None:
        problems.append("no n_routed_experts / num_experts_per_tok (a dense model)")
    if problems:
        raise UnsupportedArchitectureError(f"this 'deepseek' config has {'; '.join(problems)}. {SUPPORTED}.")


def _moe_layers(raw: dict) -> tuple[int, ...]:
    return tuple(
        layer
        for layer in range(raw["num_hidden_layers"])
        if layer >= raw["first_k_dense_replace"] and layer % raw["moe_layer_freq"] == 0
    )


def config_from_hf(raw: dict) -> MoEConfig:
    hf = DEFAULTS | raw
    _check_variant(hf)
    top_k, n_shared = hf["num_experts_per_tok"], hf["n_shared_experts"]
    return MoEConfig(
        architecture=MODEL_TYPE,
        **llama_like.common_fields(hf),
        n_experts=hf["n_routed_experts"],
        top_k=top_k,
        d_expert=hf["moe_intermediate_size"],
        moe_layers=_moe_layers(hf),
        d_mlp=hf["intermediate_size"],
        norm_topk_prob=bool(hf["norm_topk_prob"]) and top_k > 1,
        norm_topk_eps=NORM_TOPK_EPS,
        router_dtype="model",
        d_shared_expert=n_shared * hf["moe_intermediate_size"] if n_shared else None,
        default_prepend_bos=PREPENDS_BOS,
        original_config=raw,
    )


SHARED_EXPERT_WEIGHTS = llama_like.swiglu_names("mlp.shared_experts.", "mlp.shared_expert.")


def weight_names(cfg: MoEConfig) -> dict[str, llama_like.Target]:
    shared = SHARED_EXPERT_WEIGHTS if cfg.d_shared_expert else {}
    return llama_like.weight_names(cfg, llama_like.PER_EXPERT_SWIGLU | shared)
