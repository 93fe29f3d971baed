"""Report sections that put causal evidence and uncertainty beside the routing statistics.

- :func:`importance_tables` -- routing frequency against causal importance per layer (Spearman
  rank correlation) and the most important experts per domain, from `expert_importance`.
- :func:`headline_numbers` -- the summary in plain words, each number with its interval:
  experts needed to cover 50% and 90% of the routing, routing entropy (both with a
  sequence-bootstrap interval from the per-sequence counts), top-1 vs top-k change in
  log-perplexity, and the importance-frequency correlation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import special

from moe_hooked.analysis.bootstrap import CONFIDENCE, resample_weights
from moe_hooked.analysis.counts import RoutingCounts
from moe_hooked.analysis.importance import frequency_importance_correlation

__all__ = ["headline_numbers", "importance_tables", "routing_intervals"]

N_BOOT = 300
TOP_EXPERTS = 5


def importance_tables(importance: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """`importance_correlation`: per MoE layer, Spearman rank correlation between routed fraction
    and `delta_nll` over every (domain, expert); `top_experts`: per domain the `TOP_EXPERTS`
    (layer, expert) pairs whose removal raises the loss most."""
    correlation = pd.DataFrame(
        [dict(layer=layer, spearman_rho=frequency_importance_correlation(rows), n_points=len(rows))
         for layer, rows in importance.groupby("layer", sort=True)]
    )
    top = (importance.sort_values("delta_nll", ascending=False, kind="stable").groupby("domain", sort=False)
           .head(TOP_EXPERTS).sort_values(["domain", "delta_nll"], ascending=[True, False], kind="stable"))
    return {"importance_correlation": correlation,
            "top_experts": top[["domain", "layer", "expert", "delta_nll", "ci_low", "ci_high", "routed_fraction"]]}


def routing_intervals(counts: RoutingCounts, q: tuple[float, ...] = (0.5, 0.9), n_boot: int = N_BOOT,
                      confidence: float = CONFIDENCE, seed: int = 0) -> pd.DataFrame:
    """Per domain, averaged over MoE layers: experts needed to cover each fraction `q` of the
    routing decisions and the normalised entropy of expert usage, with percentile intervals from
    resampling the domain's sequences (needs the per-sequence counts `routing_stats` keeps).

    Returns `domain, statistic, value, ci_low, ci_high` (statistic "experts_for_50%", ...,
    "normalized_entropy").
    """
    if counts.sequence_counts is None:
        raise ValueError("routing_intervals needs per-sequence counts: count with routing_stats")
    rows = []
    tail = (1 - confidence) / 2
    for d, domain in enumerate(counts.domains):
        sequences = counts.sequence_counts[counts.sequence_domains == d].astype(np.float64)  # [S L E]
        boot = np.einsum("bs,sle->ble", resample_weights(len(sequences), n_boot, seed), sequences)
        point = counts.counts[d][None].astype(np.float64)
        for name, stat in _routing_statistics(q).items():
            low, high = np.quantile(stat(boot), [tail, 1 - tail])
            rows.append(dict(domain=domain, statistic=name, value=float(stat(point)[0]), ci_low=low, ci_high=high))
    return pd.DataFrame(rows)


def _routing_statistics(q: tuple[float, ...]) -> dict:
    """name -> function of counts [B L E] giving [B], the mean over layers."""

    def needed(level: float):
        def stat(c: np.ndarray) -> np.ndarray:
            covered = np.cumsum(-np.sort(-c, axis=-1), axis=-1)
            return ((covered < level * covered[..., -1:] * (1 - 1e-12)).sum(-1) + 1).mean(-1)

        return stat

    def entropy(c: np.ndarray) -> np.ndarray:
        p = c / c.sum(-1, keepdims=True)
        return (special.entr(p).sum(-1) / np.log(c.shape[-1])).mean(-1)

    return {**{f"experts_for_{level:.0%}": needed(level) for level in q}, "normalized_entropy": entropy}


def _strength(rho: float) -> str:
    """How well a rank correlation lets one quantity predict the other, in words."""
    return "predicts" if rho >= 0.7 else "partly predicts" if rho >= 0.3 else "hardly predicts"


def headline_numbers(n_experts: int, intervals: pd.DataFrame, perplexity: pd.DataFrame,
                     correlation: pd.DataFrame | None) -> list[str]:
    """The summary's sentences, each number with its 95% interval."""

    def per_domain(statistic: str, fmt: str) -> str:
        rows = intervals[intervals["statistic"] == statistic]
        return "; ".join(f"{r.domain} {r.value:{fmt}} [{r.ci_low:{fmt}}, {r.ci_high:{fmt}}]" for r in rows.itertuples())

    top1 = perplexity[perplexity["k"] == perplexity["k"].min()]
    change = "; ".join(f"{r.domain} {r.delta_log_ppl:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
                       for r in top1.itertuples())
    lines = [
        f"Experts needed to cover 50% of the routing decisions, mean over layers (of {n_experts}): "
        + per_domain("experts_for_50%", ".1f") + ".",
        f"Experts needed to cover 90%: {per_domain('experts_for_90%', '.1f')}.",
        f"Entropy of expert usage, as a fraction of its maximum log({n_experts}) (1 = uniform): "
        + per_domain("normalized_entropy", ".3f") + ".",
        f"Keeping only the top-{int(top1['k'].iloc[0])} expert per token instead of all top-k changes the "
        f"log-perplexity (nats per token) by: {change}.",
    ]
    if correlation is not None:
        rho = correlation["spearman_rho"]
        lines.append(
            "Routing frequency vs causal importance (attribution), Spearman rank correlation per layer: "
            + ", ".join(f"layer {r.layer} {r.spearman_rho:+.2f}" for r in correlation.itertuples())
            + f" (median {rho.median():+.2f}): how often an expert is picked "
            + _strength(rho.median()) + " how much it matters."
        )
    lines.append("Intervals in brackets: 95% percentile bootstrap over sequences (chunks), which treats chunks as "
                 "independent draws from each domain.")
    return lines
