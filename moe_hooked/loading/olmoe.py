"""OLMoE (`model_type` "olmoe", e.g. allenai/OLMoE-1B-7B-0924).

Differences from Llama: RMSNorm on the projected q and k over their full width
(before the head split), optional q/k/v clipping, every layer MoE without a shared
expert, router softmax in float32, top-k without renormalisation unless
`norm_topk_prob`.
"""

from __future__ import annotations

from transformers import OlmoeConfig

from moe_hooked.config import MoEConfig
from moe_hooked.loading import llama_like

MODEL_TYPE = "olmoe"
PREPENDS_BOS = False


def config_from_hf(raw: dict) -> MoEConfig:
    hf = OlmoeConfig.from_dict(raw)
    return MoEConfig(
        architecture=MODEL_TYPE,
        **llama_like.common_fields(hf.to_dict()),
        n_experts=hf.num_experts,
        top_k=hf.num_experts_per_tok,
        d_expert=hf.intermediate_size,
        moe_layers=tuple(range(hf.num_hidden_layers)),
        norm_topk_prob=hf.norm_topk_prob,
        router_dtype="float32",
        qkv_bias=hf.attention_bias,
        qk_norm=True,
        clip_qkv=hf.clip_qkv,
        default_prepend_bos=PREPENDS_BOS,
        original_config=raw,
    )


MOE_WEIGHTS = llama_like.PER_EXPERT_SWIGLU


def weight_names(cfg: MoEConfig) -> dict[str, llama_like.Target]:
    return llama_like.weight_names(cfg, MOE_WEIGHTS)
