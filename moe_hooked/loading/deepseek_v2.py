"""DeepSeek-V2 and V2-Lite (`model_type` "deepseek_v2", e.g. deepseek-ai/DeepSeek-V2-Lite).

As transformers' `DeepseekV2ForCausalLM` computes them:

- attention is multi-head latent attention (`MLAttention`): queries from `q_proj`, or from
  `q_a_proj` -> `q_a_layernorm` -> `q_b_proj` when `q_lora_rank` is set; keys and values from
  `kv_a_proj_with_mqa` (latent of width `kv_lora_rank` + one shared rotary key part of width
  `qk_rope_head_dim`) -> `kv_a_layernorm` -> `kv_b_proj`; rotary on interleaved pairs,
  computed in float32 (as complex numbers) and cast back; with YaRN (`rope_scaling` type
  "yarn") the softmax scale is multiplied by mscale(factor, mscale_all_dim)^2;
- layer i is a MoE block iff `i >= first_k_dense_replace` (and `i % moe_layer_freq == 0`, as
  the checkpoints' own code says; transformers ignores `moe_layer_freq`, which is 1 in every
  released checkpoint); the others are dense SwiGLU MLPs of width `intermediate_size`;
- the router computes its logits and softmax in float32 and takes the top
  `num_experts_per_tok` of `n_routed_experts`: "greedy" over all experts, or
  "group_limited_greedy" within the `topk_group` of `n_group` groups whose best expert scores
  highest; the weights are the softmax probabilities times `routed_scaling_factor`, never
  renormalised (transformers does not apply `norm_topk_prob` to V2; neither does this module),
  and stay in float32 to scale the experts' outputs;
- `n_shared_experts` shared experts are one SwiGLU MLP of width
  `n_shared_experts * moe_intermediate_size` (`mlp.shared_experts`).
"""

from __future__ import annotations

from transformers import DeepseekV2Config, PretrainedConfig

from moe_hooked.components.rotary import yarn_mscale
from moe_hooked.config import MoEConfig
from moe_hooked.loading import llama_like
from moe_hooked.loading.errors import UnsupportedArchitectureError
from moe_hooked.loading.llama_like import Target

MODEL_TYPE = "deepseek_v2"
PREPENDS_BOS = True
TOPK_METHODS = {"greedy", "group_limited_greedy"}


def check_mla_config(hf: PretrainedConfig) -> None:
    """Refuse, naming each, the options of a DeepSeek-V2/V3 config that this module does not compute."""
    problems = []
    if hf.attention_bias:
        problems.append("attention_bias true")
    if getattr(hf, "mlp_bias", False):
        problems.append("mlp_bias true")
    if hf.num_key_value_heads != hf.num_attention_heads:
        problems.append(f"num_key_value_heads {hf.num_key_value_heads} != num_attention_heads {hf.num_attention_heads}")
    if not hf.n_shared_experts:
        problems.append("no shared experts (n_shared_experts 0)")
    if problems:
        raise UnsupportedArchitectureError(
            f"this '{hf.model_type}' config has {'; '.join(problems)}, which moe_hooked does not support"
        )


def attention_scale(cfg_fields: dict, qk_head_dim: int) -> float:
    """The softmax scale of MLA: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN.

    (YaRN's own cos/sin factor is applied by `RotaryEmbedding`; DeepSeek corrects the scale too.)"""
    yarn = cfg_fields.get("rope_yarn") or {}
    mscale = yarn_mscale(yarn["factor"], yarn["mscale_all_dim"]) if yarn.get("mscale_all_dim") else 1.0
    return qk_head_dim**-0.5 * mscale * mscale


def mla_fields(hf: PretrainedConfig, raw: dict) -> dict:
    """The `MoEConfig` fields DeepSeek-V2 and V3 share: sizes, MLA attention, layer kinds, shared experts."""
    check_mla_config(hf)
    qk_head_dim = hf.qk_nope_head_dim + hf.qk_rope_head_dim
    moe_layer_freq = raw.get("moe_layer_freq") or 1
    rope = llama_like.rope_fields(hf.to_dict())
    return dict(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_key_value_heads=hf.num_attention_heads,
        d_head=qk_head_dim,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        **rope,
        eps=hf.rms_norm_eps,
        tie_word_embeddings=hf.tie_word_embeddings,
        act_fn=hf.hidden_act,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
        n_experts=hf.n_routed_experts,
        top_k=hf.num_experts_per_tok,
        d_expert=hf.moe_intermediate_size,
        moe_layers=tuple(
            layer
            for layer in range(hf.num_hidden_layers)
            if layer >= hf.first_k_dense_replace and layer % moe_layer_freq == 0
        ),
        d_mlp=hf.intermediate_size,
        d_shared_expert=hf.n_shared_experts * hf.moe_intermediate_size,
        router_dtype="float32",
        router_logits_float32=True,
        topk_weights_float32=True,
        routed_scaling_factor=float(hf.routed_scaling_factor),
        attention_type="mla",
        q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=hf.kv_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim,
        qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
        attn_scale=attention_scale(rope, qk_head_dim),
        default_prepend_bos=PREPENDS_BOS,
        original_config=raw,
    )


def config_from_hf(raw: dict) -> MoEConfig:
    hf = DeepseekV2Config.from_dict(raw)
    if hf.topk_method not in TOPK_METHODS:
        raise UnsupportedArchitectureError(
            f"deepseek_v2 topk_method '{hf.topk_method}' is not supported: use one of {sorted(TOPK_METHODS)}"
        )
    grouped = hf.topk_method == "group_limited_greedy"
    return MoEConfig(
        architecture=MODEL_TYPE,
        **mla_fields(hf, raw),
        n_expert_groups=hf.n_group if grouped else 1,
        topk_groups=hf.topk_group if grouped else 1,
        group_score="max",
        rope_interleaved=True,
        rope_float32=True,
    )


def mla_attention_names(cfg: MoEConfig, hub: str, ours: str) -> dict[str, Target]:
    """The hub names of `MLAttention`'s weights (`self_attn.q_proj` or `q_a_proj`/`q_a_layernorm`/`q_b_proj`, ...)."""
    hub, ours = hub + "self_attn.", ours + "attn."
    if cfg.q_lora_rank is None:
        names = {hub + "q_proj.weight": Target(ours + "w_q")}
    else:
        names = {
            hub + "q_a_proj.weight": Target(ours + "w_q_a"),
            hub + "q_a_layernorm.weight": Target(ours + "q_a_norm.w"),
            hub + "q_b_proj.weight": Target(ours + "w_q_b"),
        }
    return names | {
        hub + "kv_a_proj_with_mqa.weight": Target(ours + "w_kv_a"),
        hub + "kv_a_layernorm.weight": Target(ours + "kv_a_norm.w"),
        hub + "kv_b_proj.weight": Target(ours + "w_kv_b"),
        hub + "o_proj.weight": Target(ours + "w_o"),
    }


MOE_WEIGHTS = llama_like.PER_EXPERT_SWIGLU | llama_like.swiglu_names("mlp.shared_experts.", "mlp.shared_expert.")
"""A MoE layer's router, routed experts and shared experts (always present in V2/V3)."""


def weight_names(cfg: MoEConfig) -> dict[str, Target]:
    return llama_like.weight_names(cfg, MOE_WEIGHTS, attention_names=mla_attention_names)
