"""Per-expert attribution from the cache, on models whose first layers are dense and that have
shared experts (DeepSeekMoE, Qwen1.5-MoE): components sum to the residual stream and their
direct logit attributions to the logits; TransformerLens's cache helpers work."""

from __future__ import annotations

import pytest
import torch
from deepseek_reference import build_reference, deepseek_config, write_checkpoint
from hf_models import build_hf, qwen2_moe_config, save_hf

from moe_hooked import HookedMoETransformer


def _deepseek(folder):
    config = deepseek_config()
    return HookedMoETransformer.from_pretrained(write_checkpoint(build_reference(config, seed=3), config, folder))


def _qwen(folder):  # layer 1 dense (mlp_only_layers), gated shared expert
    return HookedMoETransformer.from_pretrained(save_hf(build_hf(qwen2_moe_config(), seed=2), folder))


@pytest.fixture(scope="module", params=["deepseek", "qwen2_moe"])
def run(request, tmp_path_factory):
    model = {"deepseek": _deepseek, "qwen2_moe": _qwen}[request.param](tmp_path_factory.mktemp(request.param))
    tokens = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


def test_expert_output_gathers_by_expert_id(run):
    model, _, _, cache = run
    layer = model.cfg.moe_layers[-1]
    indices, expert_out = cache["topk_indices", layer], cache["expert_out", layer]
    b, p, slot = 1, 3, 1
    e = int(indices[b, p, slot])
    assert torch.equal(cache.expert_output(layer, e)[b, p], expert_out[b, p, slot])
    assert cache.expert_selected(layer, e)[b, p]
    not_selected = ~cache.expert_selected(layer, e)
    assert (cache.expert_output(layer, e)[not_selected] == 0).all()
    routed = sum(cache.expert_output(layer, e, weighted=True) for e in range(model.cfg.n_experts))
    assert torch.allclose(routed, cache["routed_out", layer], atol=1e-6)
    with pytest.raises(ValueError, match="expert id 99 is out of range"):
        cache.expert_output(layer, 99)
    with pytest.raises(ValueError, match="is not a MoE layer"):
        cache.expert_output(next(l for l in range(model.cfg.n_layers) if not model.cfg.is_moe_layer(l)), 0)


def test_decomposition_by_expert_sums_to_the_residual_and_the_logits(run):
    model, tokens, logits, cache = run
    stack, labels = cache.decompose_resid_by_expert(return_labels=True)
    cfg = model.cfg
    per_layer = [2 if not cfg.is_moe_layer(l) else 1 + cfg.n_experts + bool(cfg.d_shared_expert) for l in range(cfg.n_layers)]
    assert len(labels) == stack.shape[0] == 1 + sum(per_layer)
    moe = cfg.moe_layers[0]
    assert f"L{moe}E{cfg.n_experts - 1}" in labels and f"L{moe}_shared" in labels
    assert torch.allclose(stack.sum(0), cache["resid_post", -1], atol=1e-5)
    # direct logit attribution per expert: LN-scaled components times the answer's W_U column
    answer = tokens[:, 1:]
    scaled = cache.decompose_resid_by_expert(pos_slice=slice(0, -1), apply_ln=True)
    attrs = (scaled * model.tokens_to_residual_directions(answer)).sum(-1)  # [component batch pos-1]
    assert torch.allclose(attrs.sum(0), logits[:, :-1].gather(-1, answer[..., None])[..., 0], atol=1e-4)
    expert_rows = [i for i, label in enumerate(labels) if label.startswith(f"L{moe}E")]
    assert torch.allclose(stack[expert_rows].sum(0), cache["routed_out", moe], atol=1e-6)


def test_decomposition_up_to_a_layer_sums_to_its_resid_pre(run):
    model, _, _, cache = run
    layer = model.cfg.n_layers - 1
    stack = cache.decompose_resid_by_expert(layer=layer, pos_slice=-1)
    assert torch.allclose(stack.sum(0), cache["resid_pre", layer][:, -1], atol=1e-5)


def test_neuron_results_and_full_decomposition_sum_to_the_residual(run):
    model, _, _, cache = run
    stack, labels = cache.stack_neuron_results(model.cfg.n_layers, return_labels=True)
    mlp_total = sum(cache["mlp_out", l] for l in range(model.cfg.n_layers))
    assert torch.allclose(stack.sum(0), mlp_total, atol=1e-5)
    moe = model.cfg.moe_layers[0]
    assert f"L{moe}E0N0" in labels and (f"L{moe}SN0" in labels) == bool(model.cfg.d_shared_expert)
    with_rest = cache.stack_neuron_results(model.cfg.n_layers, incl_remainder=True)
    assert torch.allclose(with_rest.sum(0), cache["resid_post", -1], atol=1e-5)
    for expand in (True, False):
        full = cache.get_full_resid_decomposition(expand_neurons=expand)
        assert torch.allclose(full.sum(0), cache["resid_post", -1], atol=1e-4), expand
    with pytest.raises(ValueError, match="neuron_slice is not supported"):
        cache.stack_neuron_results(1, neuron_slice=[0])


def test_stack_activation_skips_dense_layers_for_moe_hooks(run):
    model, _, _, cache = run
    stacked = cache.stack_activation("router_logits")
    assert stacked.shape[0] == len(model.cfg.moe_layers) < model.cfg.n_layers
    for i, layer in enumerate(model.cfg.moe_layers):
        assert torch.equal(stacked[i], cache["router_logits", layer])
    assert cache.stack_activation("mlp_out").shape[0] == model.cfg.n_layers
