"""Qwen3-MoE (`model_type` "qwen3_moe", e.g. Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B).

Differences from Llama: RMSNorm on each head's queries and keys (over d_head, after the
head split, before rotary); `attention_bias` on q/k/v and o; router softmax in float32,
top-k renormalised when `norm_topk_prob`; dense layers where `mlp_only_layers` or
`decoder_sparse_step` say; no shared expert; a sliding window on every layer when
`use_sliding_window`.
"""

from __future__ import annotations

from transformers import Qwen3MoeConfig

from moe_hooked.config import MoEConfig
from moe_hooked.loading import llama_like, qwen2_moe

MODEL_TYPE = "qwen3_moe"
PREPENDS_BOS = False
MOE_WEIGHTS = llama_like.PER_EXPERT_SWIGLU


def config_from_hf(raw: dict) -> MoEConfig:
    hf = Qwen3MoeConfig.from_dict(raw)
    return MoEConfig(
        architecture=MODEL_TYPE,
        **llama_like.common_fields(hf.to_dict()),
        n_experts=hf.num_experts,
        top_k=hf.num_experts_per_tok,
        d_expert=hf.moe_intermediate_size,
        moe_layers=qwen2_moe.moe_layers(hf),
        d_mlp=hf.intermediate_size,
        norm_topk_prob=hf.norm_topk_prob,
        router_dtype="float32",
        qkv_bias=hf.attention_bias,
        o_bias=hf.attention_bias,
        qk_norm=True,
        qk_norm_per_head=True,
        **llama_like.sliding_window_fields(hf.sliding_window, range(hf.num_hidden_layers)),
        default_prepend_bos=PREPENDS_BOS,
        original_config=raw,
    )


def weight_names(cfg: MoEConfig) -> dict[str, llama_like.Target]:
    return llama_like.weight_names(cfg, MOE_WEIGHTS)
