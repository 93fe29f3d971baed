"""Unusual inputs get clear errors (or are accepted where unambiguous), never silent wrong answers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hf_models import qwen2_moe_config
from tiny import tiny_model

from moe_hooked.components.hook_point import HookDtypeError
from moe_hooked.interventions import ablate_experts, route_to


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(qwen2_moe_config(), tmp_path_factory.mktemp("qwen"), seed=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_hook_returning_another_dtype_names_the_hook_and_both_dtypes(model, dtype):
    hook = ("blocks.0.hook_resid_mid", lambda x, hook: x.to(dtype))
    with pytest.raises(HookDtypeError, match=rf"'blocks\.0\.hook_resid_mid' returned dtype {dtype}, but this hook point carries torch\.float32"):
        model.run_with_hooks(torch.tensor([[1, 5, 9]]), fwd_hooks=[hook])


def test_a_list_of_ints_is_one_sequence_of_token_ids(model):
    ids = [1, 5, 9, 13]
    torch.testing.assert_close(model(ids), model(torch.tensor([ids])))
    assert model.to_string(ids) == model.to_string(torch.tensor(ids))


@pytest.mark.parametrize("tokens", [torch.tensor([[1]]), [1], torch.tensor([[1], [5]])])
def test_the_loss_of_fewer_than_two_tokens_is_refused(model, tokens):
    with pytest.raises(ValueError, match="the loss needs sequences of at least 2 tokens .* got 1"):
        model(tokens, return_type="loss")
    assert model(tokens).shape[1] == 1  # the logits are fine


@pytest.mark.parametrize("tokens", [torch.zeros(0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long)])
def test_empty_or_misshapen_token_tensors_are_refused(model, tokens):
    with pytest.raises(ValueError, match=re.escape(f"token ids must be a non-empty tensor [batch pos] or [pos], got shape {tuple(tokens.shape)}")):
        model(tokens)


@pytest.mark.parametrize("bad", [[], [1, "a"], [1.5, 2.0]])
def test_other_lists_are_refused_with_what_is_accepted(model, bad):
    with pytest.raises(ValueError, match="expected a string, a non-empty list of strings, or token ids"):
        model(bad)


def test_out_of_vocabulary_ids_in_to_string_are_refused(model):
    size = len(model.tokenizer)
    assert model.to_string([1, 5]) != ""
    with pytest.raises(ValueError, match=rf"token ids \[{size}, {size + 3}\] lie outside the tokenizer's vocabulary \[0, {size}\)"):
        model.to_string([1, size, size + 3])
    with pytest.raises(ValueError, match="lie outside the tokenizer's vocabulary"):
        model.to_str_tokens(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="lie outside"):
        model.to_string(torch.tensor([[1, 2], [3, size]]))


@pytest.mark.parametrize("bad", [2.7, [1, 2.7], [True], "3"])
def test_non_integer_expert_ids_are_refused(model, bad):
    with pytest.raises(ValueError, match="expert ids must be whole numbers, got"):
        ablate_experts(model, {0: bad})
    with pytest.raises(ValueError, match="expert ids must be whole numbers"):
        route_to(model, 0, bad)


@pytest.mark.parametrize("ids", [2, np.int64(2), torch.tensor(2), [np.int32(2)], torch.tensor([2])])
def test_integer_expert_ids_of_any_integer_type_are_accepted(model, ids):
    tokens = torch.tensor([[1, 5, 9, 13]])
    expected = model.run_with_hooks(tokens, fwd_hooks=ablate_experts(model, {0: [2]}))
    torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=ablate_experts(model, {0: ids})), expected)
