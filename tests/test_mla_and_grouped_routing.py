"""DeepSeek-V2/V3 hooks (MLA latents, selection scores) and interventions under sigmoid and grouped routing.

References: the hooks' values recombined by hand, the router recomputed by hand from the
cached logits, and transformers' models edited so that they compute what an intervention claims
(an expert's down projection zeroed, an expert's selection bias set to -inf).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import build_and_save

from transformers import AutoModelForCausalLM

from moe_hooked import HookedMoETransformer, get_act_name
from moe_hooked.loading.export import save_hub_checkpoint
from moe_hooked.interventions import ablate_experts, keep_top_k

TOKENS = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(3))
CONFIGS = ("v2-greedy-qlora", "v2-grouped-no-qlora", "v3-grouped-qlora", "v3-yarn-halves")


@pytest.fixture(scope="module", params=CONFIGS)
def pair(request, tmp_path_factory):
    hf, folder = build_and_save(request.param, tmp_path_factory.mktemp(request.param), seed=len(request.param))
    return hf, HookedMoETransformer.from_pretrained(folder)


def first_moe_layer(model: HookedMoETransformer) -> int:
    return model.cfg.moe_layers[0]


# ----------------------------------------------------------------------------- hooks
def test_mla_hook_shapes(pair):
    _, model = pair
    cfg, (b, p) = model.cfg, TOKENS.shape
    _, cache = model.run_with_cache(TOKENS)
    heads, d_qk = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    expected = {
        "kv_a_norm.hook_scale": (b, p, 1),
        "kv_a_norm.hook_normalized": (b, p, cfg.kv_lora_rank),
        "hook_kv_latent": (b, p, cfg.kv_lora_rank),
        "hook_k_rope": (b, p, cfg.qk_rope_head_dim),
        "hook_q": (b, p, heads, d_qk),
        "hook_k": (b, p, heads, d_qk),
        "hook_rot_q": (b, p, heads, d_qk),
        "hook_rot_k": (b, p, heads, d_qk),
        "hook_v": (b, p, heads, cfg.v_head_dim),
        "hook_z": (b, p, heads, cfg.v_head_dim),
        "hook_pattern": (b, heads, p, p),
        "hook_attn_scores": (b, heads, p, p),
    }
    if cfg.q_lora_rank is not None:
        expected |= {name: (b, p, cfg.q_lora_rank) for name in ("hook_q_latent", "q_a_norm.hook_normalized")}
        expected["q_a_norm.hook_scale"] = (b, p, 1)
    for layer in range(cfg.n_layers):
        names = {name for name in cache if name.startswith(f"blocks.{layer}.attn.")}
        assert names == {f"blocks.{layer}.attn.{name}" for name in expected}
        for name, shape in expected.items():
            assert cache[f"blocks.{layer}.attn.{name}"].shape == shape, name
    has_bias = cfg.router_selection_bias
    for layer in cfg.moe_layers:
        assert (f"blocks.{layer}.mlp.hook_selection_scores" in cache) == has_bias
        if has_bias:
            assert cache["selection_scores", layer].shape == (b, p, cfg.n_experts)


def test_mla_hooks_recombine_into_the_attention_output(pair):
    """k/v from the cached latent, the pattern from the rotated q/k, z from the pattern: all as cached."""
    _, model = pair
    cfg, layer = model.cfg, 1
    attn = model.blocks[layer].attn
    _, cache = model.run_with_cache(TOKENS)
    c = lambda name: cache[f"blocks.{layer}.attn.hook_{name}"]  # noqa: E731
    k_nope_v = (c("kv_latent") @ attn.w_kv_b.T).unflatten(-1, (cfg.n_heads, -1))
    assert torch.allclose(c("k")[..., : cfg.qk_nope_head_dim], k_nope_v[..., : cfg.qk_nope_head_dim], atol=1e-6)
    assert torch.allclose(c("v"), k_nope_v[..., cfg.qk_nope_head_dim :], atol=1e-6)
    assert torch.equal(c("k")[..., cfg.qk_nope_head_dim :], c("k_rope")[:, :, None].expand(-1, -1, cfg.n_heads, -1))
    assert torch.equal(c("rot_q")[..., : cfg.qk_nope_head_dim], c("q")[..., : cfg.qk_nope_head_dim])
    scores = torch.einsum("bqhd,bkhd->bhqk", c("rot_q"), c("rot_k")) * cfg.attn_scale
    causal = torch.ones(TOKENS.shape[1], TOKENS.shape[1], dtype=torch.bool).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    assert torch.allclose(pattern, c("pattern"), atol=1e-6)
    assert torch.allclose(torch.einsum("bhqk,bkhd->bqhd", pattern, c("v")), c("z"), atol=1e-6)
    attn_out = c("z").flatten(-2) @ attn.w_o.T
    assert torch.allclose(attn_out, cache["attn_out", layer], atol=1e-6)


def test_mla_shorthands_resolve_under_attn(pair):
    _, model = pair
    _, cache = model.run_with_cache(TOKENS)
    assert get_act_name("kv_latent", 2) == "blocks.2.attn.hook_kv_latent"
    assert torch.equal(cache["kv_latent", 1], cache["blocks.1.attn.hook_kv_latent"])
    assert torch.equal(cache["k_rope", -1], cache[f"blocks.{model.cfg.n_layers - 1}.attn.hook_k_rope"])
    with pytest.raises(ValueError, match="'q_latent' is a per-layer attention hook: give a layer index"):
        get_act_name("q_latent")


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path):
    hf, model = pair
    save_hub_checkpoint(model, tmp_path / "export", model.cfg.original_config)
    exported = AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", attn_implementation="eager", experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        assert torch.allclose(exported(TOKENS).logits, hf(TOKENS).logits, atol=1e-5)


def test_mla_weight_views(pair):
    _, model = pair
    attn, cfg = model.blocks[0].attn, model.cfg
    assert attn.W_O.shape == (cfg.n_heads, cfg.v_head_dim, cfg.d_model)
    assert torch.equal(attn.W_O[1], attn.w_o[:, cfg.v_head_dim : 2 * cfg.v_head_dim].T)
    for view in ("W_Q", "W_K", "W_V"):
        with pytest.raises(NotImplementedError, match="latent"):
            getattr(attn, view)


def test_zeroing_the_kv_latent_silences_the_attention(pair):
    _, model = pair
    name = "blocks.1.attn.hook_kv_latent"
    _, cache = model.run_with_cache(TOKENS)
    with model.hooks(fwd_hooks=[(name, lambda latent, hook: torch.zeros_like(latent))]):
        _, edited = model.run_with_cache(TOKENS)
    assert cache["attn_out", 1].abs().max() > 0
    assert torch.equal(edited["attn_out", 1], torch.zeros_like(edited["attn_out", 1]))


def routing_by_hand(cfg, logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[list[set], list[dict]]:
    """Per token: the chosen expert ids and their weights, recomputed with Python loops over groups."""
    chosen, weights = [], []
    per_group = cfg.n_experts // cfg.n_expert_groups
    for row in logits.flatten(0, 1).double():
        scores = row.sigmoid() if cfg.router_scoring == "sigmoid" else row.softmax(-1)
        biased = scores + (bias.double() if bias is not None else 0)
        groups = [biased[g * per_group : (g + 1) * per_group] for g in range(cfg.n_expert_groups)]
        rank = [float(g.max()) if cfg.group_score == "max" else float(g.topk(2).values.sum()) for g in groups]
        kept = sorted(range(len(groups)), key=lambda g: -rank[g])[: cfg.topk_groups]
        eligible = [e for e in range(cfg.n_experts) if e // per_group in kept]
        ids = sorted(eligible, key=lambda e: -float(biased[e]))[: cfg.top_k]
        w = {e: float(scores[e]) for e in ids}
        total = sum(w.values()) if cfg.norm_topk_prob else 1.0
        chosen.append(set(ids))
        weights.append({e: v / total * cfg.routed_scaling_factor for e, v in w.items()})
    return chosen, weights


def test_routing_matches_a_by_hand_recomputation(pair):
    _, model = pair
    cfg = model.cfg
    _, cache = model.run_with_cache(TOKENS)
    for layer in cfg.moe_layers:
        router = model.blocks[layer].mlp.router
        bias = router.selection_bias.detach() if cfg.router_selection_bias else None
        chosen, weights = routing_by_hand(cfg, cache["router_logits", layer], bias)
        indices = cache["topk_indices", layer].flatten(0, 1)
        got = cache["topk_weights", layer].flatten(0, 1)
        for token, (ids, w) in enumerate(zip(chosen, weights)):
            assert set(indices[token].tolist()) == ids, (layer, token)
            for slot, e in enumerate(indices[token].tolist()):
                assert abs(got[token, slot].item() - w[e]) < 1e-6
        if cfg.router_selection_bias:
            probs = torch.sigmoid(cache["router_logits", layer])
            assert torch.allclose(cache["selection_scores", layer], probs + bias, atol=1e-7)


# ----------------------------------------------------------------------------- interventions
def test_zero_ablation_equals_the_reference_without_that_experts_output(pair):
    """Zero ablation keeps the routing and removes the expert's contribution: as zeroing its down projection."""
    hf, model = pair
    layer = first_moe_layer(model)
    _, cache = model.run_with_cache(TOKENS, names_filter=lambda name: name.endswith("topk_indices"))
    expert = int(cache["topk_indices", layer][0, 0, 0])
    ablated = model.run_with_hooks(TOKENS, fwd_hooks=ablate_experts(model, {layer: [expert]}, mode="zero"))
    down = hf.model.layers[layer].mlp.experts.down_proj
    saved = down[expert].clone()
    try:
        with torch.no_grad():
            down[expert].zero_()
            reference = hf(TOKENS).logits
    finally:
        with torch.no_grad():
            down[expert].copy_(saved)
    assert (ablated - reference).abs().max() <= 1e-4
    with torch.no_grad():
        assert (ablated - model(TOKENS)).abs().max() > 1e-4


def test_reroute_never_selects_the_masked_expert_even_with_a_large_bias_or_its_group_kept(pair):
    _, model = pair
    cfg, layer = model.cfg, first_moe_layer(model)
    _, cache = model.run_with_cache(TOKENS)
    favourite = int(cache["topk_indices", layer][..., 0].flatten().mode().values)
    router = model.blocks[layer].mlp.router
    saved = router.selection_bias.detach().clone() if cfg.router_selection_bias else None
    try:
        if saved is not None:  # a bias this large would make every token choose it
            with torch.no_grad():
                router.selection_bias[favourite] = 10.0
        hooks = ablate_experts(model, {layer: [favourite]}, mode="reroute")
        with model.hooks(fwd_hooks=hooks):
            _, rerouted = model.run_with_cache(TOKENS)
    finally:
        if saved is not None:
            with torch.no_grad():
                router.selection_bias.copy_(saved)
    indices = rerouted["topk_indices", layer]
    assert not (indices == favourite).any()
    assert (rerouted["router_probs", layer][..., favourite] == 0).all()
    per_group = cfg.n_experts // cfg.n_expert_groups
    groups_used = [len(set((row // per_group).tolist())) for row in indices.flatten(0, 1)]
    assert max(groups_used) <= cfg.topk_groups
    assert (rerouted["topk_weights", layer] > 0).all()


def test_v3_reroute_equals_the_reference_with_the_experts_bias_at_minus_infinity(tmp_path):
    """With sigmoid scores, masking the logit removes the expert from selection exactly as a -inf
    selection bias would in transformers' router; the other experts' weights are unchanged."""
    hf, folder = build_and_save("v3-grouped-qlora", tmp_path, seed=5)
    model = HookedMoETransformer.from_pretrained(folder)
    layer = first_moe_layer(model)
    _, cache = model.run_with_cache(TOKENS)
    expert = int(cache["topk_indices", layer][..., 0].flatten().mode().values)
    rerouted = model.run_with_hooks(TOKENS, fwd_hooks=ablate_experts(model, {layer: [expert]}, mode="reroute"))
    with torch.no_grad():
        hf.model.layers[layer].mlp.gate.e_score_correction_bias[expert] = float("-inf")
        reference = hf(TOKENS).logits
    assert (rerouted - reference).abs().max() <= 1e-4


def test_keep_top_k_keeps_the_scaled_weights_of_the_first_slots(pair):
    _, model = pair
    layer = first_moe_layer(model)
    _, cache = model.run_with_cache(TOKENS)
    with model.hooks(fwd_hooks=keep_top_k(model, 1, layers=layer)):
        _, kept = model.run_with_cache(TOKENS)
    weights = cache["topk_weights", layer]
    assert torch.equal(kept["topk_weights", layer][..., 0], weights[..., 0])
    assert (kept["topk_weights", layer][..., 1:] == 0).all()
    expected = weights[..., :1, None] * kept["expert_out", layer][..., :1, :]
    assert torch.allclose(kept["routed_out", layer], expected.sum(-2), atol=1e-6)
    assert F.mse_loss(kept["routed_out", layer], cache["routed_out", layer]) > 0
