"""Every supported checkpoint family: how to build a tiny random reference model, and its parity configs.

`FAMILIES[name]` is a `Family`: `configs` maps a config name to a function returning a tiny
config (a transformers config, or a config.json dict for families transformers lacks),
`build(config, seed)` builds the reference model, `save(reference, config, folder)` writes
it in the family's hub layout. `tests/test_all_families.py` runs the hook table,
interventions, lenses and analyses on the first config of each family, so a family added
here gets all of them; its parity tests pick the configs they need by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import json

import torch
from deepseek_reference import build_reference, deepseek_config, write_checkpoint
from deepseek_v2_models import YARN, build_deepseek, deepseek_v2_config, deepseek_v3_config
from hf_models import BASE, build_hf, olmoe_config, qwen2_moe_config, save_hf
from safetensors.torch import load_file, save_file
from tiny import tiny_tokenizer
from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moe_hooked import HookedMoETransformer


@dataclass(frozen=True)
class Family:
    configs: Mapping[str, Callable[[], object]]
    build: Callable[[object, int], torch.nn.Module] = build_hf
    save: Callable[[torch.nn.Module, object, Path], Path] = lambda reference, config, folder: save_hf(reference, folder)
    hf_parity: bool = True
    """The reference is a transformers model (with `output_router_logits` and `attention_mask`)."""


def qwen3_moe_config(**overrides) -> Qwen3MoeConfig:
    kwargs = BASE | dict(
        num_key_value_heads=2, head_dim=6, intermediate_size=40, moe_intermediate_size=14,
        num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
    )
    return Qwen3MoeConfig(**(kwargs | overrides))


def mixtral_config(**overrides) -> MixtralConfig:
    kwargs = BASE | dict(num_key_value_heads=2, intermediate_size=18, num_local_experts=5, num_experts_per_tok=2)
    return MixtralConfig(**(kwargs | overrides))


def gpt_oss_config(**overrides) -> GptOssConfig:
    """A tiny gpt-oss: sliding and full layers, YaRN, a SwiGLU limit small enough to clamp these activations."""
    yarn = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 16}
    kwargs = BASE | dict(
        num_key_value_heads=2, head_dim=6, intermediate_size=10, num_local_experts=5, num_experts_per_tok=2,
        sliding_window=4, rope_parameters=yarn, swiglu_limit=0.15,
    )
    return GptOssConfig(**(kwargs | overrides))


def random_mxfp4(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [..., groups, 16] of random FP4 codes and scales [..., groups] around 2**-4."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(127 - 7, 127 - 2, shape, dtype=torch.uint8, generator=generator)
    return blocks, scales


def save_mxfp4_gpt_oss(folder: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny gpt-oss saved as the official checkpoints are: `gate_up_proj` and `down_proj` in MXFP4
    (`*_blocks` + `*_scales` of random codes), config with `quantization_config`. Returns the HF
    reference holding transformers' dequantization of the same blocks."""
    hf = build_hf(gpt_oss_config(intermediate_size=32, swiglu_limit=7.0), seed)  # MXFP4 groups: dims multiple of 32
    save_hf(hf, folder)
    tensors = load_file(folder / "model.safetensors")
    for layer, decoder_layer in enumerate(hf.model.layers):
        experts = decoder_layer.mlp.experts
        for i, (name, param) in enumerate((("gate_up_proj", experts.gate_up_proj), ("down_proj", experts.down_proj))):
            n_experts, d_in, d_out = param.shape
            blocks, scales = random_mxfp4((n_experts, d_out, d_in // 32), seed=100 * seed + 10 * layer + i)
            with torch.no_grad():
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            key = f"model.layers.{layer}.mlp.experts.{name}"
            del tensors[key]
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"quantization_config": {"quant_method": "mxfp4"}}))
    return hf


FAMILIES: dict[str, Family] = {
    "olmoe": Family({
        "olmoe": lambda: olmoe_config(),
        "olmoe-gqa-k1": lambda: olmoe_config(num_key_value_heads=2, num_experts_per_tok=1),
        "olmoe-normtopk": lambda: olmoe_config(norm_topk_prob=True, num_experts_per_tok=3),
        "olmoe-clip": lambda: olmoe_config(clip_qkv=0.4),
    }),
    "qwen2_moe": Family({
        "qwen2_moe": lambda: qwen2_moe_config(),
        "qwen2_moe-sparse-step-normtopk": lambda: qwen2_moe_config(mlp_only_layers=[], decoder_sparse_step=2, norm_topk_prob=True),
        "qwen2_moe-no-gqa-k1": lambda: qwen2_moe_config(num_key_value_heads=4, num_experts_per_tok=1, tie_word_embeddings=True),
    }),
    "deepseek": Family(
        {"deepseek": lambda: deepseek_config()},
        build=lambda config, seed: build_reference(config, seed),
        save=lambda reference, config, folder: write_checkpoint(reference, config, folder),
        hf_parity=False,
    ),
    "qwen3_moe": Family({
        "qwen3_moe": lambda: qwen3_moe_config(),
        "qwen3_moe-normtopk-k3-bias": lambda: qwen3_moe_config(norm_topk_prob=True, num_experts_per_tok=3, attention_bias=True),
        "qwen3_moe-k1-sparse-step": lambda: qwen3_moe_config(num_experts_per_tok=1, mlp_only_layers=[], decoder_sparse_step=2),
        "qwen3_moe-no-gqa-window": lambda: qwen3_moe_config(num_key_value_heads=4, use_sliding_window=True, sliding_window=5),
    }),
    "mixtral": Family({
        "mixtral": lambda: mixtral_config(),
        "mixtral-window": lambda: mixtral_config(sliding_window=4),
        "mixtral-k1-no-gqa": lambda: mixtral_config(num_experts_per_tok=1, num_key_value_heads=4),
        "mixtral-k3-tied": lambda: mixtral_config(num_experts_per_tok=3, tie_word_embeddings=True),
    }),
    "gpt_oss": Family({
        "gpt_oss": lambda: gpt_oss_config(),
        "gpt_oss-k1-alpha": lambda: gpt_oss_config(num_experts_per_tok=1, swiglu_alpha=0.9, swiglu_limit=0.08),
        "gpt_oss-k3-no-gqa-full": lambda: gpt_oss_config(
            num_experts_per_tok=3, num_key_value_heads=4, layer_types=["full_attention"] * 3),
        "gpt_oss-window-all": lambda: gpt_oss_config(sliding_window=6, layer_types=["sliding_attention"] * 3),
    }),
    "deepseek_v2": Family(
        {
            "v2-greedy-qlora": lambda: deepseek_v2_config(),
            "v2-grouped-no-qlora": lambda: deepseek_v2_config(
                topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=None,
                routed_scaling_factor=1.7, n_shared_experts=2, num_experts_per_tok=3,
            ),
            "v2-all-moe-k1": lambda: deepseek_v2_config(first_k_dense_replace=0, num_experts_per_tok=1),
            "v2-yarn": lambda: deepseek_v2_config(rope_parameters=YARN, n_shared_experts=2),
        },
        build=build_deepseek,
    ),
    "deepseek_v3": Family(
        {
            "v3-grouped-qlora": lambda: deepseek_v3_config(),
            "v3-yarn-halves": lambda: deepseek_v3_config(
                rope_parameters=YARN | dict(mscale=1.0, mscale_all_dim=0.8), rope_interleave=False
            ),
            "v3-no-qlora-halves-no-norm": lambda: deepseek_v3_config(
                q_lora_rank=None, rope_interleave=False, norm_topk_prob=False, first_k_dense_replace=0, n_shared_experts=2
            ),
            "v3-one-group-k3": lambda: deepseek_v3_config(
                n_group=1, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=2
            ),
        },
        build=build_deepseek,
    ),
}


def parity_configs(*families: str) -> dict[str, Callable[[], object]]:
    """The named parity configs of `families` (all of them when none are given)."""
    return {name: make for family in families or FAMILIES for name, make in FAMILIES[family].configs.items()}


def build_and_save(config_name: str, folder: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """The reference model of the named config, and the folder it was saved to."""
    family = next(f for f in FAMILIES.values() if config_name in f.configs)
    config = family.configs[config_name]()
    reference = family.build(config, seed)
    return reference, family.save(reference, config, folder)


def tiny_hooked(family: str, folder: Path, seed: int = 0) -> HookedMoETransformer:
    """The first config of `family`, saved into `folder` with `tiny.tiny_tokenizer` and loaded hooked."""
    _, saved = build_and_save(next(iter(FAMILIES[family].configs)), folder, seed)
    tiny_tokenizer(97).save_pretrained(str(saved))
    return HookedMoETransformer.from_pretrained(saved)
