"""Everything works on every family of `tests/families.py`: the hook table and its invariants,
interventions, lenses, corpus analyses and the report. A family added to the registry gets
these tests for free; parity with each family's reference lives in the parity tests."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, tiny_hooked
from tiny import TRAIN_TEXTS

from moe_hooked import HookedMoETransformer
from moe_hooked.analysis import perplexity_vs_top_k, routing_stats
from moe_hooked.interventions import ablate_experts, keep_top_k, patch_expert_outputs, route_to
from moe_hooked.lens import expert_lens, logit_lens, topk_cosine
from moe_hooked.report import build_report

CORPORA = {"prose": TRAIN_TEXTS[:2] + TRAIN_TEXTS[3:4], "code": TRAIN_TEXTS[2:3] + TRAIN_TEXTS[4:]}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, tiny_hooked(request.param, folder)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def test_hook_table_shapes_and_invariants(family_model, tokens):
    _, model = family_model
    cfg = model.cfg
    _, cache = model.run_with_cache(tokens)
    batch, pos, k, heads = 2, 11, cfg.top_k, cfg.n_heads
    for layer in range(cfg.n_layers):
        assert cache["pattern", layer].shape == (batch, heads, pos, pos)
        assert cache["q", layer].shape == (batch, pos, heads, cfg.d_head)
        assert cache["k", layer].shape == (batch, pos, cfg.n_key_value_heads, cfg.d_head)
        assert torch.allclose(cache["resid_mid", layer] + cache["mlp_out", layer], cache["resid_post", layer], atol=1e-6)
    for layer in cfg.moe_layers:
        assert cache["router_logits", layer].shape == cache["router_probs", layer].shape == (batch, pos, cfg.n_experts)
        assert cache["topk_indices", layer].shape == cache["topk_weights", layer].shape == (batch, pos, k)
        expert_out = cache["expert_out", layer]
        assert expert_out.shape == (batch, pos, k, cfg.d_model)
        routed = (cache["topk_weights", layer][..., None] * expert_out).sum(-2)
        assert torch.allclose(routed, cache["routed_out", layer], atol=1e-6)
        shared = cache["shared_out", layer] if cfg.d_shared_expert else 0
        assert torch.allclose(cache["routed_out", layer] + shared, cache["mlp_out", layer], atol=1e-6)
        # the selection is the top-k of the selection scores (the probabilities, + a bias where the model has
        # one) among the expert groups the router keeps (all of them for ungrouped routers)
        scores = cache["selection_scores", layer] if cfg.router_selection_bias else cache["router_probs", layer]
        top = model.blocks[layer].mlp.router.eligible(scores).topk(k, dim=-1).indices
        assert torch.equal(top.sort(-1).values, cache["topk_indices", layer].sort(-1).values)


def test_router_route_is_the_blocks_routing(family_model, tokens):
    """`Router.route` (used by the expert store's read-ahead) chooses what the hooked block chooses."""
    _, model = family_model
    layer = model.cfg.moe_layers[-1]
    block = model.moe_blocks[layer]
    inputs = []
    handle = block.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    try:
        _, cache = model.run_with_cache(tokens)
    finally:
        handle.remove()
    indices, weights = block.router.route(inputs[0])
    assert torch.equal(indices, cache["topk_indices", layer])
    assert torch.equal(weights, cache["topk_weights", layer])


def test_interventions(family_model, tokens):
    _, model = family_model
    layer = model.cfg.moe_layers[-1]
    names = lambda name: name.endswith(("topk_indices", "topk_weights", "expert_out"))  # noqa: E731
    with model.hooks(fwd_hooks=ablate_experts(model, {layer: [0, 1]}, mode="reroute")):
        _, rerouted = model.run_with_cache(tokens, names_filter=names)
    assert not torch.isin(rerouted["topk_indices", layer], torch.tensor([0, 1])).any()
    with model.hooks(fwd_hooks=route_to(model, layer, [2])):
        _, forced = model.run_with_cache(tokens, names_filter=names)
    assert (forced["topk_indices", layer][..., 0] == 2).all()
    with model.hooks(fwd_hooks=keep_top_k(model, 1)):
        _, top1 = model.run_with_cache(tokens, names_filter=names)
    for moe_layer in model.cfg.moe_layers:
        assert (top1["topk_weights", moe_layer][..., 1:] == 0).all()
    clean_logits, clean = model.run_with_cache(tokens)
    other = tokens.flip(-1)
    with model.hooks(fwd_hooks=patch_expert_outputs(model, clean, layers=[layer], match="slot")):
        _, patched = model.run_with_cache(other, names_filter=names)
    assert torch.equal(patched["expert_out", layer], clean["expert_out", layer])
    zeroed = model.run_with_hooks(tokens, fwd_hooks=ablate_experts(model, {layer: [0]}))
    assert not torch.allclose(zeroed, clean_logits)


def test_lenses(family_model, tokens):
    _, model = family_model
    _, cache = model.run_with_cache(tokens)
    assert len(logit_lens(model, cache, top=3)) == 3 * (model.cfg.n_layers + 1)
    lens = expert_lens(model, cache, top=2)
    assert set(lens["layer"]) == set(model.cfg.moe_layers)
    cosine = topk_cosine(model, CORPORA, max_length=16, progress=False)
    assert cosine["cosine"].between(-1 - 1e-6, 1 + 1e-6).all()


def test_corpus_analyses_and_report(family_model, tmp_path):
    folder, model = family_model
    counts = routing_stats(model, CORPORA, max_length=16, progress=False)
    assert counts.counts.shape == (2, len(model.cfg.moe_layers), model.cfg.n_experts)
    assert (counts.counts.sum(-1) == counts.tokens * model.cfg.top_k).all()
    ppl = perplexity_vs_top_k(model, CORPORA, max_length=16, progress=False)
    assert set(ppl["k"]) == set(range(1, model.cfg.top_k + 1))
    out = build_report(str(folder), CORPORA, tmp_path / "report", max_tokens=16, progress=False)
    assert (out / "index.html").is_file()


def _one_expert_bytes(model: HookedMoETransformer) -> int:
    experts = model.moe_blocks[model.cfg.moe_layers[0]].experts
    return sum(getattr(experts, name)[0].numel() for name in experts.param_names) * model.cfg.dtype.itemsize


def test_offloaded_experts_give_the_same_values_bit_for_bit(family_model, tokens):
    """Room for 3 experts: every layer is run in groups, experts are evicted and read again."""
    folder, model = family_model
    offloaded = HookedMoETransformer.from_pretrained(folder, expert_memory=3 * _one_expert_bytes(model))
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0
    for hooks in ([], keep_top_k(model, 1)):
        with model.hooks(fwd_hooks=hooks):
            logits, cache = model.run_with_cache(tokens, attention_mask=mask)
        with offloaded.hooks(fwd_hooks=hooks):
            offloaded_logits, offloaded_cache = offloaded.run_with_cache(tokens, attention_mask=mask)
        assert torch.equal(logits, offloaded_logits)
        assert cache.keys() == offloaded_cache.keys()
        for name in cache.keys():
            assert torch.equal(cache[name], offloaded_cache[name]), name
    stats = offloaded.expert_memory_stats()
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"] and stats["misses"] > 0


def test_generate_with_and_without_the_kv_cache(family_model):
    """Greedy tokens of a left-padded batch are the same with and without the KV cache (sliding
    windows shorter than the text, attention sinks and latent attention included)."""
    _, model = family_model
    prompts = [TRAIN_TEXTS[0][:24], TRAIN_TEXTS[2][:9]]
    options = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens")
    cached = model.generate(prompts, **options)
    assert torch.equal(cached, model.generate(prompts, use_past_kv_cache=False, **options))
    alone = model.generate(prompts[1], **options)
    assert torch.equal(cached[1, -alone.shape[1]:], alone[0])  # the left-padded row equals its run alone
