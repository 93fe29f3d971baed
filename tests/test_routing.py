"""Tests of moe_hooked.analysis.routing against counts made by hand from unpadded runs."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pytest
from hf_models import olmoe_config, qwen2_moe_config
from tiny import tiny_model

from moe_hooked.analysis import (
    coverage,
    routing_entropy,
    routing_stats,
    specialization,
    top_tokens_per_expert,
)
from moe_hooked.data import load_texts
from moe_hooked.lens import COSINE_VARIANTS, expert_lens, logit_lens, topk_cosine

DOMAINS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "domains"
CORPORA = {
    "prose": ["The cat sat on the mat and looked at the moon.", "Le chat dort sur le canape.", "The moon."],
    "code": ["def add(a, b): return a + b", "2 + 3 = 5 and 7 * 6 = 42"],
}


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    return tiny_model(olmoe_config(), tmp_path_factory.mktemp("olmoe"), seed=3)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Layer 1 is dense: MoE layers are 0 and 2."""
    return tiny_model(qwen2_moe_config(), tmp_path_factory.mktemp("qwen"), seed=4)


def hand_routing(model, texts):
    """Counts [L E], coactivation [L E E], entropy sum [L] and tokens, running each text alone."""
    layers, n_experts = model.cfg.moe_layers, model.cfg.n_experts
    counts = np.zeros((len(layers), n_experts), dtype=np.int64)
    coactivation = np.zeros((len(layers), n_experts, n_experts), dtype=np.int64)
    entropy = np.zeros(len(layers))
    tokens = 0
    for text in texts:
        _, cache = model.run_with_cache(text)
        tokens += cache["hook_embed"].shape[1]
        for i, layer in enumerate(layers):
            for chosen in cache[f"blocks.{layer}.mlp.hook_topk_indices"][0].tolist():
                for a in chosen:
                    counts[i, a] += 1
                    for b in chosen:
                        coactivation[i, a, b] += 1
            probs = cache[f"blocks.{layer}.mlp.hook_router_probs"][0].double()
            entropy[i] += -(probs * probs.log()).sum().item()
    return counts, coactivation, entropy, tokens


@pytest.mark.parametrize("name", ["olmoe", "qwen"])
def test_routing_stats_matches_hand_counts(name, request):
    model = request.getfixturevalue(name)
    stats = routing_stats(model, CORPORA, batch_size=2, progress=False)  # padded batches
    assert stats.domains == list(CORPORA)
    assert stats.layers == list(model.cfg.moe_layers)
    assert stats.top_k == model.cfg.top_k
    for d, texts in enumerate(CORPORA.values()):
        counts, coactivation, entropy, tokens = hand_routing(model, texts)
        np.testing.assert_array_equal(stats.counts[d], counts)
        np.testing.assert_array_equal(stats.coactivation[d], coactivation)
        np.testing.assert_allclose(stats.entropy_sum[d], entropy, rtol=1e-5)
        assert stats.tokens[d].tolist() == [tokens] * len(stats.layers)


def test_routing_stats_invariants(olmoe):
    stats = routing_stats(olmoe, CORPORA, batch_size=3, progress=False)
    np.testing.assert_array_equal(np.diagonal(stats.coactivation, axis1=-2, axis2=-1), stats.counts)
    np.testing.assert_array_equal(stats.coactivation, stats.coactivation.swapaxes(-1, -2))
    np.testing.assert_array_equal(stats.tokens * olmoe.cfg.top_k, stats.counts.sum(-1))
    assert np.all(stats.entropy_sum <= stats.tokens * math.log(olmoe.cfg.n_experts) + 1e-9)
    assert routing_stats(olmoe, CORPORA, coactivation=False, progress=False).coactivation is None


def test_streaming_ten_times_the_corpus_gives_ten_times_the_counts(olmoe):
    small = routing_stats(olmoe, CORPORA, batch_size=2, progress=False)
    large = routing_stats(olmoe, {d: texts * 10 for d, texts in CORPORA.items()}, batch_size=3, progress=False)
    np.testing.assert_array_equal(large.counts, 10 * small.counts)
    np.testing.assert_array_equal(large.tokens, 10 * small.tokens)
    np.testing.assert_array_equal(large.coactivation, 10 * small.coactivation)
    np.testing.assert_allclose(large.entropy_sum, 10 * small.entropy_sum, rtol=1e-6)


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_long_texts_are_chunked_and_max_tokens_caps_each_domain(olmoe, prepend_bos, monkeypatch):
    monkeypatch.setattr(olmoe.cfg, "default_prepend_bos", prepend_bos)
    text = " ".join(CORPORA["prose"] * 4)
    n_ids = len(olmoe.tokenizer.encode(text, add_special_tokens=False))
    max_length = 16
    assert n_ids > 3 * max_length
    stats = routing_stats(olmoe, {"long": [text]}, max_length=max_length, progress=False)
    n_chunks = math.ceil(n_ids / (max_length - prepend_bos))  # with BOS: one per chunk
    assert stats.tokens[0, 0] == n_ids + prepend_bos * n_chunks
    capped = routing_stats(olmoe, {"long": [text], "short": CORPORA["code"]}, max_tokens=20, progress=False)
    assert capped.tokens[:, 0].tolist() == [20, 20]


def test_routing_errors(olmoe, monkeypatch):
    with pytest.raises(ValueError, match="non-empty dict"):
        routing_stats(olmoe, {}, progress=False)
    with pytest.raises(ValueError, match="domain 'empty' is empty"):
        routing_stats(olmoe, {"prose": CORPORA["prose"], "empty": []}, progress=False)
    with pytest.raises(ValueError, match="domain 'blank' is empty"):
        routing_stats(olmoe, {"blank": ["  ", ""]}, progress=False)
    with pytest.raises(ValueError, match="single string"):
        routing_stats(olmoe, {"prose": "The cat."}, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        routing_stats(olmoe, CORPORA, max_length=olmoe.cfg.n_ctx + 1, progress=False)
    monkeypatch.setattr(olmoe, "tokenizer", None)
    with pytest.raises(ValueError, match="routing_stats tokenizes text, but this model has no tokenizer"):
        routing_stats(olmoe, CORPORA, progress=False)


def test_top_tokens_per_expert_matches_hand_counts(qwen):
    texts = CORPORA["prose"] + CORPORA["code"]
    layer, top = 2, 3
    table = top_tokens_per_expert(qwen, texts, layer=layer, top=top, batch_size=2, progress=False)
    assert list(table.columns) == [
        "layer", "expert", "rank", "token_id", "token", "count", "fraction_of_expert", "token_fraction"]
    pairs, occurrences, per_expert = collections.Counter(), collections.Counter(), collections.Counter()
    for text in texts:
        tokens = qwen.to_tokens(text)[0].tolist()
        _, cache = qwen.run_with_cache(text)
        occurrences.update(tokens)
        for token, chosen in zip(tokens, cache[f"blocks.{layer}.mlp.hook_topk_indices"][0].tolist()):
            pairs.update((e, token) for e in chosen)
            per_expert.update(chosen)
    assert table["layer"].eq(layer).all()
    assert sorted(table["expert"].unique()) == sorted(per_expert)
    for expert, rows in table.groupby("expert"):
        ranked = sorted(((-c, t) for (e, t), c in pairs.items() if e == expert))[:top]
        assert rows["rank"].tolist() == list(range(len(ranked)))
        assert rows["token_id"].tolist() == [t for _, t in ranked]
        assert rows["count"].tolist() == [-c for c, _ in ranked]
        np.testing.assert_allclose(rows["fraction_of_expert"], [-c / per_expert[expert] for c, _ in ranked])
        np.testing.assert_allclose(rows["token_fraction"], [-c / occurrences[t] for c, t in ranked])
        assert rows["token"].tolist() == [qwen.tokenizer.decode([t]) for _, t in ranked]


def test_top_tokens_per_expert_rejects_a_dense_layer(qwen):
    with pytest.raises(ValueError, match="layer 1 is not a MoE layer"):
        top_tokens_per_expert(qwen, CORPORA["prose"], layer=1, progress=False)


@pytest.mark.skipif(not DOMAINS.is_dir(), reason="the shared domain texts are absent")
def test_end_to_end_on_the_paper_domains(qwen):
    corpora = {path.stem: load_texts(path) for path in sorted(DOMAINS.glob("*.txt"))}
    budget = 192
    stats = routing_stats(qwen, corpora, max_length=64, batch_size=4, max_tokens=budget, progress=False)
    assert stats.domains == list(corpora)
    np.testing.assert_array_equal(stats.tokens, budget)
    table = specialization(stats)
    assert len(table) == len(corpora) * len(stats.layers) * qwen.cfg.n_experts
    np.testing.assert_allclose(table["baseline"], qwen.cfg.top_k / qwen.cfg.n_experts)
    assert coverage(stats, q=1.0)["n_experts_needed"].le(qwen.cfg.n_experts).all()
    assert routing_entropy(stats)["mean_router_entropy"].between(0, math.log(qwen.cfg.n_experts)).all()
    cosine = topk_cosine(qwen, corpora, max_length=64, batch_size=4, max_tokens=budget, progress=False)
    assert len(cosine) == len(corpora) * len(stats.layers) * len(COSINE_VARIANTS)
    assert cosine["cosine"].between(-1, 1 + 1e-6).all()
    assert cosine.loc[cosine["variant"] == "all_tokens", "n_tokens"].eq(budget).all()
    vocabulary = top_tokens_per_expert(qwen, corpora["github"], layer=0, max_length=64, max_tokens=budget,
                                       progress=False)
    assert vocabulary.groupby("expert")["count"].sum().le(budget).all()
    _, cache = qwen.run_with_cache([texts[0][:200] for texts in corpora.values()])
    lens = expert_lens(qwen, cache, pos=5, batch=len(corpora) - 1, include_shared=True)
    assert lens["prob"].between(0, 1).all()
    assert logit_lens(qwen, cache, pos=5)["layer"].nunique() == qwen.cfg.n_layers + 1
