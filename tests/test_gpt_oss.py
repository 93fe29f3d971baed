"""gpt-oss specifics: the clamped SwiGLU, MXFP4 expert weights, attention sinks, refused variants.

Parity of whole tiny models with transformers is in `test_family_parity.py`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from families import gpt_oss_config, random_mxfp4, save_mxfp4_gpt_oss
from hf_models import build_hf, save_hf
from safetensors.torch import load_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from moe_hooked import HookedMoETransformer, UnsupportedArchitectureError
from moe_hooked.components.mlp import clamped_swiglu
from moe_hooked.loading import mxfp4
from moe_hooked.loading.export import hub_state_dict


def test_clamped_swiglu_by_hand():
    gate, up = torch.tensor([10.0, -3.0, 0.5]), torch.tensor([-9.0, 2.0, 8.0])
    limit, alpha = 7.0, 1.702
    expected = [
        (-7.0 + 1) * 7.0 / (1 + math.exp(-alpha * 7.0)),  # gate clamped at 7, up at -7
        (2.0 + 1) * -3.0 / (1 + math.exp(alpha * 3.0)),  # no clamp (gate has no lower limit)
        (7.0 + 1) * 0.5 / (1 + math.exp(-alpha * 0.5)),  # up clamped at 7
    ]
    assert torch.allclose(clamped_swiglu(gate, up, limit, alpha), torch.tensor(expected), atol=1e-6)


def test_clamped_swiglu_matches_transformers_on_interleaved_columns():
    experts = GptOssExperts(gpt_oss_config(swiglu_limit=0.7, swiglu_alpha=1.3))
    gate_up = 2 * torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(experts._apply_gate(gate_up), clamped_swiglu(gate_up[:, 0::2], gate_up[:, 1::2], 0.7, 1.3))


def test_mxfp4_dequantization_matches_transformers():
    blocks, scales = random_mxfp4((3, 10, 2), seed=0)
    ours = mxfp4.dequantize(blocks, scales)
    assert ours.shape == mxfp4.dequantized_shape(tuple(blocks.shape)) == (3, 64, 10)
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))


def test_mxfp4_checkpoint_streams_dequantized_experts(tmp_path):
    """An MXFP4 checkpoint (gate_up_proj / down_proj as *_blocks + *_scales) gives the logits of
    the HF model holding transformers' dequantization of the same blocks."""
    hf = save_mxfp4_gpt_oss(tmp_path)
    ours = HookedMoETransformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    return HookedMoETransformer.from_pretrained(save_hf(build_hf(gpt_oss_config()), tmp_path_factory.mktemp("gpt_oss")))


def test_pattern_rows_sum_to_one_minus_the_sink_share(gpt_oss):
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    _, cache = gpt_oss.run_with_cache(tokens)
    scores, sinks = cache["attn_scores", 0], cache["blocks.0.attn.hook_sinks"]
    assert sinks.shape == (2, gpt_oss.cfg.n_heads, 9, 1)
    sink_share = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1)[..., -1]
    assert 0.01 < sink_share.min() and sink_share.max() < 0.99
    assert torch.allclose(cache["pattern", 0].sum(-1), 1 - sink_share, atol=1e-6)


def test_hooking_the_sinks_to_minus_infinity_removes_them(gpt_oss):
    """With every sink logit at -inf the sinks take no attention: each layer's pattern is the
    plain causal (and sliding-window) softmax of its scores."""
    tokens = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    no_sink = lambda sinks, hook: torch.full_like(sinks, -math.inf)  # noqa: E731
    hooks = [(f"blocks.{layer}.attn.hook_sinks", no_sink) for layer in range(gpt_oss.cfg.n_layers)]
    with gpt_oss.hooks(fwd_hooks=hooks):
        _, cache = gpt_oss.run_with_cache(tokens)
    for layer in range(gpt_oss.cfg.n_layers):
        assert torch.allclose(cache["pattern", layer], torch.softmax(cache["attn_scores", layer], dim=-1), atol=1e-6)


def test_clamp_is_active_in_the_tiny_configs(gpt_oss):
    """The tiny configs' swiglu_limit clamps some gate values, so parity covers the clamp."""
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    _, cache = gpt_oss.run_with_cache(tokens)
    experts = gpt_oss.blocks[0].mlp.experts
    x = gpt_oss.blocks[0].ln2(cache["resid_mid", 0]).flatten(0, 1)
    gate = torch.einsum("nd,efd->nef", x, experts.W_gate) + experts.b_gate
    assert (gate > gpt_oss.cfg.swiglu_limit).float().mean() > 0.05


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_types": ["chunked_attention", "full_attention", "full_attention"]}, r"layer_types \['chunked_attention'\]"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization 'bitsandbytes'"),
    ],
)
def test_unsupported_variants_are_refused_by_name(tmp_path, change, message):
    folder = save_hf(build_hf(gpt_oss_config()), tmp_path / "ckpt")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | change))
    with pytest.raises(UnsupportedArchitectureError, match=message):
        HookedMoETransformer.from_pretrained(folder)


def test_export_writes_the_fused_interleaved_tensors_back(tmp_path):
    folder = save_hf(build_hf(gpt_oss_config()), tmp_path / "ckpt")
    ours = HookedMoETransformer.from_pretrained(folder)
    exported = hub_state_dict(ours, json.loads((folder / "config.json").read_text()))
    original = load_file(folder / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[key], original[key]) for key in original)
