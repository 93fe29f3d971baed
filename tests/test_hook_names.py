"""Unknown hook names, in every place a name is given, raise an error naming it with the closest
existing names; MoE hooks of dense layers say the layer is dense; stack_activation of a MoE hook
stacks the MoE layers."""

from __future__ import annotations

import pytest
import torch
from hf_models import build_hf, qwen2_moe_config, save_hf

from moe_hooked import HookedMoETransformer
from moe_hooked.hook_names import HookNameError, get_act_name


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Qwen2-MoE with layer 1 dense: MoE layers 0 and 2."""
    folder = save_hf(build_hf(qwen2_moe_config()), tmp_path_factory.mktemp("qwen"))
    return HookedMoETransformer.from_pretrained(folder)


@pytest.fixture(scope="module")
def cache(model):
    return model.run_with_cache(torch.tensor([[1, 5, 9, 13]]))[1]


def identity(x, hook):
    return x


TYPO = "blocks.2.mlp.hook_router_logit"
SUGGESTION = r"did you mean 'blocks\.2\.mlp\.hook_router_logits'"
DENSE = r"'blocks\.1\.mlp\.hook_router_logits' does not exist: layer 1 is dense .*the MoE layers are \[0, 2\]"


@pytest.mark.parametrize(("name", "message"), [(TYPO, SUGGESTION), ("blocks.1.mlp.hook_router_logits", DENSE)])
def test_run_with_hooks_hooks_and_names_filter_name_the_unknown_hook(model, name, message):
    tokens = torch.tensor([[1, 5, 9]])
    with pytest.raises(HookNameError, match=message):
        model.run_with_hooks(tokens, fwd_hooks=[(name, identity)])
    with pytest.raises(HookNameError, match=message):
        with model.hooks(fwd_hooks=[(name, identity)]):
            pass
    with pytest.raises(HookNameError, match=message):
        model.run_with_cache(tokens, names_filter=[name])
    assert all(not hook_point._forward_hooks for hook_point in model.hook_dict.values())


def test_cache_lookups_name_the_unknown_hook(cache):
    with pytest.raises(HookNameError, match=SUGGESTION):
        cache[TYPO]
    with pytest.raises(HookNameError, match=DENSE):
        cache["router_logits", 1]
    with pytest.raises(HookNameError, match="unknown activation name 'router_logit'; did you mean 'router_logits'"):
        cache["router_logit", 2]
    assert torch.equal(cache["router_logits", -1], cache["blocks.2.mlp.hook_router_logits"])


def test_a_hook_dropped_by_names_filter_is_named_as_such(model):
    _, cache = model.run_with_cache(torch.tensor([[1, 5, 9]]), names_filter=["blocks.0.hook_resid_pre"])
    with pytest.raises(HookNameError, match="the cache holds no 'blocks.0.hook_resid_mid': run run_with_cache without a names_filter"):
        cache["resid_mid", 0]


@pytest.mark.parametrize(("shorthand", "suggestion"), [("router_logit", "router_logits"), ("resid_pr", "resid_pre"), ("expert_outs", "expert_out")])
def test_get_act_name_refuses_unknown_shorthands(shorthand, suggestion):
    with pytest.raises(HookNameError, match=f"unknown activation name '{shorthand}'; did you mean '{suggestion}'"):
        get_act_name(shorthand, 1)


@pytest.mark.parametrize(
    ("args", "full"),
    [
        (("router_logits", 3), "blocks.3.mlp.hook_router_logits"),
        (("resid_mid", 0), "blocks.0.hook_resid_mid"),
        (("k6",), "blocks.6.attn.hook_k"),
        (("scale4ln1",), "blocks.4.ln1.hook_scale"),
        (("normalized", 2, "ln2"), "blocks.2.ln2.hook_normalized"),
        (("attn", 1), "blocks.1.attn.hook_pattern"),
        (("scale",), "ln_final.hook_scale"),
        (("blocks.0.hook_resid_pre",), "blocks.0.hook_resid_pre"),
    ],
)
def test_get_act_name_still_resolves_every_known_form(args, full):
    assert get_act_name(*args) == full


def test_stack_activation_of_a_moe_hook_stacks_the_moe_layers(cache):
    with pytest.warns(UserWarning, match=r"stacked the MoE layers \[0, 2\] only"):
        stacked = cache.stack_activation("router_logits")
    assert torch.equal(stacked, torch.stack([cache["router_logits", 0], cache["router_logits", 2]]))
    with pytest.warns(UserWarning, match=r"stacked the MoE layers \[0\] only"):
        assert torch.equal(cache.stack_activation("topk_indices", layer=2), cache["topk_indices", 0][None])
    assert cache.stack_activation("resid_mid").shape[0] == 3
