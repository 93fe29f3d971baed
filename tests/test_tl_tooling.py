"""TransformerLens's own tooling runs on HookedMoETransformer: activation patching
(`transformer_lens.patching`), `utilities.test_prompt`, and circuitsvis's attention view."""

from __future__ import annotations

import json

import pytest
import torch
from circuitsvis.attention import attention_patterns
from hf_models import olmoe_config
from tiny import tiny_model
from transformer_lens import patching
from transformer_lens.utilities import test_prompt as tl_test_prompt

CHANGED = 3
"""The one position where the corrupted prompt differs from the clean one."""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(olmoe_config(num_key_value_heads=2), tmp_path_factory.mktemp("m"), seed=8)


@pytest.fixture(scope="module")
def prompts(model):
    clean = torch.randint(4, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[0, CHANGED] = (clean[0, CHANGED] + 11) % 93 + 4
    _, clean_cache = model.run_with_cache(clean)
    answer = int(model(clean)[0, -1].argmax())

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, answer]

    return clean, corrupted, clean_cache, metric


def test_resid_pre_patching_restores_exactly_at_the_changed_position(model, prompts):
    clean, corrupted, clean_cache, metric = prompts
    result = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert result.shape == (model.cfg.n_layers, clean.shape[1])
    clean_value, corrupted_value = metric(model(clean)), metric(model(corrupted))
    assert not torch.isclose(clean_value, corrupted_value)
    # layer 0: resid_pre is the embedding, which differs only at CHANGED: patching it there restores the clean run
    assert torch.isclose(result[0, CHANGED], clean_value, atol=1e-5)
    others = [p for p in range(clean.shape[1]) if p != CHANGED]
    assert torch.allclose(result[0, others], corrupted_value.expand(len(others)), atol=1e-5)
    # before CHANGED the two runs are identical at every layer (causal attention)
    assert torch.allclose(result[:, :CHANGED], corrupted_value.expand(model.cfg.n_layers, CHANGED), atol=1e-5)


def test_attention_head_patching_equals_an_explicit_patch(model, prompts):
    clean, corrupted, clean_cache, metric = prompts
    result = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    assert result.shape == (model.cfg.n_layers, model.cfg.n_heads)
    layer, head = 1, 2

    def patch_head(z, hook):
        z = z.clone()
        z[:, :, head] = clean_cache[hook.name][:, :, head]
        return z

    explicit = metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch_head)]))
    assert torch.isclose(result[layer, head], explicit, atol=1e-5)


def test_test_prompt_reports_the_models_top_token(model, capsys):
    prompt = "The cat sat on the"
    logits = model(prompt)[0, -1]
    top = model.to_single_str_token(int(logits.argmax()))
    tl_test_prompt(prompt, "mat", model, prepend_space_to_answer=True)
    printed = capsys.readouterr().out
    assert "Top 0th token" in printed and repr(top)[1:-1] in printed


def test_circuitsvis_attention_patterns_render(model):
    text = "The cat sat on the mat"
    _, cache = model.run_with_cache(text)
    pattern = cache["pattern", 0][0]
    assert torch.allclose(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-5)
    str_tokens = model.to_str_tokens(text)
    html = attention_patterns(tokens=str_tokens, attention=pattern).cdn_src
    assert "AttentionPatterns" in html and json.dumps({"tokens": str_tokens})[:-1] in html
