"""Interventions checked against MoE outputs rebuilt by hand from the expert weights."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hf_models import olmoe_config, qwen2_moe_config
from tiny import tiny_model

from moe_hooked.components import Experts
from moe_hooked.interventions import (
    ablate_experts,
    expert_output_means,
    keep_top_k,
    patch_expert_outputs,
    route_to,
)

CONFIGS = {
    "olmoe": olmoe_config,
    "qwen2_moe": qwen2_moe_config,  # layer 1 dense, gated shared expert
    "olmoe_norm_topk": lambda: olmoe_config(norm_topk_prob=True),
}
ATOL = 1e-5


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tmp_path_factory):
    return tiny_model(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    return tiny_model(olmoe_config(), tmp_path_factory.mktemp("olmoe_single"))


def random_tokens(seed: int, batch: int = 2, pos: int = 9) -> torch.Tensor:
    return torch.randint(3, 97, (batch, pos), generator=torch.Generator().manual_seed(seed))


TOKENS = random_tokens(0)


# ----------------------------------------------------------------------------- by-hand references
def moe_input(model, cache, layer):
    """The MoE block's input: ln2's gain times its normalised residual."""
    return model.blocks[layer].ln2.w * cache[f"blocks.{layer}.ln2.hook_normalized"]


def expert_by_hand(experts, e, x):
    return (F.silu(x @ experts.W_gate[e].T) * (x @ experts.W_up[e].T)) @ experts.W_down[e].T


def expert_outputs_by_hand(model, cache, layer, indices):
    """Output of expert indices[b, p, s] on the layer's input at (b, p) -> [batch pos k d_model]."""
    x = moe_input(model, cache, layer)
    experts = model.blocks[layer].mlp.experts
    every = torch.stack([expert_by_hand(experts, e, x) for e in range(model.cfg.n_experts)], dim=2)
    return every.gather(2, indices[..., None].expand(*indices.shape, x.shape[-1]))


def mlp_out_by_hand(model, cache, layer, weights, expert_out):
    """sum_k weights_k * expert_out_k, plus the shared expert's (cached) output."""
    routed = (weights[..., None] * expert_out).sum(-2)
    if model.cfg.d_shared_expert:
        routed = routed + cache[f"blocks.{layer}.mlp.hook_shared_out"]
    return routed


def topk_by_hand(model, probs):
    weights, indices = probs.topk(model.cfg.top_k, dim=-1)
    if model.cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return indices, weights


def run(model, tokens=TOKENS, hooks=()):
    with model.hooks(fwd_hooks=list(hooks)):
        return model.run_with_cache(tokens)


def mlp_out(cache, layer):
    return cache[f"blocks.{layer}.hook_mlp_out"]


def most_used_expert(cache, layer):
    return int(cache["topk_indices", layer].flatten().mode().values)


def two_experts(cache, layer):
    """The most used expert of the layer and another one."""
    most = most_used_expert(cache, layer)
    return [most, (most + 3) % cache["router_logits", layer].shape[-1]]


# ----------------------------------------------------------------------------- zero ablation
def test_zero_ablation_removes_the_expert_and_keeps_other_weights(model):
    layer = model.cfg.moe_layers[-1]
    logits, clean = run(model)
    ids = two_experts(clean, layer)
    ablated_logits, ablated = run(model, hooks=ablate_experts(model, {layer: ids}))

    indices, weights = clean["topk_indices", layer], clean["topk_weights", layer]
    kept_weights = torch.where(torch.isin(indices, torch.tensor(ids)), 0.0, weights)
    expected = mlp_out_by_hand(model, clean, layer, kept_weights, expert_outputs_by_hand(model, clean, layer, indices))
    torch.testing.assert_close(mlp_out(ablated, layer), expected, atol=ATOL, rtol=0)
    assert torch.equal(ablated["topk_indices", layer], indices)
    # ablated slots are not computed
    assert not ablated["expert_out", layer][torch.isin(indices, torch.tensor(ids))].any()
    # the last layer acts per position: the logits change exactly where an ablated expert was selected
    hit = torch.isin(indices, torch.tensor(ids)).any(-1)
    change = (ablated_logits - logits).abs().amax(-1)
    assert hit.any() and (change[hit] > 1e-4).all() and (change[~hit] < 1e-5).all()


def test_zero_ablation_at_an_earlier_layer_changes_the_later_layers(olmoe):
    _, clean = run(olmoe)
    _, ablated = run(olmoe, hooks=ablate_experts(olmoe, {0: [most_used_expert(clean, 0)]}))
    assert torch.equal(ablated["resid_mid", 0], clean["resid_mid", 0])
    assert not torch.allclose(ablated["resid_mid", 1], clean["resid_mid", 1], atol=1e-4)


# ----------------------------------------------------------------------------- reroute
def test_reroute_takes_the_next_best_experts(model):
    layer = model.cfg.moe_layers[0]
    _, clean = run(model)
    ids = two_experts(clean, layer)
    _, rerouted = run(model, hooks=ablate_experts(model, {layer: ids}, mode="reroute"))

    logits = clean["router_logits", layer].clone()
    logits[..., ids] = float("-inf")
    indices, weights = topk_by_hand(model, logits.float().softmax(-1))
    assert torch.equal(rerouted["topk_indices", layer], indices)
    torch.testing.assert_close(rerouted["topk_weights", layer], weights, atol=ATOL, rtol=0)
    expected = mlp_out_by_hand(model, clean, layer, weights, expert_outputs_by_hand(model, clean, layer, indices))
    torch.testing.assert_close(mlp_out(rerouted, layer), expected, atol=ATOL, rtol=0)


def test_reroute_never_selects_a_masked_expert(model):
    _, clean = run(model)
    masked = {layer: two_experts(clean, layer) for layer in model.cfg.moe_layers}
    _, rerouted = run(model, random_tokens(1, batch=3, pos=20), ablate_experts(model, masked, mode="reroute"))
    for layer, ids in masked.items():
        assert not torch.isin(rerouted["topk_indices", layer], torch.tensor(ids)).any()
        assert (rerouted["router_probs", layer][..., ids] == 0).all()


# ----------------------------------------------------------------------------- mean ablation
def means_by_hand(model, cache, layer, mask=None):
    """Mean expert output per expert over the slots selected (with nonzero weight) in `cache`."""
    indices, weights, out = (cache[name, layer] for name in ("topk_indices", "topk_weights", "expert_out"))
    rows = {e: [] for e in range(model.cfg.n_experts)}
    for b, p, s in itertools.product(*map(range, indices.shape)):
        if weights[b, p, s] != 0 and (mask is None or mask[b, p]):
            rows[int(indices[b, p, s])].append(out[b, p, s])
    return {e: torch.stack(r).mean(0) for e, r in rows.items() if r}


def test_mean_ablation_replaces_the_output_by_the_reference_mean(model):
    layer = model.cfg.moe_layers[-1]
    _, reference = run(model, random_tokens(2, batch=4, pos=16))
    _, clean = run(model)
    means = means_by_hand(model, reference, layer)
    ids = [e for e in two_experts(clean, layer) if e in means]
    _, ablated = run(model, hooks=ablate_experts(model, {layer: ids}, mode="mean", mean_from=reference))

    indices, weights = clean["topk_indices", layer], clean["topk_weights", layer]
    expected_out = expert_outputs_by_hand(model, clean, layer, indices).clone()
    for b, p, s in itertools.product(*map(range, indices.shape)):
        if int(indices[b, p, s]) in ids:
            expected_out[b, p, s] = means[int(indices[b, p, s])]
    torch.testing.assert_close(ablated["expert_out", layer], expected_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        mlp_out(ablated, layer), mlp_out_by_hand(model, clean, layer, weights, expected_out), atol=ATOL, rtol=0
    )


def test_expert_output_means_from_tokens_and_padded_texts(olmoe):
    tokens = random_tokens(3, batch=5, pos=12)
    _, cache = olmoe.run_with_cache(tokens)
    streamed = expert_output_means(olmoe, tokens, batch_size=2)
    for layer in olmoe.cfg.moe_layers:
        for e, mean in means_by_hand(olmoe, cache, layer).items():
            torch.testing.assert_close(streamed[layer][e], mean, atol=1e-6, rtol=0)

    texts = ["The cat sat on the mat.", "Routers send each token to a few experts and more.", "add(a, b)"]
    from_texts = expert_output_means(olmoe, texts, layers=[1], batch_size=2)
    rows = {}
    for text in texts:  # one unpadded run per text
        _, cache = olmoe.run_with_cache(olmoe.to_tokens(text))
        for e, mean in means_by_hand(olmoe, cache, 1).items():
            n = int((cache["topk_indices", 1] == e).sum())
            total, count = rows.get(e, (0, 0))
            rows[e] = (total + mean * n, count + n)
    for e in range(olmoe.cfg.n_experts):
        if e in rows:
            torch.testing.assert_close(from_texts[1][e], rows[e][0] / rows[e][1], atol=1e-6, rtol=0)
        else:
            assert from_texts[1][e].isnan().all()


def test_mean_ablation_needs_a_defined_mean(olmoe):
    means = expert_output_means(olmoe, random_tokens(4, batch=1, pos=1))
    never = int(torch.nonzero(means[0].isnan().all(-1))[0])
    with pytest.raises(ValueError, match="never selected"):
        ablate_experts(olmoe, {0: [never]}, mode="mean", mean_from=means)
    with pytest.raises(ValueError, match="needs mean_from"):
        ablate_experts(olmoe, {0: [never]}, mode="mean")
    with pytest.raises(ValueError, match=r"expected \[n_experts d_model\]"):
        ablate_experts(olmoe, {0: [1]}, mode="mean", mean_from=torch.zeros(3, 32))


# ----------------------------------------------------------------------------- keep_top_k
@pytest.mark.parametrize("renormalize", [False, True])
def test_keep_top_k_with_the_model_k_changes_nothing(model, renormalize):
    logits = model(TOKENS)
    hooked = model.run_with_hooks(TOKENS, fwd_hooks=keep_top_k(model, model.cfg.top_k, renormalize=renormalize))
    assert torch.equal(hooked, logits)


@pytest.mark.parametrize("renormalize", [False, True])
def test_keep_top_1_in_every_layer(model, renormalize):
    _, cache = run(model, hooks=keep_top_k(model, 1, renormalize=renormalize))
    for layer in model.cfg.moe_layers:  # each layer's routing as the model computed it in this run
        indices, weights = topk_by_hand(model, cache["router_probs", layer])
        kept = weights.sum(-1) if renormalize else weights[..., 0]
        expected_weights = torch.stack([kept, torch.zeros_like(kept)], dim=-1)
        torch.testing.assert_close(cache["topk_weights", layer], expected_weights, atol=ATOL, rtol=0)
        out = expert_outputs_by_hand(model, cache, layer, indices)
        torch.testing.assert_close(
            mlp_out(cache, layer), mlp_out_by_hand(model, cache, layer, expected_weights, out), atol=ATOL, rtol=0
        )


def test_keep_top_k_only_touches_the_given_layers(olmoe):
    _, clean = run(olmoe)
    _, cache = run(olmoe, hooks=keep_top_k(olmoe, 1, layers=[2]))
    for layer in (0, 1):
        assert torch.equal(cache["topk_weights", layer], clean["topk_weights", layer])
    assert (cache["topk_weights", 2][..., 1] == 0).all()


# ----------------------------------------------------------------------------- route_to
@pytest.mark.parametrize("n_forced", [1, 2])
def test_route_to_forces_the_experts_with_restricted_softmax_weights(model, n_forced):
    layer = model.cfg.moe_layers[-1]
    experts = [4, 1][:n_forced]
    _, cache = run(model, hooks=route_to(model, layer, experts))
    indices, weights = cache["topk_indices", layer], cache["topk_weights", layer]
    assert (indices[..., :n_forced] == torch.tensor(experts)).all()
    assert not torch.isin(indices[..., n_forced:], torch.tensor(experts)).any()
    restricted = cache["router_logits", layer][..., experts].float().softmax(-1)
    expected = torch.cat([restricted, torch.zeros(*restricted.shape[:-1], model.cfg.top_k - n_forced)], -1)
    torch.testing.assert_close(weights, expected, atol=ATOL, rtol=0)
    out = expert_outputs_by_hand(model, cache, layer, indices)
    torch.testing.assert_close(mlp_out(cache, layer), mlp_out_by_hand(model, cache, layer, expected, out), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- patching
CORRUPT = random_tokens(5)


def test_patch_expert_out_per_slot(model):
    layer = model.cfg.moe_layers[-1]
    _, clean = run(model)
    _, corrupt = run(model, CORRUPT)
    _, patched = run(model, CORRUPT, patch_expert_outputs(model, clean, layers=[layer]))
    assert torch.equal(patched["expert_out", layer], clean["expert_out", layer])
    expected = mlp_out_by_hand(model, corrupt, layer, corrupt["topk_weights", layer], clean["expert_out", layer])
    torch.testing.assert_close(mlp_out(patched, layer), expected, atol=ATOL, rtol=0)


def test_patch_expert_out_matching_experts(model):
    layer = model.cfg.moe_layers[0]
    _, clean = run(model)
    _, corrupt = run(model, CORRUPT)
    _, patched = run(model, CORRUPT, patch_expert_outputs(model, clean, layers=layer, match="expert"))
    same = corrupt["topk_indices", layer] == clean["topk_indices", layer]
    assert same.any() and not same.all()
    expected = torch.where(same[..., None], clean["expert_out", layer], corrupt["expert_out", layer])
    assert torch.equal(patched["expert_out", layer], expected)


def test_patch_positions_and_slots(olmoe):
    _, clean = run(olmoe)
    _, corrupt = run(olmoe, CORRUPT)
    hooks = patch_expert_outputs(olmoe, clean, layers=[1], positions=[2, 5], slots=1)
    _, patched = run(olmoe, CORRUPT, hooks)
    expected = corrupt["expert_out", 1].clone()
    expected[:, [2, 5], 1] = clean["expert_out", 1][:, [2, 5], 1]
    assert torch.equal(patched["expert_out", 1], expected)


def test_patch_routed_and_shared_out(model):
    layer = model.cfg.moe_layers[-1]
    _, clean = run(model)
    _, corrupt = run(model, CORRUPT)
    _, routed = run(model, CORRUPT, patch_expert_outputs(model, clean, [layer], hooks=["routed_out"]))
    shared = corrupt["shared_out", layer] if model.cfg.d_shared_expert else 0
    torch.testing.assert_close(mlp_out(routed, layer), clean["routed_out", layer] + shared, atol=ATOL, rtol=0)
    if model.cfg.d_shared_expert:
        hooks = patch_expert_outputs(model, clean, [layer], hooks=("routed_out", "shared_out"))
        _, both = run(model, CORRUPT, hooks)
        torch.testing.assert_close(mlp_out(both, layer), mlp_out(clean, layer), atol=ATOL, rtol=0)
    else:
        with pytest.raises(ValueError, match="no shared expert"):
            patch_expert_outputs(model, clean, [layer], hooks=["shared_out"])


def test_patch_rejects_sources_of_another_shape(olmoe):
    _, clean = run(olmoe)
    with pytest.raises(ValueError, match=r"source has shape \(2, 9, 2, 32\) but this run's is \(2, 4, 2, 32\)"):
        olmoe.run_with_hooks(TOKENS[:, :4], fwd_hooks=patch_expert_outputs(olmoe, clean, layers=[1]))
    other_k = {"blocks.1.mlp.hook_expert_out": torch.zeros(2, 9, 3, 32)}
    with pytest.raises(ValueError, match=r"shape \(2, 9, 3, 32\).*\[batch pos 2 32\]"):
        patch_expert_outputs(olmoe, other_k, layers=[1])
    _, partial = olmoe.run_with_cache(TOKENS, names_filter=lambda name: name.endswith("expert_out"))
    with pytest.raises(ValueError, match="hook_topk_indices"):
        patch_expert_outputs(olmoe, partial, layers=[1], match="expert")
    with pytest.raises(ValueError, match="slots"):
        patch_expert_outputs(olmoe, clean, layers=[1], slots=[2])


# ----------------------------------------------------------------------------- all-experts mode
def test_all_experts_mode_agrees_with_the_selected_slots(model):
    with model.all_experts():
        _, cache = model.run_with_cache(TOKENS)
    for layer in model.cfg.moe_layers:
        every = cache["all_expert_out", layer]
        assert every.shape == (*TOKENS.shape, model.cfg.n_experts, model.cfg.d_model)
        x = moe_input(model, cache, layer)
        experts = model.blocks[layer].mlp.experts
        torch.testing.assert_close(every[:, :, 3], expert_by_hand(experts, 3, x), atol=ATOL, rtol=0)
        indices = cache["topk_indices", layer]
        gathered = every.gather(2, indices[..., None].expand(*indices.shape, model.cfg.d_model))
        torch.testing.assert_close(gathered, cache["expert_out", layer], atol=ATOL, rtol=0)
    _, outside = model.run_with_cache(TOKENS)
    assert not any("all_expert_out" in name for name in outside.keys())


# ----------------------------------------------------------------------------- compute saved
@pytest.fixture
def expert_rows(monkeypatch):
    """Counts the rows each (MoE block, expert) computes, by wrapping `Experts.expert`."""
    rows = {}
    original = Experts.expert

    def counting(self, e, x):
        rows[id(self), e] = rows.get((id(self), e), 0) + x.shape[0]
        return original(self, e, x)

    monkeypatch.setattr(Experts, "expert", counting)
    return rows


def test_zero_weight_slots_are_not_computed(olmoe, expert_rows):
    n_tokens, n_layers = TOKENS.numel(), len(olmoe.cfg.moe_layers)
    olmoe(TOKENS)
    assert sum(expert_rows.values()) == n_tokens * olmoe.cfg.top_k * n_layers
    expert_rows.clear()
    olmoe.run_with_hooks(TOKENS, fwd_hooks=keep_top_k(olmoe, 1))
    assert sum(expert_rows.values()) == n_tokens * n_layers
    expert_rows.clear()
    olmoe.run_with_hooks(TOKENS, fwd_hooks=ablate_experts(olmoe, {1: [0, 1, 2, 3, 4, 5]}))
    assert all(rows == 0 for (block, e), rows in expert_rows.items() if block == id(olmoe.blocks[1].mlp.experts) and e < 6)


# ----------------------------------------------------------------------------- composition
def test_hooks_compose_with_each_other_and_with_caching(olmoe):
    logits = olmoe(TOKENS)
    _, clean = run(olmoe)
    ablated_id = most_used_expert(clean, 1)
    hooks = keep_top_k(olmoe, 1) + ablate_experts(olmoe, {1: [ablated_id]})
    with olmoe.hooks(fwd_hooks=hooks):
        _, cache = olmoe.run_with_cache(TOKENS)
    indices, weights = cache["topk_indices", 1], cache["topk_weights", 1]
    assert (weights[..., 1] == 0).all()
    assert (weights[indices == ablated_id] == 0).all()
    assert (weights[..., 0][indices[..., 0] != ablated_id] > 0).all()
    assert torch.equal(olmoe(TOKENS), logits)  # hooks are gone after the context


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_valid_range(model):
    cfg = model.cfg
    dense = [layer for layer in range(cfg.n_layers) if not cfg.is_moe_layer(layer)] + [cfg.n_layers]
    moe = cfg.moe_layers[0]
    with pytest.raises(ValueError, match=rf"valid ids are 0..{cfg.n_experts - 1}"):
        ablate_experts(model, {moe: [cfg.n_experts]})
    for layer in dense:
        with pytest.raises(ValueError, match=rf"MoE layers are \[{', '.join(map(str, cfg.moe_layers))}\]"):
            ablate_experts(model, {layer: [0]})
        with pytest.raises(ValueError, match="MoE layers are"):
            keep_top_k(model, 1, layers=[layer])
        with pytest.raises(ValueError, match="MoE layers are"):
            route_to(model, layer, [0])
    for k in (0, cfg.top_k + 1):
        with pytest.raises(ValueError, match=rf"k must be in 1..{cfg.top_k}"):
            keep_top_k(model, k)
    with pytest.raises(ValueError, match=rf"1..{cfg.top_k} experts"):
        route_to(model, moe, list(range(cfg.top_k + 1)))
    with pytest.raises(ValueError, match="duplicates"):
        route_to(model, moe, [1, 1])
    with pytest.raises(ValueError, match="leaves fewer than"):
        ablate_experts(model, {moe: list(range(cfg.n_experts - cfg.top_k + 1))}, mode="reroute")
    with pytest.raises(ValueError, match="unknown ablation mode"):
        ablate_experts(model, {moe: [0]}, mode="drop")
