"""Statistics over routing counts, whatever produced them.

Everything here reads a :class:`RoutingCounts`: how many tokens of each domain
(corpus) selected each routed expert at each MoE layer. The counts can come from
our own model (``routing_stats``) or from elsewhere, e.g. a paper's published
counts (:meth:`RoutingCounts.from_dict` reads the ``{domain: {layer: [count per
expert]}}`` layout).

Shapes use ``D`` domains, ``L`` MoE layers, ``E`` routed experts and ``k`` = top-k.

Functions:

- :func:`uniform_baseline` -- ``k / E``, the fraction of tokens an expert gets under
  uniform routing.
- :func:`adjust_pvalues` -- Holm, Bonferroni, Benjamini-Hochberg or no correction.
- :func:`specialization` -- one-sided binomial test of "fraction > k/E" per
  (domain, layer, expert).
- :func:`coverage` -- fewest experts covering a fraction q of the routing decisions.
- :func:`routing_entropy` -- entropy of the per-layer expert-usage distribution.
- :func:`coactivation_matrix` -- how often two experts are selected together.
- :func:`domain_specialists` -- experts used most by one domain relative to the others.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy import special

from moe_hooked.analysis.bootstrap import bootstrap_greater_test
from moe_hooked.analysis.pvalues import Correction, adjust_pvalues

__all__ = [
    "RoutingCounts",
    "uniform_baseline",
    "adjust_pvalues",
    "specialization",
    "coverage",
    "routing_entropy",
    "coactivation_matrix",
    "domain_specialists",
]

SEQUENCE_FIELDS = ("sequence_counts", "sequence_tokens", "sequence_domains")
Family = Literal["domain", "layer", "all"]


# ---------------------------------------------------------------------------
# RoutingCounts
# ---------------------------------------------------------------------------


def _as_counts(x, name: str) -> np.ndarray:
    """``x`` as an int64 array of non-negative whole numbers (ValueError otherwise)."""
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(
        np.isfinite(arr) & (arr == np.round(arr))
    ):
        raise ValueError(f"{name} must hold whole numbers")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative, found {arr.min()}")
    return arr.astype(np.int64)


def _check_shape(arr: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")


@dataclass(eq=False)
class RoutingCounts:
    """Per-domain, per-layer routing counts of the routed experts.

    Attributes:
        counts: ``[D, L, E]`` int64, number of tokens for which expert ``e`` was
            among the top-k at MoE layer ``layers[l]`` on domain ``domains[d]``.
        tokens: ``[D, L]`` int64, number of tokens routed. Default (None):
            ``counts.sum(-1) / top_k``, which must then be a whole number.
        domains: ``D`` domain names.
        layers: ``L`` MoE layer ids (model layer indices, or the source's keys).
        top_k: experts selected per token.
        coactivation: optional ``[D, L, E, E]`` int64, number of tokens on which
            both ``i`` and ``j`` were in the top-k (symmetric; diagonal = counts).
        entropy_sum: optional ``[D, L]`` float, sum over tokens of the entropy
            (nats) of the full router softmax.
        sequence_counts: optional ``[S, L, E]`` int32, ``counts`` of each of ``S``
            sequences (chunks), for sequence-level tests and intervals; summed over
            the sequences of a domain they give ``counts``.
        sequence_tokens: ``[S]`` tokens of each sequence (with ``sequence_counts``).
        sequence_domains: ``[S]`` index into ``domains`` of each sequence.
    """

    counts: np.ndarray
    domains: list[str]
    layers: list[int]
    top_k: int
    tokens: np.ndarray | None = None
    coactivation: np.ndarray | None = None
    entropy_sum: np.ndarray | None = None
    sequence_counts: np.ndarray | None = None
    sequence_tokens: np.ndarray | None = None
    sequence_domains: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.counts = _as_counts(self.counts, "counts")
        if self.counts.ndim != 3 or 0 in self.counts.shape:
            raise ValueError(
                f"counts must be a non-empty [n_domains, n_layers, n_experts] array, "
                f"got shape {self.counts.shape}"
            )
        self.domains = [str(d) for d in self.domains]
        self.layers = [int(layer) for layer in self.layers]
        self.top_k = int(self.top_k)
        self._check_labels()
        self._check_nonempty()
        self._set_tokens()
        self._check_optional()

    # -- validation ---------------------------------------------------------

    def _check_labels(self) -> None:
        D, L, E = self.counts.shape
        for name, labels, n in (("domains", self.domains, D), ("layers", self.layers, L)):
            if len(labels) != n:
                raise ValueError(f"{len(labels)} {name} given but counts has {n}")
            if len(set(labels)) != n:
                raise ValueError(f"{name} must be unique, got {labels}")
        if not 1 <= self.top_k <= E:
            raise ValueError(f"top_k must be in [1, n_experts={E}], got {self.top_k}")

    def _check_nonempty(self) -> None:
        decisions = self.counts.sum(-1)  # [D, L]
        for d, domain in enumerate(self.domains):
            if not decisions[d].any():
                raise ValueError(f"domain {domain!r} has no tokens: the corpus was empty")
            for l_idx in np.flatnonzero(decisions[d] == 0):
                raise ValueError(
                    f"domain {domain!r} has no routing decisions at MoE layer "
                    f"{self.layers[l_idx]}"
                )

    def _set_tokens(self) -> None:
        decisions = self.counts.sum(-1)  # [D, L]
        if self.tokens is None:
            bad = np.argwhere(decisions % self.top_k != 0)
            if len(bad):
                d, l_idx = bad[0]
                raise ValueError(
                    f"counts of domain {self.domains[d]!r} at MoE layer {self.layers[l_idx]} "
                    f"sum to {decisions[d, l_idx]}, not a multiple of top_k={self.top_k}: "
                    "tokens = counts.sum(-1) / top_k is not a whole number (pass tokens "
                    "explicitly if some routing decisions were dropped)"
                )
            self.tokens = decisions // self.top_k
            return
        self.tokens = _as_counts(self.tokens, "tokens")
        _check_shape(self.tokens, self.counts.shape[:2], "tokens")
        if np.any(self.counts > self.tokens[..., None]):
            raise ValueError("an expert's count exceeds the number of tokens routed")
        if np.any(decisions > self.top_k * self.tokens):
            raise ValueError("counts.sum(-1) exceeds top_k * tokens")

    def _check_optional(self) -> None:
        D, L, E = self.counts.shape
        if self.coactivation is not None:
            co = _as_counts(self.coactivation, "coactivation")
            _check_shape(co, (D, L, E, E), "coactivation")
            if not np.array_equal(co, co.swapaxes(-1, -2)):
                raise ValueError("coactivation must be symmetric in its last two axes")
            if not np.array_equal(np.diagonal(co, axis1=-2, axis2=-1), self.counts):
                raise ValueError("the diagonal of coactivation must equal counts")
            self.coactivation = co
        if self.entropy_sum is not None:
            ent = np.asarray(self.entropy_sum, dtype=np.float64)
            _check_shape(ent, (D, L), "entropy_sum")
            if not np.all(np.isfinite(ent) & (ent >= 0)):
                raise ValueError("entropy_sum must be finite and non-negative")
            self.entropy_sum = ent
        self._check_sequences()

    def _check_sequences(self) -> None:
        given = [getattr(self, n) is not None for n in SEQUENCE_FIELDS]
        if not any(given):
            return
        if not all(given):
            raise ValueError(f"{', '.join(SEQUENCE_FIELDS)} go together: give all three or none")
        seq = _as_counts(self.sequence_counts, "sequence_counts").astype(np.int32)
        _check_shape(seq, (seq.shape[0], *self.counts.shape[1:]), "sequence_counts")
        tokens = _as_counts(self.sequence_tokens, "sequence_tokens")
        domains = _as_counts(self.sequence_domains, "sequence_domains")
        _check_shape(tokens, seq.shape[:1], "sequence_tokens")
        _check_shape(domains, seq.shape[:1], "sequence_domains")
        summed = np.stack([seq[domains == d].sum(0) for d in range(self.n_domains)])
        if not np.array_equal(summed, self.counts):
            raise ValueError("sequence_counts summed over each domain's sequences must equal counts")
        self.sequence_counts, self.sequence_tokens, self.sequence_domains = seq, tokens, domains

    # -- shape helpers ------------------------------------------------------

    @property
    def n_domains(self) -> int:
        return self.counts.shape[0]

    @property
    def n_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def n_experts(self) -> int:
        return self.counts.shape[2]

    def domain_index(self, domain: str) -> int:
        """Position of ``domain`` in :attr:`domains` (ValueError listing them if absent)."""
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; have {self.domains}")
        return self.domains.index(domain)

    def layer_index(self, layer: int) -> int:
        """Position of MoE layer id ``layer`` in :attr:`layers`."""
        if int(layer) not in self.layers:
            raise ValueError(f"unknown MoE layer {layer!r}; have {self.layers}")
        return self.layers.index(int(layer))

    # -- conversion ---------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Sequence[int]]], top_k: int) -> RoutingCounts:
        """Build from ``{domain: {layer_key: [count per expert]}}``.

        This is the layout of a published ``counts[model]`` JSON object; layer keys
        are strings such as ``"1".."27"`` and are sorted numerically. Every domain
        must have the same layers and every list the same length. Tokens are
        derived as ``counts.sum(-1) / top_k``.
        """
        domains = list(data)
        if not domains:
            raise ValueError("data has no domains")
        layer_keys = sorted(data[domains[0]], key=int)
        for domain in domains:
            if sorted(data[domain], key=int) != layer_keys:
                raise ValueError(
                    f"domain {domain!r} has layers {sorted(data[domain], key=int)}, "
                    f"expected {layer_keys} (as domain {domains[0]!r})"
                )
        rows = [[list(data[d][key]) for key in layer_keys] for d in domains]
        widths = {len(r) for per_domain in rows for r in per_domain}
        if len(widths) != 1:
            raise ValueError(f"expert lists have different lengths: {sorted(widths)}")
        return cls(counts=np.array(rows), domains=domains,
                   layers=[int(k) for k in layer_keys], top_k=top_k)

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        """Inverse of :meth:`from_dict`: ``{domain: {str(layer): [count per expert]}}``."""
        return {
            domain: {str(layer): self.counts[d, l_idx].tolist()
                     for l_idx, layer in enumerate(self.layers)}
            for d, domain in enumerate(self.domains)
        }

    def to_frame(self) -> pd.DataFrame:
        """Long table, one row per (domain, layer, expert): ``domain, layer, expert, count, tokens``."""
        return _frame(self, expert=np.arange(self.n_experts), count=self.counts,
                      tokens=self.tokens[..., None])

    # -- persistence --------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"counts": self.counts, "tokens": self.tokens,
                  "domains": np.array(self.domains, dtype=str),
                  "layers": np.array(self.layers, dtype=np.int64),
                  "top_k": np.array(self.top_k)}
        for name in ("coactivation", "entropy_sum", *SEQUENCE_FIELDS):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        return arrays

    def save(self, path: str | Path) -> Path:
        """Write to ``path``: JSON if it ends in ``.json``, else a compressed ``.npz``
        written at exactly ``path``. Round-trips through :meth:`load`."""
        path = Path(path)
        arrays = self._arrays()
        if path.suffix == ".json":
            path.write_text(json.dumps({k: v.tolist() for k, v in arrays.items()}))
        else:
            with open(path, "wb") as f:
                np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingCounts:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        return cls(counts=np.asarray(data["counts"]), tokens=np.asarray(data["tokens"]),
                   domains=[str(d) for d in data["domains"]],
                   layers=[int(x) for x in data["layers"]], top_k=int(data["top_k"]),
                   coactivation=data.get("coactivation"), entropy_sum=data.get("entropy_sum"),
                   **{name: data.get(name) for name in SEQUENCE_FIELDS})

    # -- merging ------------------------------------------------------------

    def __add__(self, other: RoutingCounts) -> RoutingCounts:
        """Merge two runs over the same domains, layers, experts and top_k: sums
        counts, tokens and (where both have them) coactivation and entropy_sum."""
        if not isinstance(other, RoutingCounts):
            return NotImplemented
        for name in ("domains", "layers", "top_k", "n_experts"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(
                    f"cannot add RoutingCounts with different {name}: "
                    f"{getattr(self, name)} vs {getattr(other, name)}"
                )
        optional = {}
        for name in ("coactivation", "entropy_sum"):
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None):
                raise ValueError(f"cannot add RoutingCounts: only one operand has {name}")
            optional[name] = None if a is None else a + b
        if self.sequence_counts is not None and other.sequence_counts is not None:
            optional.update({name: np.concatenate([getattr(self, name), getattr(other, name)])
                             for name in SEQUENCE_FIELDS})
        return RoutingCounts(counts=self.counts + other.counts, tokens=self.tokens + other.tokens,
                             domains=self.domains, layers=self.layers, top_k=self.top_k,
                             **optional)

    def __radd__(self, other):
        """Lets ``sum([run1, run2, ...])`` work (the start value 0 is ignored)."""
        return self if isinstance(other, int) and other == 0 else NotImplemented


def _frame(rc: RoutingCounts, **columns) -> pd.DataFrame:
    """Long DataFrame with ``domain, layer`` then ``columns``.

    Columns are scalars, ``[D, L]`` arrays, or (for one row per expert/rank) arrays
    broadcastable to ``[D, L, W]`` -- pass per-layer values as ``[D, L, 1]`` then.
    Rows are in C order (domain-major).
    """
    wide = [np.shape(v) for v in columns.values() if np.ndim(v) == 3]
    shape = np.broadcast_shapes((rc.n_domains, rc.n_layers, 1), *wide) if wide else (
        rc.n_domains, rc.n_layers)
    d_idx, l_idx = np.indices(shape)[:2]
    out = {"domain": np.asarray(rc.domains, dtype=object)[d_idx.ravel()],
           "layer": np.asarray(rc.layers, dtype=np.int64)[l_idx.ravel()]}
    for name, value in columns.items():
        out[name] = np.broadcast_to(value, shape).ravel()
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------
# Tests and corrections
# ---------------------------------------------------------------------------


def uniform_baseline(top_k: int, n_experts: int) -> float:
    """Fraction of tokens each expert receives under uniform routing: ``top_k / n_experts``."""
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"need 1 <= top_k <= n_experts, got top_k={top_k}, n_experts={n_experts}")
    return top_k / n_experts


def _binomial_upper_tail(count: np.ndarray, n: np.ndarray, p: float) -> np.ndarray:
    """P(X >= count) for X ~ Binomial(n, p), elementwise: the regularized incomplete beta
    I_p(count, n - count + 1) (what ``scipy.stats.binom.sf(count - 1, n, p)`` computes, without
    importing scipy.stats), and 1 where count is 0."""
    return np.where(count > 0, special.betainc(np.maximum(count, 1), n - count + 1, p), 1.0)


def _fractions(counts: RoutingCounts) -> np.ndarray:
    """``[D, L, E]`` fraction of the tokens for which each expert was selected."""
    return counts.counts / counts.tokens[..., None]


def specialization(
    counts: RoutingCounts,
    alpha: float = 0.05,
    correction: Correction = "holm",
    threshold: float | None = 1.5,
    family: Family = "domain",
    test: Literal["binomial", "sequence"] = "binomial",
) -> pd.DataFrame:
    """Which experts a domain routes to more often than uniform routing would.

    For every (domain, layer, expert): ``fraction = count / tokens``,
    ``baseline = top_k / n_experts`` and ``ratio = fraction / baseline`` (the
    effect size). ``p_value`` is the one-sided exact binomial test of
    H1: fraction > baseline, i.e. ``P(X >= count)`` for ``X ~ Binomial(tokens,
    baseline)``, which equals ``scipy.stats.binomtest(count, tokens, baseline,
    alternative="greater").pvalue``.

    The p-values are adjusted with ``correction`` within a family: by default
    ("domain") all ``L * E`` (layer, expert) tests of one domain, so each domain's
    list of specialized experts controls its own error rate; "layer" uses the
    ``E`` experts of one (domain, layer), "all" every row.

    The binomial test assumes every token an independent draw. Tokens of one
    sequence are not (an expert that handles a topic is picked for runs of
    neighbouring tokens), so its p-value is optimistic, and with the ~1e5-1e6 tokens
    of a typical corpus even tiny departures from uniform become "significant".
    ``test="sequence"`` (needs per-sequence counts: ``routing_stats`` keeps them)
    treats sequences as the independent units instead: a one-sided z-test whose
    standard error is the sequence-bootstrap one
    (:func:`moe_hooked.analysis.bootstrap.bootstrap_greater_test`; assumes many
    independent sequences). Either way ``specialized`` also needs the effect size
    ``ratio >= threshold`` (default 1.5; None: significance alone).

    Args:
        counts: routing counts ``[D, L, E]``.
        alpha: level applied to ``p_adjusted``.
        correction: "holm", "bonferroni", "fdr_bh" or "none" (see :func:`adjust_pvalues`).
        threshold: ``specialized`` also requires ``ratio >= threshold`` (None: no effect size).
        family: "domain", "layer" or "all", the set of tests corrected together.
        test: "binomial" (tokens independent) or "sequence" (sequences independent).

    Returns:
        DataFrame with one row per (domain, layer, expert), domain-major:
        ``domain, layer, expert, count, tokens, fraction, baseline, ratio, ratio_ci_low,
        ratio_ci_high, p_value, p_adjusted, specialized`` (``specialized = p_adjusted <=
        alpha`` [and ``ratio >= threshold``]); the ratio's 95% sequence-bootstrap interval
        is NaN without per-sequence counts.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    families = {"domain": counts.n_domains, "layer": counts.n_domains * counts.n_layers, "all": 1}
    if family not in families:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(families)}")
    baseline = uniform_baseline(counts.top_k, counts.n_experts)
    tokens = counts.tokens[..., None]  # [D, L, 1]
    fraction = _fractions(counts)
    ratio = fraction / baseline
    p_value = _binomial_upper_tail(counts.counts, tokens, baseline)
    sequence_p, low, high = _sequence_test(counts, baseline, required=test == "sequence")
    if test == "sequence":
        p_value = sequence_p
    elif test != "binomial":
        raise ValueError(f"unknown test {test!r}: use 'binomial' or 'sequence'")
    p_adj = adjust_pvalues(p_value.reshape(families[family], -1), correction)
    p_adj = p_adj.reshape(p_value.shape)
    specialized = p_adj <= alpha
    if threshold is not None:
        specialized &= ratio >= threshold
    return _frame(counts, expert=np.arange(counts.n_experts), count=counts.counts,
                  tokens=tokens, fraction=fraction, baseline=baseline, ratio=ratio,
                  ratio_ci_low=low / baseline, ratio_ci_high=high / baseline, p_value=p_value, p_adjusted=p_adj, specialized=specialized)


def _sequence_test(counts: RoutingCounts, baseline: float, required: bool) -> tuple[np.ndarray, ...]:
    """Per (domain, layer, expert) [D, L, E]: the sequence-level p-value of "fraction > baseline"
    and the fraction's bootstrap interval; NaN without per-sequence counts (an error if `required`)."""
    if counts.sequence_counts is None:
        if required:
            raise ValueError("test='sequence' needs per-sequence counts: count with routing_stats "
                             "(it keeps them), or pass sequence_counts/tokens/domains")
        return (np.full(counts.counts.shape, np.nan),) * 3
    per_domain = [bootstrap_greater_test(counts.sequence_counts[counts.sequence_domains == d],
                                         counts.sequence_tokens[counts.sequence_domains == d], baseline)
                  for d in range(counts.n_domains)]
    return tuple(np.stack(x) for x in zip(*per_domain))


# ---------------------------------------------------------------------------
# Concentration of routing
# ---------------------------------------------------------------------------


def coverage(counts: RoutingCounts, q: float | Sequence[float] = 0.5) -> pd.DataFrame:
    """Fewest experts whose counts cover at least a fraction ``q`` of a layer's
    routing decisions (``counts.sum(-1)``, i.e. ``top_k * tokens`` slots).

    Args:
        counts: routing counts ``[D, L, E]``.
        q: one coverage level in (0, 1], or several (one block of rows per level).

    Returns:
        DataFrame ``domain, layer, q, n_experts_needed, fraction_of_experts``
        (``n_experts_needed / n_experts``), one row per (q, domain, layer).
    """
    levels = np.atleast_1d(np.asarray(q, dtype=np.float64))
    if levels.ndim != 1 or not np.all((levels > 0) & (levels <= 1)):
        raise ValueError(f"q must be in (0, 1], got {q}")
    covered = np.cumsum(-np.sort(-counts.counts, axis=-1), axis=-1)  # [D, L, E], largest first
    total = covered[..., -1:]
    frames = []
    for level in levels:
        # prefixes that fall short of q (tiny slack so that e.g. 0.5 * 4 == 2 counts as covered)
        needed = (covered < level * total * (1 - 1e-12)).sum(-1) + 1
        frames.append(_frame(counts, q=level, n_experts_needed=needed,
                             fraction_of_experts=needed / counts.n_experts))
    return pd.concat(frames, ignore_index=True)


def routing_entropy(counts: RoutingCounts) -> pd.DataFrame:
    """Entropy (nats) of each layer's expert-usage distribution ``counts / counts.sum(-1)``.

    This is the spread of the routing decisions over experts, pooled over tokens;
    it is ``log(E)`` when every expert is used equally. It is not the per-token
    router entropy: that is ``mean_router_entropy`` = ``entropy_sum / tokens``
    (mean entropy of the full router softmax) when ``counts.entropy_sum`` is set,
    else NaN.

    Returns:
        DataFrame ``domain, layer, entropy, max_entropy, normalized_entropy,
        mean_router_entropy``, one row per (domain, layer).
    """
    p = counts.counts / counts.counts.sum(-1, keepdims=True)
    entropy = special.entr(p).sum(-1)  # [D, L]; entr(0) = 0
    max_entropy = np.log(counts.n_experts)
    normalized = entropy / max_entropy if max_entropy > 0 else np.full_like(entropy, np.nan)
    router = (np.full(entropy.shape, np.nan) if counts.entropy_sum is None
              else counts.entropy_sum / counts.tokens)
    return _frame(counts, entropy=entropy, max_entropy=max_entropy,
                  normalized_entropy=normalized, mean_router_entropy=router)


# ---------------------------------------------------------------------------
# Pairs of experts and domains
# ---------------------------------------------------------------------------


def _safe_divide(num: np.ndarray, den: np.ndarray, undefined: float = 0.0) -> np.ndarray:
    """``num / den`` with ``undefined`` where ``den == 0``."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    return np.divide(num, den, out=np.full(num.shape, undefined), where=den != 0)


def coactivation_matrix(
    counts: RoutingCounts,
    domain: str,
    layer: int,
    normalize: Literal["jaccard", "conditional"] | None = "jaccard",
) -> np.ndarray:
    """``[E, E]`` co-selection of experts at one (domain, MoE layer id).

    With ``C = counts.coactivation[d, l]`` (tokens on which both i and j are in the top-k):

    - ``None``: ``C`` itself (int64).
    - ``"conditional"``: ``C[i, j] / C[i, i]`` = P(j selected | i selected); row i is
      0 if expert i was never selected.
    - ``"jaccard"``: ``C[i, j] / (C[i, i] + C[j, j] - C[i, j])``; 0 where neither was
      selected.
    """
    if counts.coactivation is None:
        raise ValueError(
            "these RoutingCounts have no coactivation counts: run routing_stats with "
            "coactivation=True"
        )
    c = counts.coactivation[counts.domain_index(domain), counts.layer_index(layer)]
    diag = np.diagonal(c)
    if normalize is None:
        return c.copy()
    if normalize == "conditional":
        return _safe_divide(c, diag[:, None])
    if normalize == "jaccard":
        return _safe_divide(c, diag[:, None] + diag[None, :] - c)
    raise ValueError(f"normalize must be 'jaccard', 'conditional' or None, got {normalize!r}")


def domain_specialists(counts: RoutingCounts, top: int = 5) -> pd.DataFrame:
    """Per (domain, layer), the ``top`` experts whose usage most exceeds their usage elsewhere.

    ``fraction`` is ``count / tokens`` for the domain, ``other_domains_fraction`` the
    mean of that expert's fraction over the other ``D - 1`` domains and
    ``lift = fraction / other_domains_fraction`` (``inf`` if the other domains never
    select the expert, 0 if this domain never does). Unlike :func:`specialization`,
    which compares with uniform routing, this compares domains with each other, so
    experts that are busy on every domain do not show up. Ties keep expert order.

    Returns:
        DataFrame ``domain, layer, expert, fraction, other_domains_fraction, lift``,
        ``min(top, E)`` rows per (domain, layer) by decreasing lift.
    """
    if counts.n_domains < 2:
        raise ValueError("domain_specialists needs at least two domains to compare")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    fraction = _fractions(counts)  # [D, L, E]
    others = (fraction.sum(0, keepdims=True) - fraction) / (counts.n_domains - 1)
    lift = _safe_divide(fraction, others, undefined=np.inf)
    lift[fraction == 0] = 0.0
    best = np.argsort(-lift, axis=-1, kind="stable")[..., :top]  # [D, L, top]

    def pick(a):
        return np.take_along_axis(a, best, -1)

    return _frame(counts, expert=best, fraction=pick(fraction),
                  other_domains_fraction=pick(others), lift=pick(lift))
