"""Tiny random Hugging Face MoE models, saved in the real hub layout, as parity references."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, OlmoeConfig, Qwen2MoeConfig

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def olmoe_config(**overrides) -> OlmoeConfig:
    kwargs = BASE | dict(num_key_value_heads=4, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    return OlmoeConfig(**(kwargs | overrides))


def qwen2_moe_config(**overrides) -> Qwen2MoeConfig:
    kwargs = BASE | dict(
        num_key_value_heads=2,
        intermediate_size=40,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=20,
        num_experts=6,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
    )
    return Qwen2MoeConfig(**(kwargs | overrides))


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every norm gain and bias non-trivial values so that mis-mapped weights show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))
            elif name.endswith((".bias", "_bias", "sinks")):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("gate.weight", "router.weight")):  # routers: spread the logits so top-k is not a tie
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model


def build_hf(config, seed: int = 0, dtype=torch.float32):
    """A tiny random HF model with the eager reference kernels."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.set_attn_implementation("eager")
    set_eager_experts(model)
    return perturb_(model, seed).eval()


def set_eager_experts(model) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    else:
        model.config._experts_implementation = "eager"


def save_hf(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
