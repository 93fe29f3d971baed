"""RoPE and YaRN scaling against transformers' own rope functions, and refusal of other scalings."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import build_hf, qwen2_moe_config, save_hf
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moe_hooked import HookedMoETransformer, UnsupportedArchitectureError
from moe_hooked.components.rotary import RotaryEmbedding
from moe_hooked.loading.llama_like import rope_fields

YARN_CASES = {
    "gpt-oss": dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096),
    "deepseek-v3": dict(factor=40.0, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=4096),
    "mscale-ratio": dict(factor=16.0, mscale=0.707, mscale_all_dim=1.3, original_max_position_embeddings=2048),
    "attention-factor": dict(factor=4.0, attention_factor=0.8, beta_fast=8, beta_slow=2, original_max_position_embeddings=1024),
    "factor-from-lengths": dict(factor=None, original_max_position_embeddings=2048),
    "factor-below-one": dict(factor=0.5, original_max_position_embeddings=512),
}


def llama_config(yarn: dict, head_dim: int = 24) -> LlamaConfig:
    params = {"rope_type": "yarn", "rope_theta": 50000.0} | yarn
    return LlamaConfig(hidden_size=96, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=8192, rope_parameters=params)


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_matches_transformers(case):
    hf_config = llama_config(YARN_CASES[case])
    ref_inv_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    fields = rope_fields(hf_config.to_dict())
    rotary = RotaryEmbedding(24, fields["rope_theta"], fields["rope_yarn"])
    assert rotary.attention_factor == pytest.approx(ref_factor, rel=1e-12)
    assert torch.equal(rotary.inv_freq(torch.device("cpu")), ref_inv_freq)
    positions = torch.arange(300, dtype=torch.float32)
    angles = torch.outer(positions, ref_inv_freq).repeat(1, 2)
    cos, sin = rotary(300, torch.float32, torch.device("cpu"))
    assert torch.equal(cos, angles.cos() * ref_factor) and torch.equal(sin, angles.sin() * ref_factor)


def test_plain_rope_has_no_scaling():
    fields = rope_fields({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert fields == {"rope_theta": 1e6}
    assert RotaryEmbedding(8, 1e6).attention_factor == 1.0


def test_yarn_model_matches_transformers(tmp_path):
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8}
    hf = build_hf(qwen2_moe_config(rope_parameters=yarn))
    ours = HookedMoETransformer.from_pretrained(save_hf(hf, tmp_path / "yarn"))
    assert ours.cfg.rope_yarn["factor"] == 8.0
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, "RoPE scaling 'llama3'"),
        ({"type": "dynamic", "factor": 2.0}, "RoPE scaling 'dynamic'"),
        ({"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}, r"YaRN RoPE parameters \['partial_rotary_factor'\]"),
    ],
)
def test_unsupported_rope_scaling_is_refused_by_name(tmp_path, params, message):
    folder = save_hf(build_hf(qwen2_moe_config()), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"rope_parameters": {"rope_theta": 10000.0} | params}))
    with pytest.raises(UnsupportedArchitectureError, match=message):
        HookedMoETransformer.from_pretrained(folder)
