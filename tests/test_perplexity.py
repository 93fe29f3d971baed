"""Perplexity vs top-k and the pruning curve, against losses computed by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hf_models import olmoe_config, qwen2_moe_config
from tiny import tiny_model

from moe_hooked.analysis.counts import RoutingCounts
from moe_hooked.analysis.perplexity import perplexity_vs_top_k, pruning_curve

CORPORA = {
    "english": [
        "The cat sat on the mat.",
        "Routers send each token to a few experts.",
        "The moon is calm tonight.",
        "Experts add their outputs.",
        "A cat looked at the moon.",
    ],
    "code": ["def add(a, b): return a + b", "2 + 3 = 5", "return a * b"],
}
CONFIGS = {"olmoe": olmoe_config, "qwen2_moe": qwen2_moe_config}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tmp_path_factory):
    return tiny_model(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def token_rows(model, text, max_length=None):
    """The text's token ids (with BOS where the model prepends one), cut every `max_length` ids."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    bos = [model.bos_token_id()] if model.cfg.default_prepend_bos else []
    step = (max_length or len(ids)) - len(bos)
    return [torch.tensor([bos + ids[i : i + step]]) for i in range(0, len(ids), step)]


def mean_nll_by_hand(model, texts, hooks=(), max_length=None):
    """Mean next-token NLL, one unpadded run per chunk: log-softmax and gather by hand."""
    total, count = 0.0, 0
    for text in texts:
        for tokens in token_rows(model, text, max_length):
            logits = model.run_with_hooks(tokens, fwd_hooks=list(hooks)).double()
            log_probs = logits[0, :-1].log_softmax(-1)
            total -= log_probs[torch.arange(tokens.shape[1] - 1), tokens[0, 1:]].sum().item()
            count += tokens.shape[1] - 1
    return total / count, count


def top1_by_hand(model):
    """Hooks zeroing every slot but the first in every MoE layer, written independently."""

    def first_slot_only(weights, hook):
        out = torch.zeros_like(weights)
        out[..., 0] = weights[..., 0]
        return out

    return [(f"blocks.{layer}.mlp.hook_topk_weights", first_slot_only) for layer in model.cfg.moe_layers]


def rows(frame, column, value):
    return frame[frame[column] == value].set_index("domain")


# ----------------------------------------------------------------------------- perplexity vs top-k
def test_full_top_k_equals_the_model_loss(model):
    frame = perplexity_vs_top_k(model, CORPORA, batch_size=2, progress=False)
    assert list(frame.columns) == ["domain", "k", "mean_log_ppl", "ppl", "delta_log_ppl", "ci_low", "ci_high",
                                   "ppl_ratio", "normalized_log_ppl", "n_tokens"]
    assert sorted(frame["k"].unique()) == list(range(1, model.cfg.top_k + 1))
    full = rows(frame, "k", model.cfg.top_k)
    for domain, texts in CORPORA.items():
        with torch.no_grad():
            loss = model(texts, return_type="loss").item()  # one right-padded batch, masked
        assert full.loc[domain, "mean_log_ppl"] == pytest.approx(loss, abs=1e-5)
        assert full.loc[domain, "n_tokens"] == sum(row.shape[1] - 1 for t in texts for row in token_rows(model, t))
    np.testing.assert_allclose(frame["ppl"], np.exp(frame["mean_log_ppl"]))


def test_top_1_by_hand_with_chunking(model):
    frame = perplexity_vs_top_k(model, CORPORA, ks=[1], max_length=6, batch_size=3, progress=False)
    top1 = rows(frame, "k", 1)
    for domain, texts in CORPORA.items():
        expected, count = mean_nll_by_hand(model, texts, top1_by_hand(model), max_length=6)
        assert top1.loc[domain, "mean_log_ppl"] == pytest.approx(expected, abs=1e-5)
        assert top1.loc[domain, "n_tokens"] == count
    unmodified, _ = mean_nll_by_hand(model, CORPORA["english"], max_length=6)
    assert top1.loc["english", "mean_log_ppl"] != pytest.approx(unmodified, abs=1e-4)


def per_text_nll(model, texts, hooks=()):
    """(summed NLL, predicted tokens) of each text, one unpadded run each."""
    return [mean_nll_by_hand(model, [text], hooks) for text in texts]


def test_delta_intervals_and_per_sample_average_by_hand(model):
    frame = perplexity_vs_top_k(model, CORPORA, ks=[1], batch_size=2, progress=False, n_boot=300)
    sample = perplexity_vs_top_k(model, CORPORA, ks=[1], average="sample", progress=False, n_boot=300)
    for domain, texts in CORPORA.items():
        top1 = per_text_nll(model, texts, top1_by_hand(model))
        full = per_text_nll(model, texts)
        n = np.array([c for _, c in full])
        deltas = np.array([m1 * c - m * c for (m1, c), (m, _) in zip(top1, full)])  # summed NLL change per text
        row = rows(frame, "k", 1).loc[domain]
        assert row["delta_log_ppl"] == pytest.approx(deltas.sum() / n.sum(), abs=1e-6)
        assert row["ppl_ratio"] == pytest.approx(np.exp(row["delta_log_ppl"]))
        per_text = deltas / n
        assert per_text.min() - 1e-6 <= row["ci_low"] <= row["delta_log_ppl"] <= row["ci_high"] <= per_text.max() + 1e-6
        macro = rows(sample, "k", 1).loc[domain]
        assert macro["mean_log_ppl"] == pytest.approx(np.mean([m for m, _ in top1]), abs=1e-6)
        assert macro["delta_log_ppl"] == pytest.approx(per_text.mean(), abs=1e-6)


def test_renormalize_scales_the_kept_weights(model):
    frame = perplexity_vs_top_k(model, CORPORA, ks=[1], renormalize=True, progress=False, n_boot=50)

    def first_slot_carries_all(weights, hook):
        out = torch.zeros_like(weights)
        out[..., 0] = weights.sum(-1)
        return out

    hooks = [(f"blocks.{layer}.mlp.hook_topk_weights", first_slot_carries_all) for layer in model.cfg.moe_layers]
    for domain, texts in CORPORA.items():
        expected, _ = mean_nll_by_hand(model, texts, hooks)
        assert rows(frame, "k", 1).loc[domain, "mean_log_ppl"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="average must be"):
        perplexity_vs_top_k(model, CORPORA, average="macro", progress=False)


def test_normalized_log_ppl_is_min_max_per_domain(model):
    frame = perplexity_vs_top_k(model, CORPORA, progress=False)
    for _, group in frame.groupby("domain"):
        x = group["mean_log_ppl"]
        np.testing.assert_allclose(group["normalized_log_ppl"], (x - x.min()) / (x.max() - x.min()))
        assert group["normalized_log_ppl"].min() == 0 and group["normalized_log_ppl"].max() == 1
    single = perplexity_vs_top_k(model, CORPORA, ks=[1], progress=False)
    assert (single["normalized_log_ppl"] == 0).all()


def test_perplexity_bad_input(model, monkeypatch):
    with pytest.raises(ValueError, match="'code' is empty"):
        perplexity_vs_top_k(model, {"english": ["a cat"], "code": ["  "]}, progress=False)
    with pytest.raises(ValueError, match="non-empty dict"):
        perplexity_vs_top_k(model, {}, progress=False)
    with pytest.raises(ValueError, match=rf"k must be in 1..{model.cfg.top_k}"):
        perplexity_vs_top_k(model, CORPORA, ks=[model.cfg.top_k + 1], progress=False)
    monkeypatch.setattr(model, "tokenizer", None)
    with pytest.raises(ValueError, match="no tokenizer"):
        perplexity_vs_top_k(model, CORPORA, progress=False)


# ----------------------------------------------------------------------------- pruning curve
def usage_by_hand(model, corpora):
    """Top-k selection counts [domain layer expert], one unpadded run per text."""
    counts = np.zeros((len(corpora), len(model.cfg.moe_layers), model.cfg.n_experts), dtype=np.int64)
    for d, texts in enumerate(corpora.values()):
        for text in texts:
            _, cache = model.run_with_cache(token_rows(model, text)[0])
            for i, layer in enumerate(model.cfg.moe_layers):
                ids = cache[f"blocks.{layer}.mlp.hook_topk_indices"].flatten()
                counts[d, i] += np.bincount(ids.numpy(), minlength=model.cfg.n_experts)
    return counts


def reroute_by_hand(pruned):
    def mask(ids):
        def hook(logits, hook):
            logits = logits.clone()
            logits[..., ids] = float("-inf")
            return logits

        return hook

    return [(f"blocks.{layer}.mlp.hook_router_logits", mask(ids)) for layer, ids in pruned.items()]


def test_pruning_curve_against_hand_rerouting(model):
    cfg = model.cfg
    usage = usage_by_hand(model, CORPORA).sum(0)
    frame = pruning_curve(model, CORPORA, fractions=(0, 0.5), usage=usage, batch_size=2, progress=False)
    assert list(frame.columns) == ["domain", "fraction", "n_pruned_per_layer", "mean_log_ppl", "ppl"]
    n_half = cfg.n_experts // 2
    assert rows(frame, "fraction", 0.5)["n_pruned_per_layer"].tolist() == [n_half] * len(CORPORA)
    pruned = {}
    for i, layer in enumerate(cfg.moe_layers):  # least used first, lower id first among ties
        order = sorted(range(cfg.n_experts), key=lambda e: (usage[i, e], e))
        pruned[layer] = order[:n_half]
    changes = []
    for domain, texts in CORPORA.items():
        unmodified, _ = mean_nll_by_hand(model, texts)
        assert rows(frame, "fraction", 0).loc[domain, "mean_log_ppl"] == pytest.approx(unmodified, abs=1e-5)
        expected, _ = mean_nll_by_hand(model, texts, reroute_by_hand(pruned))
        assert rows(frame, "fraction", 0.5).loc[domain, "mean_log_ppl"] == pytest.approx(expected, abs=1e-5)
        changes.append(abs(expected - unmodified))
    assert max(changes) > 1e-4  # the pruned experts were in use


def test_pruning_usage_counted_on_the_corpora(model):
    counts = usage_by_hand(model, CORPORA)
    routing = RoutingCounts(counts=counts, domains=list(CORPORA), layers=list(model.cfg.moe_layers), top_k=model.cfg.top_k)
    kwargs = dict(fractions=(0.25, 0.5), batch_size=2, progress=False)
    counted = pruning_curve(model, CORPORA, **kwargs)
    pd.testing.assert_frame_equal(counted, pruning_curve(model, CORPORA, usage=routing, **kwargs))


def test_pruning_bad_input(model):
    cfg = model.cfg
    too_many = (cfg.n_experts - cfg.top_k + 1) / cfg.n_experts
    with pytest.raises(ValueError, match="leaving fewer than top_k"):
        pruning_curve(model, CORPORA, fractions=(too_many,), progress=False)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pruning_curve(model, CORPORA, fractions=(1.5,), progress=False)
    with pytest.raises(ValueError, match="usage has shape"):
        pruning_curve(model, CORPORA, usage=np.ones((1, cfg.n_experts)), progress=False)
    with pytest.raises(ValueError, match="'empty' is empty"):
        pruning_curve(model, {"empty": []}, progress=False)
