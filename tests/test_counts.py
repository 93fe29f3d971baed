"""Tests of moe_hooked.analysis.counts against hand computations and the paper's counts.

The toy counts: 2 domains ("a": 10 tokens, "b": 5 tokens), MoE layers 1 and 3,
4 experts, top-2 (baseline 2/4 = 0.5).

    a, layer 1: [10, 6, 4, 0]   expert 0 on every token; 6 tokens with 1, 4 with 2
    a, layer 3: [ 5, 5, 5, 5]   5 tokens {0, 1}, 5 tokens {2, 3}
    b, layer 1: [ 1, 1, 4, 4]   3 tokens {2, 3}, 1 token {0, 2}, 1 token {1, 3}
    b, layer 3: [ 5, 5, 0, 0]   5 tokens {0, 1}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from moe_hooked.analysis.counts import (
    RoutingCounts,
    adjust_pvalues,
    coactivation_matrix,
    coverage,
    domain_specialists,
    routing_entropy,
    specialization,
    uniform_baseline,
)
from moe_hooked.analysis.paper import paper_routing_counts

COUNTS = [[[10, 6, 4, 0], [5, 5, 5, 5]], [[1, 1, 4, 4], [5, 5, 0, 0]]]
COACTIVATION = [
    [
        [[10, 6, 4, 0], [6, 6, 0, 0], [4, 0, 4, 0], [0, 0, 0, 0]],
        [[5, 5, 0, 0], [5, 5, 0, 0], [0, 0, 5, 5], [0, 0, 5, 5]],
    ],
    [
        [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 4, 3], [0, 1, 3, 4]],
        [[5, 5, 0, 0], [5, 5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    ],
]
ENTROPY_SUM = [[5.0, 8.0], [2.5, 1.0]]

PAPER_COUNTS = Path(__file__).resolve().parents[1].parent / "shared/data/paper/routing_counts.json"
# model -> (n_experts, top_k, n_MoE_layers) as described by the paper's model cards
PAPER_MODELS = {
    "deepseek-base": (64, 6, 27),
    "deepseek-chat": (64, 6, 27),
    "olmoe": (64, 8, 16),
    "qwen": (60, 4, 24),
}


def toy(**kwargs) -> RoutingCounts:
    args = dict(counts=np.array(COUNTS), domains=["a", "b"], layers=[1, 3], top_k=2,
                coactivation=np.array(COACTIVATION), entropy_sum=np.array(ENTROPY_SUM))
    args.update(kwargs)
    return RoutingCounts(**args)


def rows(df, domain, layer):
    return df[(df.domain == domain) & (df.layer == layer)]


# ---------------------------------------------------------------------------
# RoutingCounts
# ---------------------------------------------------------------------------


def test_tokens_derived_and_shapes():
    rc = toy()
    np.testing.assert_array_equal(rc.tokens, [[10, 10], [5, 5]])
    assert rc.tokens.dtype == np.int64 and rc.counts.dtype == np.int64
    assert (rc.n_domains, rc.n_layers, rc.n_experts) == (2, 2, 4)


def test_to_frame():
    df = toy().to_frame()
    assert list(df.columns) == ["domain", "layer", "expert", "count", "tokens"]
    assert len(df) == 16
    assert df.iloc[0].tolist() == ["a", 1, 0, 10, 10]
    assert df.iloc[11].tolist() == ["b", 1, 3, 4, 5]
    assert df.iloc[-1].tolist() == ["b", 3, 3, 0, 5]


def test_from_dict_sorts_layers_numerically_and_round_trips():
    data = {
        "a": {"10": [5, 5, 5, 5], "2": [10, 6, 4, 0]},
        "b": {"2": [1, 1, 4, 4], "10": [5, 5, 0, 0]},
    }
    rc = RoutingCounts.from_dict(data, top_k=2)
    assert rc.layers == [2, 10] and rc.domains == ["a", "b"]
    np.testing.assert_array_equal(rc.counts, COUNTS)
    assert rc.to_dict() == {
        "a": {"2": [10, 6, 4, 0], "10": [5, 5, 5, 5]},
        "b": {"2": [1, 1, 4, 4], "10": [5, 5, 0, 0]},
    }


@pytest.mark.parametrize("name", ["rc.npz", "rc.json", "rc_no_suffix"])
def test_save_load_round_trip(tmp_path, name):
    rc = toy()
    path = rc.save(tmp_path / name)
    assert path == tmp_path / name and path.exists()
    back = RoutingCounts.load(path)
    assert (back.domains, back.layers, back.top_k) == (rc.domains, rc.layers, rc.top_k)
    for field in ("counts", "tokens", "coactivation", "entropy_sum"):
        np.testing.assert_array_equal(getattr(back, field), getattr(rc, field))


def test_save_load_without_optional_fields(tmp_path):
    rc = toy(coactivation=None, entropy_sum=None)
    back = RoutingCounts.load(rc.save(tmp_path / "rc.json"))
    assert back.coactivation is None and back.entropy_sum is None


def test_add_sums_everything():
    rc = toy()
    both = rc + rc
    np.testing.assert_array_equal(both.counts, 2 * np.array(COUNTS))
    np.testing.assert_array_equal(both.tokens, [[20, 20], [10, 10]])
    np.testing.assert_array_equal(both.coactivation, 2 * np.array(COACTIVATION))
    np.testing.assert_array_equal(both.entropy_sum, [[10.0, 16.0], [5.0, 2.0]])
    np.testing.assert_array_equal(sum([rc, rc, rc]).counts, 3 * np.array(COUNTS))


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


def test_negative_counts():
    bad = np.array(COUNTS)
    bad[0, 0, 3] = -2
    bad[0, 0, 0] = 12
    with pytest.raises(ValueError, match="non-negative"):
        toy(counts=bad, coactivation=None)


def test_sum_not_multiple_of_top_k():
    bad = np.array(COUNTS)
    bad[1, 0, 0] = 2  # b, layer 1 sums to 11
    with pytest.raises(ValueError, match=r"'b'.*layer 1.*sum to 11.*top_k=2"):
        toy(counts=bad, coactivation=None)


def test_empty_domain():
    bad = np.array(COUNTS)
    bad[1] = 0
    with pytest.raises(ValueError, match="domain 'b' has no tokens: the corpus was empty"):
        toy(counts=bad, coactivation=None)


def test_empty_layer_of_a_domain():
    bad = np.array(COUNTS)
    bad[0, 1] = 0
    with pytest.raises(ValueError, match="domain 'a' has no routing decisions at MoE layer 3"):
        toy(counts=bad, coactivation=None)


def test_label_and_shape_errors():
    with pytest.raises(ValueError, match="1 domains given but counts has 2"):
        toy(domains=["a"])
    with pytest.raises(ValueError, match="layers must be unique"):
        toy(layers=[1, 1])
    with pytest.raises(ValueError, match="top_k"):
        toy(top_k=5)
    with pytest.raises(ValueError, match="counts must be a non-empty"):
        RoutingCounts(counts=np.zeros((2, 4), dtype=int), domains=["a", "b"], layers=[1], top_k=1)
    with pytest.raises(ValueError, match="whole numbers"):
        toy(counts=np.array(COUNTS) + 0.5, coactivation=None)
    with pytest.raises(ValueError, match="tokens has shape"):
        toy(tokens=np.array([10, 5]))
    with pytest.raises(ValueError, match="exceeds the number of tokens"):
        toy(tokens=np.array([[9, 10], [5, 5]]))
    with pytest.raises(ValueError, match="entropy_sum has shape"):
        toy(entropy_sum=np.zeros(2))


def test_explicit_tokens_allow_dropped_decisions():
    # 11 routing decisions over 6 tokens with top-2: one slot dropped, fine when tokens are given
    rc = toy(counts=np.array([[[6, 5, 0, 0]]]), domains=["a"], layers=[1],
             tokens=np.array([[6]]), coactivation=None, entropy_sum=None)
    np.testing.assert_array_equal(rc.tokens, [[6]])


def test_bad_coactivation():
    co = np.array(COACTIVATION)
    co[0, 0, 0, 1] = 5  # no longer symmetric
    with pytest.raises(ValueError, match="symmetric"):
        toy(coactivation=co)
    co = np.array(COACTIVATION)
    co[0, 0, 3, 3] = 1  # diagonal differs from counts
    with pytest.raises(ValueError, match="diagonal"):
        toy(coactivation=co)
    with pytest.raises(ValueError, match="coactivation has shape"):
        toy(coactivation=np.zeros((2, 2, 4)))


def test_from_dict_errors():
    with pytest.raises(ValueError, match="domain 'b' has layers"):
        RoutingCounts.from_dict({"a": {"1": [2, 0]}, "b": {"2": [2, 0]}}, top_k=1)
    with pytest.raises(ValueError, match="different lengths"):
        RoutingCounts.from_dict({"a": {"1": [2, 0]}, "b": {"1": [2, 0, 0]}}, top_k=1)


def test_add_mismatch():
    rc = toy()
    with pytest.raises(ValueError, match="different domains"):
        rc + toy(domains=["a", "c"])
    with pytest.raises(ValueError, match="only one operand has coactivation"):
        rc + toy(coactivation=None)


# ---------------------------------------------------------------------------
# Corrections and specialization
# ---------------------------------------------------------------------------


def test_uniform_baseline():
    assert uniform_baseline(2, 4) == 0.5
    assert uniform_baseline(6, 64) == 6 / 64
    with pytest.raises(ValueError):
        uniform_baseline(0, 4)


def test_adjust_pvalues_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04; Holm 4p, 3p, 2p, 1p = .02, .03, .06, .04 -> cummax
    np.testing.assert_allclose(adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    # BH (4/i) p = .02, .02, .04, .04 -> running min from the top
    np.testing.assert_allclose(adjust_pvalues(p, "fdr_bh"), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(adjust_pvalues(p, "bonferroni"), [0.04, 0.16, 0.12, 0.02])
    np.testing.assert_allclose(adjust_pvalues(p, "none"), p)


def test_adjust_pvalues_monotonicity_and_clipping():
    p = [0.04, 0.041, 0.9]
    # Holm: 3*.04=.12, 2*.041=.082 -> raised to .12, .9
    np.testing.assert_allclose(adjust_pvalues(p, "holm"), [0.12, 0.12, 0.9])
    # BH: 3*.04=.12 lowered to 1.5*.041=.0615, .0615, .9
    np.testing.assert_allclose(adjust_pvalues(p, "fdr_bh"), [0.0615, 0.0615, 0.9])
    np.testing.assert_allclose(adjust_pvalues([0.5, 0.6], "bonferroni"), [1.0, 1.0])
    np.testing.assert_allclose(adjust_pvalues([0.5, 0.6], "holm"), [1.0, 1.0])
    # one family per row
    np.testing.assert_allclose(adjust_pvalues([p, p], "holm"), [[0.12, 0.12, 0.9]] * 2)
    with pytest.raises(ValueError, match="unknown correction"):
        adjust_pvalues(p, "sidak")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adjust_pvalues([0.1, 1.5])


def test_specialization_by_hand():
    df = specialization(toy())
    assert list(df.columns) == ["domain", "layer", "expert", "count", "tokens", "fraction",
                                "baseline", "ratio", "ratio_ci_low", "ratio_ci_high", "p_value", "p_adjusted",
                                "specialized"]
    assert df["ratio_ci_low"].isna().all()  # no per-sequence counts: no interval
    a1 = rows(df, "a", 1)
    np.testing.assert_allclose(a1.fraction, [1.0, 0.6, 0.4, 0.0])
    np.testing.assert_allclose(a1.ratio, [2.0, 1.2, 0.8, 0.0])
    # P(X >= c), X ~ Bin(10, 1/2): c=10 -> 1/1024, 6 -> 386/1024, 4 -> 848/1024, 0 -> 1
    np.testing.assert_allclose(a1.p_value, [1 / 1024, 386 / 1024, 848 / 1024, 1.0])
    np.testing.assert_allclose(rows(df, "a", 3).p_value, [638 / 1024] * 4)
    # Bin(5, 1/2): c=1 -> 31/32, 4 -> 6/32, 5 -> 1/32
    np.testing.assert_allclose(rows(df, "b", 1).p_value, [31 / 32, 31 / 32, 6 / 32, 6 / 32])
    np.testing.assert_allclose(rows(df, "b", 3).p_value, [1 / 32, 1 / 32, 1.0, 1.0])
    # Holm over the 8 tests of domain a: smallest p * 8; domain b: 8/32, 8/32 (= 7/32 raised)
    assert df.p_adjusted.iloc[0] == pytest.approx(8 / 1024)
    np.testing.assert_allclose(rows(df, "b", 3).p_adjusted[:2], [0.25, 0.25])
    assert df.specialized.tolist() == [True] + [False] * 15


def test_specialization_families_and_threshold():
    rc = toy()
    # family "layer": b, layer 3 is its own family of 4 -> Holm 4/32, 4/32 (= 3/32 raised)
    df = specialization(rc, family="layer")
    np.testing.assert_allclose(rows(df, "b", 3).p_adjusted, [0.125, 0.125, 1.0, 1.0])
    # no correction: b/3 experts 0, 1 (p=1/32) become specialized too
    df = specialization(rc, correction="none")
    assert df.specialized.sum() == 3
    # ... unless their ratio (2.0) must reach 2.5
    assert not specialization(rc, correction="none", threshold=2.5).specialized.any()
    with pytest.raises(ValueError, match="unknown family"):
        specialization(rc, family="expert")


@pytest.mark.parametrize("count, tokens, top_k, n_experts",
                         [(10, 10, 2, 4), (7, 40, 6, 64), (0, 5, 2, 3), (523, 4000, 8, 64)])
def test_p_value_matches_binomtest(count, tokens, top_k, n_experts):
    counts = np.zeros((1, 1, n_experts), dtype=np.int64)
    counts[0, 0, 0] = count
    counts[0, 0, -1] = tokens  # some other expert on every token (top_k >= 2 here)
    rc = RoutingCounts(counts=counts, tokens=np.array([[tokens]]), domains=["x"], layers=[0],
                       top_k=top_k)
    expected = binomtest(count, tokens, top_k / n_experts, alternative="greater").pvalue
    got = specialization(rc, correction="none").p_value.iloc[0]
    assert got == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------
# Coverage, entropy, coactivation, specialists
# ---------------------------------------------------------------------------


def test_coverage_by_hand():
    df = coverage(toy(), q=[0.5, 0.8])
    assert list(df.columns) == ["domain", "layer", "q", "n_experts_needed", "fraction_of_experts"]
    # q=.5: a1 10/20 -> 1; a3 5+5 -> 2; b1 4+4 (4 < 5) -> 2; b3 5/10 -> 1
    # q=.8: a1 10+6=16 -> 2; a3 all 4; b1 4+4=8 -> 2; b3 5+5 -> 2
    assert df.n_experts_needed.tolist() == [1, 2, 2, 1, 2, 4, 2, 2]
    np.testing.assert_allclose(df.fraction_of_experts, np.array([1, 2, 2, 1, 2, 4, 2, 2]) / 4)
    assert df.q.tolist() == [0.5] * 4 + [0.8] * 4
    assert coverage(toy(), q=1.0).n_experts_needed.tolist() == [3, 4, 4, 2]
    with pytest.raises(ValueError, match="q must be"):
        coverage(toy(), q=0)


def test_routing_entropy_by_hand():
    df = routing_entropy(toy())
    expected = [
        -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)),
        math.log(4),
        -(2 * 0.1 * math.log(0.1) + 2 * 0.4 * math.log(0.4)),
        math.log(2),
    ]
    np.testing.assert_allclose(df.entropy, expected)
    np.testing.assert_allclose(df.max_entropy, math.log(4))
    np.testing.assert_allclose(df.normalized_entropy, np.array(expected) / math.log(4))
    assert df.normalized_entropy.iloc[1] == pytest.approx(1.0)
    assert df.normalized_entropy.iloc[3] == pytest.approx(0.5)
    np.testing.assert_allclose(df.mean_router_entropy, [0.5, 0.8, 0.5, 0.2])
    assert routing_entropy(toy(entropy_sum=None)).mean_router_entropy.isna().all()


def test_coactivation_matrix_by_hand():
    rc = toy()
    raw = coactivation_matrix(rc, "a", 1, normalize=None)
    np.testing.assert_array_equal(raw, COACTIVATION[0][0])
    cond = coactivation_matrix(rc, "a", 1, normalize="conditional")
    np.testing.assert_allclose(cond, [[1, 0.6, 0.4, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    jac = coactivation_matrix(rc, "a", 1)
    # J[0,1] = 6/(10+6-6), J[0,2] = 4/(10+4-4), expert 3 never selected -> 0
    np.testing.assert_allclose(jac, [[1, 0.6, 0.4, 0], [0.6, 1, 0, 0], [0.4, 0, 1, 0],
                                     [0, 0, 0, 0]])
    # b, layer 1: J[2,3] = 3/(4+4-3) = 0.6, J[0,2] = 1/(1+4-1) = 0.25
    jac = coactivation_matrix(rc, "b", 1)
    assert jac[2, 3] == pytest.approx(0.6) and jac[0, 2] == pytest.approx(0.25)
    assert coactivation_matrix(rc, "b", 1, "conditional")[2, 3] == pytest.approx(0.75)


def test_coactivation_matrix_errors():
    with pytest.raises(ValueError, match="run routing_stats with coactivation=True"):
        coactivation_matrix(toy(coactivation=None), "a", 1)
    with pytest.raises(ValueError, match="unknown domain 'z'"):
        coactivation_matrix(toy(), "z", 1)
    with pytest.raises(ValueError, match="unknown MoE layer 2"):
        coactivation_matrix(toy(), "a", 2)
    with pytest.raises(ValueError, match="normalize"):
        coactivation_matrix(toy(), "a", 1, normalize="cosine")


def test_domain_specialists_by_hand():
    df = domain_specialists(toy(), top=2)
    assert list(df.columns) == ["domain", "layer", "expert", "fraction",
                                "other_domains_fraction", "lift"]
    # a1 fractions [1, .6, .4, 0] vs b1 [.2, .2, .8, .8] -> lift [5, 3, .5, 0]
    # a3 [.5]*4 vs b3 [1, 1, 0, 0] -> [.5, .5, inf, inf]; b1 -> [.2, 1/3, 2, inf]; b3 -> [2, 2, 0, 0]
    assert df.expert.tolist() == [0, 1, 2, 3, 3, 2, 0, 1]
    np.testing.assert_allclose(df.lift, [5, 3, np.inf, np.inf, np.inf, 2, 2, 2])
    np.testing.assert_allclose(df.fraction, [1, 0.6, 0.5, 0.5, 0.8, 0.8, 1, 1])
    np.testing.assert_allclose(df.other_domains_fraction, [0.2, 0.2, 0, 0, 0, 0.4, 0.5, 0.5])
    assert len(domain_specialists(toy(), top=10)) == 16
    with pytest.raises(ValueError, match="at least two domains"):
        domain_specialists(toy(counts=np.array(COUNTS[:1]), domains=["a"], coactivation=None,
                               entropy_sum=None))


# ---------------------------------------------------------------------------
# The paper's published counts
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_counts():
    if not PAPER_COUNTS.exists():
        pytest.skip(f"paper routing counts not found at {PAPER_COUNTS}")
    return json.loads(PAPER_COUNTS.read_text())["counts"]


# the model's MoE layer indices: OLMoE and Qwen1.5-MoE have no dense layer, DeepSeekMoE-16B's layer 0 is dense
MODEL_MOE_LAYERS = {"olmoe": range(16), "qwen": range(24), "deepseek-base": range(1, 28), "deepseek-chat": range(1, 28)}


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
def test_paper_layer_keys_map_to_model_layers(paper_counts, model):
    rc = paper_routing_counts(PAPER_COUNTS, model)
    assert rc.layers == list(MODEL_MOE_LAYERS[model])
    offset = 1 if model in ("olmoe", "qwen") else 0  # the paper's keys are 1-based there
    raw = paper_counts[model]
    for domain in rc.domains:
        for layer in (rc.layers[0], rc.layers[-1]):
            assert rc.counts[rc.domain_index(domain), rc.layer_index(layer)].tolist() == raw[domain][str(layer + offset)]
    with pytest.raises(ValueError, match="unknown paper model"):
        paper_routing_counts(PAPER_COUNTS, "mixtral")


def test_paper_layer_mapping_on_a_small_file(tmp_path):
    """Runs without the shared data: keys "1", "2" are OLMoE layers 0, 1 and DeepSeek layers 1, 2."""
    path = tmp_path / "counts.json"
    layers = {"1": [24, 0] + [0] * 10, "2": [0, 24] + [0] * 10}  # 24: a multiple of both top-k (8 and 6)
    path.write_text(json.dumps({"counts": {"olmoe": {"x": layers}, "deepseek-base": {"x": layers}}}))
    olmoe = paper_routing_counts(path, "olmoe")
    assert olmoe.layers == [0, 1] and olmoe.counts[0, 0, 0] == 24 and olmoe.top_k == 8
    assert paper_routing_counts(path, "deepseek-base").layers == [1, 2]
    with pytest.raises(ValueError, match="no counts for 'qwen'"):
        paper_routing_counts(path, "qwen")


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
def test_paper_counts(paper_counts, model):
    n_experts, top_k, n_layers = PAPER_MODELS[model]
    raw = paper_counts[model]
    rc = RoutingCounts.from_dict(raw, top_k=top_k)
    assert rc.counts.shape == (len(raw), n_layers, n_experts)
    assert uniform_baseline(rc.top_k, rc.n_experts) == top_k / n_experts
    for domain, layers in raw.items():
        sums = {sum(v) for v in layers.values()}
        assert len(sums) == 1, f"{model}/{domain}: tokens differ between layers"
        assert sums.pop() % top_k == 0, f"{model}/{domain}: sum of counts / k is not an integer"
    assert (rc.tokens == rc.tokens[:, :1]).all()
    df = specialization(rc)
    assert (df.baseline == top_k / n_experts).all()
    np.testing.assert_allclose(df.groupby(["domain", "layer"]).fraction.sum(), top_k)
    assert df.specialized.any()
    assert df[df.specialized].ratio.gt(1).all()
