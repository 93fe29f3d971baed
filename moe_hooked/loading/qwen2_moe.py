"""Qwen1.5-MoE / Qwen2-MoE (`model_type` "qwen2_moe", e.g. Qwen/Qwen1.5-MoE-A2.7B).

Differences from Llama: q/k/v bias; a shared expert whose output is multiplied by
sigmoid(x W_g) (`mlp.shared_expert_gate`); dense layers where `mlp_only_layers` or
`decoder_sparse_step` say; router softmax in float32.
"""

from __future__ import annotations

from transformers import Qwen2MoeConfig

from moe_hooked.config import MoEConfig
from moe_hooked.loading import llama_like
from moe_hooked.loading.errors import UnsupportedArchitectureError

MODEL_TYPE = "qwen2_moe"
PREPENDS_BOS = False


def moe_layers(hf: Qwen2MoeConfig) -> tuple[int, ...]:
    """The MoE layers of a Qwen-MoE config (also Qwen3-MoE): not in `mlp_only_layers`, every `decoder_sparse_step`-th."""
    return tuple(
        layer
        for layer in range(hf.num_hidden_layers)
        if layer not in hf.mlp_only_layers and hf.num_experts > 0 and (layer + 1) % hf.decoder_sparse_step == 0
    )


def config_from_hf(raw: dict) -> MoEConfig:
    hf = Qwen2MoeConfig.from_dict(raw)
    if hf.use_sliding_window:
        raise UnsupportedArchitectureError("qwen2_moe with use_sliding_window=true is not supported yet")
    return MoEConfig(
        architecture=MODEL_TYPE,
        **llama_like.common_fields(hf.to_dict()),
        n_experts=hf.num_experts,
        top_k=hf.num_experts_per_tok,
        d_expert=hf.moe_intermediate_size,
        moe_layers=moe_layers(hf),
        d_mlp=hf.intermediate_size,
        norm_topk_prob=hf.norm_topk_prob,
        router_dtype="float32",
        d_shared_expert=hf.shared_expert_intermediate_size or None,
        shared_expert_gated=bool(hf.shared_expert_intermediate_size),
        qkv_bias=hf.qkv_bias,
        default_prepend_bos=PREPENDS_BOS,
        original_config=raw,
    )


SHARED_EXPERT_WEIGHTS = llama_like.swiglu_names("mlp.shared_expert.", "mlp.shared_expert.") | {
    "mlp.shared_expert_gate.weight": llama_like.Target("mlp.w_shared_gate")
}


def weight_names(cfg: MoEConfig) -> dict[str, llama_like.Target]:
    shared = SHARED_EXPERT_WEIGHTS if cfg.d_shared_expert else {}
    return llama_like.weight_names(cfg, llama_like.PER_EXPERT_SWIGLU | shared)
