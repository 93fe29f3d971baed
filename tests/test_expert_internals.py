"""Hook points inside the routed experts (`hook_expert_pre`, `hook_expert_pre_linear`,
`hook_expert_post`), checked against the expert computed by hand, and editable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import build_hf, olmoe_config, save_hf

from moe_hooked import HookedMoETransformer, get_act_name
from moe_hooked.interventions import keep_top_k

LAYER = 1


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> HookedMoETransformer:
    return HookedMoETransformer.from_pretrained(save_hf(build_hf(olmoe_config(), seed=4), tmp_path_factory.mktemp("m")))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def by_hand(model, cache, b: int, p: int, slot: int) -> tuple[torch.Tensor, ...]:
    """(pre, pre_linear, post, out) of the expert in `slot` at (b, p), from its weights."""
    x = cache[f"blocks.{LAYER}.ln2.hook_normalized"][b, p] * model.blocks[LAYER].ln2.w
    experts = model.blocks[LAYER].mlp.experts
    e = int(cache["topk_indices", LAYER][b, p, slot])
    pre, pre_linear = x @ experts.W_gate[e].T, x @ experts.W_up[e].T
    post = F.silu(pre) * pre_linear
    return pre, pre_linear, post, post @ experts.W_down[e].T


def test_hidden_activations_are_the_experts_computed_by_hand(model, tokens):
    logits = model(tokens)
    cached_logits, cache = model.run_with_cache(tokens)
    assert torch.allclose(cached_logits, logits, atol=1e-6)  # the two-pass path changes nothing
    for b, p, slot in [(0, 0, 0), (1, 4, 1)]:
        pre, pre_linear, post, out = by_hand(model, cache, b, p, slot)
        assert torch.allclose(cache["expert_pre", LAYER][b, p, slot], pre, atol=1e-6)
        assert torch.allclose(cache["expert_pre_linear", LAYER][b, p, slot], pre_linear, atol=1e-6)
        assert torch.allclose(cache["expert_post", LAYER][b, p, slot], post, atol=1e-6)
        assert torch.allclose(cache["expert_out", LAYER][b, p, slot], out, atol=1e-6)


def test_slots_not_computed_hold_zeros(model, tokens):
    with model.hooks(fwd_hooks=keep_top_k(model, 1)):
        _, cache = model.run_with_cache(tokens)
    for name in ("expert_pre", "expert_pre_linear", "expert_post"):
        act = cache[name, LAYER]
        assert act.shape == (2, 7, model.cfg.top_k, model.cfg.d_expert)
        assert (act[..., 1:, :] == 0).all() and (act[..., 0, :] != 0).any()


def test_editing_one_neuron_of_expert_post_moves_the_output_along_its_W_down_column(model, tokens):
    _, clean = model.run_with_cache(tokens)
    b, p, slot, neuron, delta = 1, 3, 0, 5, 2.0

    def bump(post, hook):
        post = post.clone()
        post[b, p, slot, neuron] += delta
        return post

    with model.hooks(fwd_hooks=[(get_act_name("expert_post", LAYER), bump)]):
        _, edited = model.run_with_cache(tokens)
    e = int(clean["topk_indices", LAYER][b, p, slot])
    expected = clean["expert_out", LAYER][b, p, slot] + delta * model.blocks[LAYER].mlp.experts.W_down[e][:, neuron]
    assert torch.allclose(edited["expert_out", LAYER][b, p, slot], expected, atol=1e-5)
    untouched = torch.ones(2, 7, dtype=torch.bool)
    untouched[b, p] = False
    assert torch.allclose(edited["expert_out", LAYER][untouched], clean["expert_out", LAYER][untouched], atol=1e-6)


def test_editing_pre_and_pre_linear_feeds_the_activation(model, tokens):
    _, clean = model.run_with_cache(tokens)

    def zero_pre_linear(x, hook):
        return torch.zeros_like(x)

    with model.hooks(fwd_hooks=[(get_act_name("expert_pre_linear", LAYER), zero_pre_linear)]):
        _, edited = model.run_with_cache(tokens)
    assert (edited["expert_post", LAYER] == 0).all() and (edited["routed_out", LAYER] == 0).all()

    def double_pre(x, hook):
        return 2 * x

    with model.hooks(fwd_hooks=[(get_act_name("expert_pre", LAYER), double_pre)]):
        _, edited = model.run_with_cache(tokens)
    expected = F.silu(2 * clean["expert_pre", LAYER]) * clean["expert_pre_linear", LAYER]
    assert torch.allclose(edited["expert_post", LAYER], expected, atol=1e-6)
