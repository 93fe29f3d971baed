"""DeepSeek-V2 / V3 parity with transformers' `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`."""

from __future__ import annotations

import pytest
import torch
from deepseek_v2_models import deepseek_v2_config, deepseek_v3_config
from families import build_and_save, parity_configs

from moe_hooked import HookedMoETransformer
from moe_hooked.loading import UnsupportedArchitectureError, deepseek_v2, deepseek_v3

CONFIGS = parity_configs("deepseek_v2", "deepseek_v3")


def capture_routers(hf_model) -> tuple[dict[int, tuple], list]:
    """Each HF router's (logits, top-k weights, top-k indices), keyed by layer index."""
    captured, handles = {}, []
    for layer, decoder_layer in enumerate(hf_model.model.layers):
        gate = getattr(decoder_layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            handles.append(gate.register_forward_hook(lambda m, i, out, layer=layer: captured.__setitem__(layer, out)))
    return captured, handles


def by_expert_id(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots sorted by expert id, so that two routers that order their slots differently compare."""
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf, folder = build_and_save(request.param, tmp_path_factory.mktemp(request.param), seed=len(request.param))
    return hf, HookedMoETransformer.from_pretrained(folder)


def padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(3, vocab, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    return tokens, mask


def test_float32_logits_routing_and_hidden_states_match_with_padding(pair):
    hf, ours = pair
    tokens, mask = padded_batch(hf.config.vocab_size)
    real = mask.bool()
    captured, handles = capture_routers(hf)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        logits, cache = ours.run_with_cache(tokens, attention_mask=mask)
    for handle in handles:
        handle.remove()
    assert (ref.logits - logits)[real].abs().max() <= 1e-4
    for layer in range(ours.cfg.n_layers - 1):
        assert torch.allclose(ref.hidden_states[layer + 1][real], cache["resid_post", layer][real], atol=1e-5), layer
    for layer in range(ours.cfg.n_layers):  # [batch query head key] at the real queries: rotary and scale show here
        hf_pattern, pattern = ref.attentions[layer].transpose(1, 2)[real], cache["pattern", layer].transpose(1, 2)[real]
        assert torch.allclose(hf_pattern, pattern, atol=1e-6), layer
    assert set(captured) == set(ours.cfg.moe_layers)
    for layer, (hf_logits, hf_weights, hf_indices) in captured.items():
        flat_real = real.flatten()
        # at the real tokens: padding positions see themselves and count no rotary position (as in generate)
        assert torch.allclose(hf_logits[flat_real], cache["router_logits", layer][real], atol=1e-5), layer
        hf_ids, hf_w = by_expert_id(hf_indices[flat_real], hf_weights[flat_real])
        ids, w = by_expert_id(cache["topk_indices", layer][real], cache["topk_weights", layer][real])
        assert torch.equal(hf_ids, ids), layer
        assert torch.allclose(hf_w, w, atol=1e-6), layer


# ----------------------------------------------------------------------------- config translation
def v2_dict(**overrides) -> dict:
    return deepseek_v2_config(**overrides).to_dict()


def test_dense_layers_follow_first_k_dense_replace_and_moe_layer_freq():
    cfg = deepseek_v2.config_from_hf(v2_dict(num_hidden_layers=6, first_k_dense_replace=1) | {"moe_layer_freq": 2})
    assert cfg.moe_layers == (2, 4)
    assert deepseek_v2.config_from_hf(v2_dict(num_hidden_layers=4, first_k_dense_replace=1)).moe_layers == (1, 2, 3)


def test_v2_ignores_norm_topk_prob_as_transformers_does():
    assert not deepseek_v2.config_from_hf(v2_dict(norm_topk_prob=True)).norm_topk_prob


def test_v3_config_translation():
    cfg = deepseek_v3.config_from_hf(deepseek_v3_config(n_group=2, topk_group=1, routed_scaling_factor=2.5).to_dict())
    assert (cfg.router_scoring, cfg.router_selection_bias, cfg.group_score) == ("sigmoid", True, "top2_sum")
    assert (cfg.n_expert_groups, cfg.topk_groups, cfg.routed_scaling_factor, cfg.norm_topk_prob) == (2, 1, 2.5, True)
    assert cfg.attention_type == "mla" and cfg.rope_interleaved


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(attention_bias=True), "attention_bias true"),
        (dict(num_key_value_heads=2), "num_key_value_heads 2 != num_attention_heads 4"),
        (dict(n_shared_experts=0), "n_shared_experts 0"),
        (dict(topk_method="noaux_tc"), "topk_method 'noaux_tc'"),
        (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)), "RoPE scaling 'linear'"),
    ],
)
def test_unsupported_v2_options_are_refused_by_name(overrides, named):
    with pytest.raises(UnsupportedArchitectureError) as err:
        deepseek_v2.config_from_hf(v2_dict(**overrides))
    assert named in str(err.value)


def test_impossible_grouping_is_a_clear_error():
    with pytest.raises(ValueError, match="n_expert_groups \\(3\\) must divide n_experts \\(8\\)"):
        deepseek_v2.config_from_hf(v2_dict(topk_method="group_limited_greedy", n_group=3, topk_group=1))
    with pytest.raises(ValueError, match="top_k \\(3\\) exceeds the 1 x 2 experts"):
        deepseek_v2.config_from_hf(v2_dict(topk_method="group_limited_greedy", n_group=4, topk_group=1, num_experts_per_tok=3))
