"""Tiny random DeepSeek-V2 / V3 models from transformers, saved in the hub layout, as parity references."""

from __future__ import annotations

import torch
from hf_models import BASE, perturb_, set_eager_experts
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

MLA = dict(
    num_key_value_heads=4,
    intermediate_size=24,
    moe_intermediate_size=12,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    q_lora_rank=12,
    kv_lora_rank=10,
    qk_nope_head_dim=6,
    qk_rope_head_dim=4,
    v_head_dim=5,
)
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=16,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=0.707,
)


def deepseek_v2_config(**overrides) -> DeepseekV2Config:
    return DeepseekV2Config(**(BASE | MLA | overrides))


def deepseek_v3_config(**overrides) -> DeepseekV3Config:
    return DeepseekV3Config(**(BASE | MLA | dict(n_group=4, topk_group=2, routed_scaling_factor=2.5) | overrides))


def build_deepseek(config, seed: int = 0) -> torch.nn.Module:
    """A tiny random DeepSeek-V2/V3 model (eager kernels) with perturbed norms and, for V3, a non-zero
    `e_score_correction_bias` comparable to the sigmoid scores (so that it changes which experts win)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    cls = DeepseekV2ForCausalLM if config.model_type == "deepseek_v2" else DeepseekV3ForCausalLM
    model = cls(config)
    model.set_attn_implementation("eager")
    set_eager_experts(model)
    perturb_(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator))
    return model.eval()
