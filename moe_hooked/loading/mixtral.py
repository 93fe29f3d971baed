"""Mixtral (`model_type` "mixtral", e.g. mistralai/Mixtral-8x7B-v0.1, Mixtral-8x22B).

Differences from Llama: every layer is MoE, its MLP named `block_sparse_moe` with router
`gate` and experts `experts.{e}.w1` (gate), `w3` (up), `w2` (down); router softmax in
float32, top-k (2) always renormalised, the weights kept in float32; a sliding window on
every layer when the config sets `sliding_window`.
"""

from __future__ import annotations

from transformers import MixtralConfig

from moe_hooked.config import MoEConfig
from moe_hooked.loading import llama_like
from moe_hooked.loading.llama_like import Target

MODEL_TYPE = "mixtral"
PREPENDS_BOS = True
MOE_WEIGHTS = {
    "block_sparse_moe.gate.weight": Target("mlp.router.weight"),
    "block_sparse_moe.experts.{e}.w1.weight": Target("mlp.experts.W_gate"),
    "block_sparse_moe.experts.{e}.w3.weight": Target("mlp.experts.W_up"),
    "block_sparse_moe.experts.{e}.w2.weight": Target("mlp.experts.W_down"),
}


def routing_fields(hf: MixtralConfig) -> dict:
    """Mixtral's MoE fields (gpt-oss's too): `num_local_experts` experts of width
    `intermediate_size` in every layer, float32 softmax, top-k renormalised (the weights'
    dtype differs: `config_from_hf` sets Mixtral's)."""
    return dict(
        n_experts=hf.num_local_experts,
        top_k=hf.num_experts_per_tok,
        d_expert=hf.intermediate_size,
        moe_layers=tuple(range(hf.num_hidden_layers)),
        norm_topk_prob=True,
        router_dtype="float32",
    )


def config_from_hf(raw: dict) -> MoEConfig:
    hf = MixtralConfig.from_dict(raw)
    return MoEConfig(
        architecture=MODEL_TYPE,
        **llama_like.common_fields(hf.to_dict()),
        **routing_fields(hf),
        topk_weights_float32=True,
        **llama_like.sliding_window_fields(hf.sliding_window, range(hf.num_hidden_layers)),
        default_prepend_bos=PREPENDS_BOS,
        original_config=raw,
    )


def weight_names(cfg: MoEConfig) -> dict[str, llama_like.Target]:
    return llama_like.weight_names(cfg, MOE_WEIGHTS)
