"""Matplotlib figures of the MoE Lens paper, drawn from the analyses' DataFrames.

- :func:`specialization_figure` -- Figure 1: per expert, the fraction of each domain's tokens
  routed to it, with the uniform baseline k/E dashed; one panel per MoE layer.
- :func:`cosine_figure` -- Figure 3 (left): cos(H^{l,1}, H^{l,k}) per layer, one line per domain.
- :func:`perplexity_figure` -- Figure 3 (right): the change in log-perplexity against k', with
  intervals (the paper's min-max normalised variant as an option).
- :func:`coactivation_figure` -- an [E, E] co-activation matrix as a heatmap.
- :func:`pruning_figure` -- perplexity against the fraction of least-used experts pruned.
- :func:`importance_figure` -- causal importance against routing frequency, per layer.
- :func:`comparison_figure` -- statistics of two sources (our model, the paper's) against relative
  depth, one panel per statistic.

Each returns a `matplotlib.figure.Figure` created without pyplot, so nothing depends on the
backend (Agg, inline, none) and no global figure state is left behind. Notebooks display it;
:func:`to_png` renders it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from moe_hooked.analysis.importance import frequency_importance_correlation

PANEL_SIZE = (5.0, 3.4)


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"not a {what} table: columns {missing} are missing (have {list(frame.columns)})")
    if frame.empty:
        raise ValueError(f"the {what} table is empty")


def _panels(n: int, ncols: int, size: tuple[float, float] = PANEL_SIZE) -> tuple[Figure, list[Axes]]:
    """A figure with `n` panels on a grid of `ncols` columns (the unused ones hidden)."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _lines(
    ax: Axes, frame: pd.DataFrame, x: str, y: str, by: str = "domain", band: tuple[str, str] | None = None
) -> None:
    """One line per value of `by` (in order of appearance), points sorted by `x`; whole-number
    x values get whole-number ticks. `band`: (low, high) columns drawn as a shaded interval."""
    for label, rows in frame.groupby(by, sort=False):
        rows = rows.sort_values(x)
        (line,) = ax.plot(rows[x].to_numpy(), rows[y].to_numpy(), marker="o", markersize=3, label=str(label))
        if band is not None:
            ax.fill_between(rows[x].to_numpy(), rows[band[0]].to_numpy(), rows[band[1]].to_numpy(),
                            color=line.get_color(), alpha=0.2, linewidth=0)
    if pd.api.types.is_integer_dtype(frame[x]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def specialization_figure(
    spec: pd.DataFrame,
    layers: Sequence[int] | None = None,
    domains: Sequence[str] | None = None,
    ncols: int = 2,
) -> Figure:
    """Bars of `fraction` per expert, one colour per domain, one panel per MoE layer (all, or
    `layers`), with the uniform baseline k/E as a dashed line. `spec`: `specialization(counts)`."""
    _require(spec, ["domain", "layer", "expert", "fraction", "baseline"], "specialization")
    layers = list(spec["layer"].unique()) if layers is None else list(layers)
    domains = list(spec["domain"].unique()) if domains is None else list(domains)
    n_experts = spec["expert"].nunique()
    fig, axes = _panels(len(layers), ncols, (max(PANEL_SIZE[0], 0.12 * n_experts * len(domains)), PANEL_SIZE[1]))
    width = 0.8 / len(domains)
    for ax, layer in zip(axes, layers):
        at_layer = spec[spec["layer"] == layer]
        if at_layer.empty:
            raise ValueError(f"the specialization table has no layer {layer}; it has {sorted(spec['layer'].unique())}")
        for i, domain in enumerate(domains):
            rows = at_layer[at_layer["domain"] == domain].sort_values("expert")
            offset = (i - (len(domains) - 1) / 2) * width
            ax.bar(rows["expert"].to_numpy() + offset, rows["fraction"].to_numpy(), width, label=str(domain))
        baseline = float(at_layer["baseline"].iloc[0])
        ax.axhline(baseline, linestyle="--", color="black", linewidth=1, label=f"uniform k/E = {baseline:.3g}")
        ax.set(title=f"layer {layer}", xlabel="expert", ylabel="fraction of tokens")
        ax.legend(fontsize="x-small", ncols=2)
    return fig


COSINE_TITLES = {
    "all_tokens": "cos(H^1, H^k), all tokens",
    "last_token": "cos(H^1, H^k), last token (paper)",
    "u_only": "baseline cos(u, H^k): residual alone",
    "update": "cos(H^1 - u, H^k - u): the updates",
}


def _band(frame: pd.DataFrame) -> tuple[str, str] | None:
    return ("ci_low", "ci_high") if {"ci_low", "ci_high"} <= set(frame.columns) else None


def cosine_figure(cosine: pd.DataFrame, ncols: int = 2) -> Figure:
    """Mean cosine against the layer, one line per domain (shaded: its bootstrap interval, when
    the table has `ci_low`, `ci_high`); one panel per variant: the paper's top-1 vs top-k over
    all tokens and over the last token, and the baselines "u_only" and "update" that say how
    much of that similarity the residual alone explains. `cosine`: `topk_cosine(...)`."""
    _require(cosine, ["domain", "layer", "variant", "cosine"], "topk_cosine")
    variants = list(cosine["variant"].unique())
    fig, axes = _panels(len(variants), ncols)
    for ax, variant in zip(axes, variants):
        _lines(ax, cosine[cosine["variant"] == variant], "layer", "cosine", band=_band(cosine))
        ax.set(title=COSINE_TITLES.get(variant, variant), xlabel="layer", ylabel="cosine similarity")
    return fig


PERPLEXITY_LABELS = {
    "delta_log_ppl": "change in log-perplexity vs all top-k experts (nats)",
    "ppl_ratio": "perplexity ratio to all top-k experts",
    "normalized_log_ppl": "min-max normalised log-perplexity (the paper's; hides size and direction)",
    "mean_log_ppl": "log-perplexity (nats)",
    "ppl": "perplexity",
}


def perplexity_figure(perplexity: pd.DataFrame, value: str = "delta_log_ppl") -> Figure:
    """`value` against the number of experts kept, k', one line per domain. Default: the change
    in log-perplexity from the unmodified model, shaded with its bootstrap interval
    (`ci_low`, `ci_high`); "ppl_ratio" draws exp of both; "normalized_log_ppl" is the
    paper's per-domain min-max normalisation, labelled as such. `perplexity`:
    `perplexity_vs_top_k(...)`."""
    _require(perplexity, ["domain", "k", value], "perplexity_vs_top_k")
    band = _band(perplexity) if value in ("delta_log_ppl", "ppl_ratio") else None
    frame = perplexity
    if band is not None and value == "ppl_ratio":
        frame = perplexity.assign(ci_low=np.exp(perplexity["ci_low"]), ci_high=np.exp(perplexity["ci_high"]))
    fig, (ax,) = _panels(1, 1, (6.4, 3.6))
    _lines(ax, frame, "k", value, band=band)
    if value in ("delta_log_ppl", "ppl_ratio"):
        ax.axhline(0.0 if value == "delta_log_ppl" else 1.0, color="black", linewidth=0.8)
    ax.set(title="perplexity vs experts kept", xlabel="k' (experts kept per token)",
           ylabel=PERPLEXITY_LABELS.get(value, value))
    return fig


def pruning_figure(pruning: pd.DataFrame, value: str = "ppl") -> Figure:
    """`value` (default perplexity) against the fraction of each layer's least-used experts
    pruned, one line per domain. `pruning`: `pruning_curve(...)`."""
    _require(pruning, ["domain", "fraction", value], "pruning_curve")
    fig, (ax,) = _panels(1, 1)
    _lines(ax, pruning, "fraction", value)
    ax.set(title="pruning the least-used experts", xlabel="fraction of experts pruned per layer", ylabel=value)
    return fig


def importance_figure(importance: pd.DataFrame, ncols: int = 3) -> Figure:
    """Causal importance (`delta_nll`, with its bootstrap interval as an error bar) against the
    routed fraction, one point per (domain, expert), one colour per domain, one panel per
    layer titled with the Spearman rank correlation of the two. `importance`:
    `expert_importance(...)`."""
    _require(importance, ["domain", "layer", "expert", "routed_fraction", "delta_nll"], "expert_importance")
    layers = list(importance["layer"].unique())
    fig, axes = _panels(len(layers), ncols, (4.2, 3.4))
    for ax, layer in zip(axes, layers):
        at_layer = importance[importance["layer"] == layer]
        for domain, rows in at_layer.groupby("domain", sort=False):
            error = None
            if _band(rows) is not None:
                error = np.abs(rows[["ci_low", "ci_high"]].to_numpy().T - rows["delta_nll"].to_numpy())
            ax.errorbar(rows["routed_fraction"], rows["delta_nll"], yerr=error, fmt="o", markersize=3,
                        elinewidth=0.6, label=str(domain))
        rho = frequency_importance_correlation(at_layer)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set(title=f"layer {layer}: Spearman rho = {rho:.2f}", xlabel="fraction of tokens routed",
               ylabel="loss increase when removed (nats)")
        ax.legend(fontsize="x-small")
    return fig


SOURCE_STYLES = ({"linestyle": "-", "marker": "o"}, {"linestyle": "--", "marker": "s"})


def comparison_figure(table: pd.DataFrame, values: Mapping[str, str], x: str = "depth", xlabel: str | None = None,
                      ylabel: str | None = None, ncols: int = 3) -> Figure:
    """One panel per column of `values` (column -> panel title) against `x`: one colour per
    domain, one line style per `source` (the first solid, the next dashed). `table`: `domain,
    source, x` and the `values` columns, e.g. `report_paper.comparison_table(...)`."""
    _require(table, ["domain", "source", x, *values], "comparison")
    domains = list(table["domain"].unique())
    sources = list(table["source"].unique())
    if len(sources) > len(SOURCE_STYLES):
        raise ValueError(f"at most {len(SOURCE_STYLES)} sources can be told apart, got {sources}")
    fig, axes = _panels(len(values), ncols, (4.6, 3.4))
    for ax, (column, title) in zip(axes, values.items()):
        for (domain, source), rows in table.groupby(["domain", "source"], sort=False):
            rows = rows.sort_values(x)
            ax.plot(rows[x].to_numpy(), rows[column].to_numpy(), color=f"C{domains.index(domain) % 10}",
                    markersize=3, label=f"{domain} ({source})", **SOURCE_STYLES[sources.index(source)])
        ax.set(title=title, xlabel=xlabel or x, ylabel=ylabel or column, ylim=(0, None))
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)
    return fig


def coactivation_figure(matrix: np.ndarray, title: str = "expert co-activation") -> Figure:
    """Heatmap of an [E, E] matrix from `coactivation_matrix(counts, domain, layer)`."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square [n_experts, n_experts] matrix, got shape {matrix.shape}")
    fig = Figure(figsize=(5.4, 4.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set(title=title, xlabel="expert", ylabel="expert")
    return fig


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure rendered as PNG bytes (Agg, whatever the active backend)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
