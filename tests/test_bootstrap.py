"""Sequence-bootstrap intervals and the sequence-level specialization test, on synthetic data
with a known answer, and per-sequence routing counts against hand counts."""

from __future__ import annotations

import numpy as np
import pytest
from test_perplexity import CORPORA, token_rows
from test_perplexity import model as model  # noqa: F401 (the fixture)

from moe_hooked.analysis import routing_stats, specialization
from moe_hooked.analysis.bootstrap import bootstrap_greater_test, bootstrap_ratio
from moe_hooked.analysis.counts import RoutingCounts


def clustered_sequences(rng, n_seq: int, true_rate: float):
    """Per sequence, tokens [n_seq] and hits [n_seq]: each sequence has its own rate drawn
    around `true_rate` (tokens of one sequence are dependent), so the pooled ratio's
    expectation is `true_rate`."""
    tokens = rng.integers(20, 200, size=n_seq)
    rates = rng.beta(2 * true_rate / (1 - true_rate), 2, size=n_seq)  # mean true_rate
    return rng.binomial(tokens, rates), tokens


def test_bootstrap_interval_covers_the_true_ratio_at_its_level():
    rng = np.random.default_rng(0)
    true_rate, trials = 0.3, 300
    covered = 0
    for trial in range(trials):
        hits, tokens = clustered_sequences(rng, 60, true_rate)
        low, high = bootstrap_ratio(hits, tokens, confidence=0.9, n_boot=400, seed=trial)
        covered += low <= true_rate <= high
    # 90% nominal; 300 trials: binomial sd 1.7%, percentile bootstrap slightly under-covers
    assert 0.84 <= covered / trials <= 0.95


def test_token_level_intervals_would_be_too_narrow():
    """The reason for resampling sequences: a token-level binomial interval misses far more often."""
    rng = np.random.default_rng(1)
    misses_token, misses_sequence = 0, 0
    for trial in range(100):
        hits, tokens = clustered_sequences(rng, 60, 0.3)
        p = hits.sum() / tokens.sum()
        half = 1.645 * np.sqrt(p * (1 - p) / tokens.sum())
        misses_token += abs(p - 0.3) > half
        low, high = bootstrap_ratio(hits, tokens, confidence=0.9, n_boot=300, seed=trial)
        misses_sequence += not low <= 0.3 <= high
    assert misses_token > 2 * misses_sequence


def test_sequence_test_holds_its_level_under_the_null():
    rng = np.random.default_rng(2)
    p_values = []
    for trial in range(200):
        hits, tokens = clustered_sequences(rng, 80, 0.25)
        p, _, _ = bootstrap_greater_test(hits, tokens, 0.25, n_boot=300, seed=trial)
        p_values.append(float(p))
    assert np.mean(np.array(p_values) <= 0.05) <= 0.09
    hits, tokens = clustered_sequences(rng, 80, 0.5)
    assert bootstrap_greater_test(hits, tokens, 0.25)[0] < 1e-6


def test_routing_stats_keeps_per_sequence_counts(model):  # noqa: F811
    counts = routing_stats(model, CORPORA, batch_size=2, max_length=6, progress=False)
    n_chunks = [sum(len(token_rows(model, t, 6)) for t in texts) for texts in CORPORA.values()]
    assert counts.sequence_counts.shape == (sum(n_chunks), len(model.cfg.moe_layers), model.cfg.n_experts)
    assert counts.sequence_domains.tolist() == [0] * n_chunks[0] + [1] * n_chunks[1]
    rows = [row for text in CORPORA["english"] for row in token_rows(model, text, 6)]
    assert counts.sequence_tokens[: n_chunks[0]].tolist() == [row.shape[1] for row in rows]
    for s, row in enumerate(rows):
        _, cache = model.run_with_cache(row)
        for i, layer in enumerate(model.cfg.moe_layers):
            ids = cache[f"blocks.{layer}.mlp.hook_topk_indices"].flatten().numpy()
            np.testing.assert_array_equal(counts.sequence_counts[s, i], np.bincount(ids, minlength=model.cfg.n_experts))
    spec = specialization(counts, test="sequence", correction="none", threshold=None)
    assert (spec["ratio_ci_low"] <= spec["ratio"] + 1e-12).all() and (spec["ratio"] <= spec["ratio_ci_high"] + 1e-12).all()


def test_sequence_specialization_needs_effect_and_significance():
    """Expert 0 is picked 1.3x uniform on every sequence: significant, yet below the default
    effect size 1.5; expert 1 is 2x in only half the sequences (0 in the others): its ratio is
    the same 1.0 in total as chance, never specialized; expert 2 is 2x everywhere."""
    n_seq, tokens = 40, 100
    seq = np.zeros((n_seq, 1, 8), dtype=np.int64)
    seq[:, 0, 0] = 33  # uniform rate k/E = 2/8 = 25 per 100 tokens: ratio 1.32
    seq[: n_seq // 2, 0, 1], seq[n_seq // 2 :, 0, 1] = 50, 0
    seq[:, 0, 2] = 50
    seq[:, 0, 3:] = 0
    rest = 2 * tokens - seq[:, 0, :3].sum(-1)  # every token picks 2 experts
    seq[:, 0, 3], seq[:, 0, 4] = rest // 2, rest - rest // 2
    counts = RoutingCounts(counts=seq.sum(0)[None], domains=["d"], layers=[0], top_k=2,
                           sequence_counts=seq, sequence_tokens=np.full(n_seq, tokens),
                           sequence_domains=np.zeros(n_seq, dtype=int))
    spec = specialization(counts, test="sequence").set_index("expert")
    assert spec.loc[0, "p_adjusted"] < 0.05 and not spec.loc[0, "specialized"]  # 1.32 < 1.5
    assert spec.loc[1, "ratio"] == pytest.approx(1.0) and not spec.loc[1, "specialized"]
    assert spec.loc[2, "specialized"]
    np.testing.assert_allclose(spec.loc[2, ["ratio_ci_low", "ratio_ci_high"]], [2.0, 2.0])
    with pytest.raises(ValueError, match="per-sequence counts"):
        specialization(RoutingCounts(counts=seq.sum(0)[None], domains=["d"], layers=[0], top_k=2), test="sequence")
    with pytest.raises(ValueError, match="go together"):
        RoutingCounts(counts=seq.sum(0)[None], domains=["d"], layers=[0], top_k=2, sequence_counts=seq)
