"""Padded batches: every row of a right-padded batch, run with its attention mask, gives what the
row gives alone (logits, loss, last-token lenses, routing), and the cache keeps the mask."""

from __future__ import annotations

import pytest
import torch
from hf_models import qwen2_moe_config
from tiny import tiny_model

from moe_hooked.lens import expert_lens, logit_lens, topk_cosine_from_cache
from moe_hooked.viz.routing import routing_view, routing_weights

TEXTS = [
    "The cat sat on the mat and looked at the moon.",
    "def add(a, b): return a + b",
    "2 + 3 = 5",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(qwen2_moe_config(), tmp_path_factory.mktemp("qwen"), seed=2)


@pytest.fixture(scope="module")
def padded(model):
    tokens, mask = model.to_tokens(TEXTS, return_attention_mask=True)
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    return tokens, mask, logits, cache


@pytest.fixture(scope="module")
def alone(model):
    """Each text run on its own: (tokens [1 n], logits [1 n d_vocab], cache)."""
    return [(model.to_tokens(text), *model.run_with_cache(text)) for text in TEXTS]


def test_to_tokens_returns_the_mask_of_real_tokens(model, padded, alone):
    tokens, mask, _, cache = padded
    lengths = [row_tokens.shape[1] for row_tokens, _, _ in alone]
    assert len(set(lengths)) == len(TEXTS)  # the batch really is padded
    assert mask.sum(1).tolist() == lengths
    for i, (row_tokens, _, _) in enumerate(alone):
        assert torch.equal(tokens[i, : lengths[i]], row_tokens[0])
        assert (tokens[i, lengths[i]:] == model.pad_token_id()).all()
    assert torch.equal(cache.attention_mask, mask)
    _, text_cache = model.run_with_cache(TEXTS)
    assert torch.equal(text_cache.attention_mask, mask)


@torch.no_grad()
def test_every_row_matches_its_unpadded_run(model, padded, alone):
    tokens, mask, logits, _ = padded
    nll_sum, n_targets = 0.0, 0
    per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    for i, (row_tokens, row_logits, _) in enumerate(alone):
        n = row_tokens.shape[1]
        torch.testing.assert_close(logits[i, :n], row_logits[0], atol=1e-5, rtol=1e-5)
        row_loss = model(row_tokens, return_type="loss", loss_per_token=True)[0]
        torch.testing.assert_close(per_token[i, : n - 1], row_loss, atol=1e-5, rtol=1e-5)
        assert (per_token[i, n - 1:] == 0).all()
        nll_sum, n_targets = nll_sum + float(row_loss.sum()), n_targets + n - 1
    batch_loss = model(tokens, attention_mask=mask, return_type="loss")
    assert batch_loss.item() == pytest.approx(nll_sum / n_targets, rel=1e-5)
    assert model(TEXTS, return_type="loss").item() == pytest.approx(batch_loss.item(), rel=1e-6)


def assert_same_lens(batch_lens, row_lens):
    keys = [column for column in batch_lens.columns if column not in ("prob", "weight")]
    assert batch_lens[keys].equals(row_lens[keys])
    assert batch_lens["prob"].to_numpy() == pytest.approx(row_lens["prob"].to_numpy(), abs=1e-5)


def test_last_token_lenses_and_routing_read_each_rows_last_real_token(model, padded, alone):
    _, _, _, cache = padded
    for i, (row_tokens, _, row_cache) in enumerate(alone):
        assert_same_lens(logit_lens(model, cache, pos=-1, batch=i), logit_lens(model, row_cache, pos=-1))
        assert_same_lens(expert_lens(model, cache, pos=-1, batch=i), expert_lens(model, row_cache, pos=-1))
        assert_same_lens(expert_lens(model, cache, pos=-3, batch=i), expert_lens(model, row_cache, pos=-3))
        batch_routing, layers = routing_weights(cache, batch=i)
        torch.testing.assert_close(batch_routing, routing_weights(row_cache)[0], atol=1e-5, rtol=1e-5)
        routing_view(cache, model.to_str_tokens(row_tokens[0]), batch=i)  # one label per real token


def test_cosine_from_a_padded_cache_counts_only_real_tokens(model, padded):
    _, mask, _, cache = padded
    table = topk_cosine_from_cache(model, cache)
    assert (table.loc[table.variant == "all_tokens", "n_tokens"] == int(mask.sum())).all()
    assert (table.loc[table.variant == "last_token", "n_tokens"] == len(TEXTS)).all()


def test_padded_tokens_without_their_mask_warn(model, padded):
    tokens, mask, _, _ = padded
    with pytest.warns(UserWarning, match="return_attention_mask=True"):
        model(tokens)
    with pytest.warns(UserWarning, match="pass its attention_mask"):
        model.run_with_cache(tokens)
