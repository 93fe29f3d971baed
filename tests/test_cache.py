"""TransformerLens's ActivationCache helpers work on our cache, exactly."""

from __future__ import annotations

import pytest
import torch
from hf_models import qwen2_moe_config
from tiny import tiny_model

from moe_hooked import MoEActivationCache


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = tiny_model(qwen2_moe_config(), tmp_path_factory.mktemp("qwen"))
    tokens = torch.randint(4, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


def test_cache_type(run):
    _, _, _, cache = run
    assert isinstance(cache, MoEActivationCache)


def test_layerless_shorthands_resolve_as_in_transformer_lens(run):
    """TransformerLens's helpers read e.g. cache["embed"] (its caches resolve the shorthand)."""
    _, _, _, cache = run
    assert torch.equal(cache["embed"], cache["hook_embed"])
    with pytest.raises(KeyError, match="'embedd'"):
        cache["embedd"]


def test_accumulated_resid_logit_lens_reaches_the_logits(run):
    model, _, logits, cache = run
    resid, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == [f"{layer}_pre" for layer in range(model.cfg.n_layers)] + ["final_post"]
    assert resid.shape == (model.cfg.n_layers + 1, 2, 6, model.cfg.d_model)
    assert torch.allclose(resid[-1] @ model.W_U, logits, atol=1e-5)


def test_decompose_resid_sums_to_the_final_residual(run):
    model, _, _, cache = run
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[0] == "embed" and labels[-1] == f"{model.cfg.n_layers - 1}_mlp_out"
    assert torch.allclose(parts.sum(0), cache["resid_post", -1], atol=1e-5)


def test_logit_attrs_of_the_decomposition_sum_to_the_logits(run):
    """With the final norm gain folded into W_U, dividing by the cached scale is exact."""
    model, tokens, logits, cache = run
    parts = cache.decompose_resid()
    next_tokens = tokens[:, 1:]
    attrs = cache.logit_attrs(parts[:, :, :-1], next_tokens, pos_slice=slice(0, -1))
    chosen = logits[:, :-1].gather(-1, next_tokens[..., None]).squeeze(-1)
    assert torch.allclose(attrs.sum(0), chosen, atol=1e-4)


def test_apply_ln_to_stack_divides_by_the_cached_scale(run):
    model, _, _, cache = run
    layer = 2
    stack = cache.decompose_resid(layer=layer)
    scaled = cache.apply_ln_to_stack(stack, layer=layer)
    assert torch.allclose(scaled.sum(0), cache[f"blocks.{layer}.ln1.hook_normalized"], atol=1e-5)


def test_stack_activation_and_moe_shorthands(run):
    model, _, _, cache = run
    stacked = cache.stack_activation("mlp_out")
    assert stacked.shape == (model.cfg.n_layers, 2, 6, model.cfg.d_model)
    for layer in range(model.cfg.n_layers):
        assert torch.equal(stacked[layer], cache["mlp_out", layer])
    assert torch.equal(cache["routed_out", 0], cache["blocks.0.mlp.hook_routed_out"])


def test_tokens_to_residual_directions_are_columns_of_W_U(run):
    model, _, _, _ = run
    tokens = torch.tensor([[5, 9], [11, 3]])
    directions = model.tokens_to_residual_directions(tokens)
    assert directions.shape == (2, 2, model.cfg.d_model)
    assert torch.allclose(directions[1, 0], model.W_U[:, 11])


def test_one_accessor_reads_cached_hooks(run):
    from moe_hooked.cache import MissingActivationError, cached_activations, cached_layers

    model, tokens, _, cache = run
    layer = model.cfg.moe_layers[0]
    weights, resid = cache.activations(layer, ["topk_weights", "resid_mid"])
    assert weights is cache.cache_dict[f"blocks.{layer}.mlp.hook_topk_weights"]
    assert resid is cache.cache_dict[f"blocks.{layer}.hook_resid_mid"]
    plain = {k: v for k, v in cache.cache_dict.items() if "topk" in k}  # a plain dict works too
    assert cached_activations(plain, layer, ["topk_weights"], "test")[0] is weights
    assert cached_layers(plain, ["topk_indices", "topk_weights"]) == list(model.cfg.moe_layers)
    assert cache.layers_with(["shared_out"]) == list(model.cfg.moe_layers)
    assert cache.layers_with(["resid_pre"]) == list(range(model.cfg.n_layers))
    with pytest.raises(MissingActivationError, match=f"no 'blocks.{layer}.hook_resid_mid', which the lens reads"):
        cached_activations(plain, layer, ["topk_weights", "resid_mid"], "the lens")
    assert issubclass(MissingActivationError, KeyError) and issubclass(MissingActivationError, ValueError)
