"""The report's section beside the MoE Lens paper (`--paper-counts PATH --paper-model MODEL`).

The paper published how often each routed expert of four models was picked, per domain and MoE
layer (:mod:`moe_hooked.analysis.paper`). This section computes two of the report's routing
statistics from those counts with the same functions as from ours, on the domains both have:

- coverage (:func:`~moe_hooked.analysis.coverage`): the fewest experts that take 50% / 90% of a
  layer's routing decisions, as a fraction of the layer's routed experts;
- specialization (the `ratio` of :func:`~moe_hooked.analysis.specialization`): the share of a
  layer's experts that a domain picks at least `SPECIALIZATION_RATIO` times as often as uniform
  routing (k/E) would.

The two models differ in depth, number of experts and top-k, so a layer is placed at its relative
depth `(layer + 0.5) / n_layers` (the middle of the layer, as a fraction of the model's layers,
dense ones included) and both statistics are fractions of the layer's experts.

:func:`check_paper_options` reads and checks the options before any model work;
:func:`comparison_table` and :func:`comparison_summary` give the numbers, :func:`section_text`
the words around them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moe_hooked.analysis.counts import RoutingCounts, coverage, specialization
from moe_hooked.analysis.paper import PAPER_MODELS, PaperModel, paper_routing_counts
from moe_hooked.report_folder import ReportError

__all__ = ["PaperComparison", "check_paper_options", "comparison_summary", "comparison_table", "section_text"]

COVERAGE_LEVELS = (0.5, 0.9)
"""The report's coverage levels (its `coverage.csv` and this comparison)."""
SPECIALIZATION_RATIO = 1.5
"""The effect size the report's specialization test also requires (`specialization(threshold=1.5)`)."""
COVERAGE_COLUMNS = {level: f"fraction_for_{level:.0%}" for level in COVERAGE_LEVELS}
SHARE_COLUMN = f"share_over_{SPECIALIZATION_RATIO}x_uniform"
STATISTICS = {
    **{column: f"fewest experts taking {level:.0%} of the routing" for level, column in COVERAGE_COLUMNS.items()},
    SHARE_COLUMN: f"experts picked >= {SPECIALIZATION_RATIO}x as often as uniform",
}
"""The comparison's columns (each a fraction of a layer's routed experts) and their titles."""
FIGURE = "figures/paper_comparison.png"


@dataclass(frozen=True)
class PaperComparison:
    """The paper's counts of one model, checked against our corpora.

    Attributes:
        name: the paper's name of the model (a key of `PAPER_MODELS`).
        path: the paper's ``routing_counts.json``.
        counts: the paper's counts of the model [D, L, E], layers = the model's layer indices.
        shared: domains of our corpora that the paper's counts also have (our order).
        only_ours: our domains the paper has no counts for.
        only_paper: the paper's domains our corpora lack.
    """

    name: str
    path: Path
    counts: RoutingCounts
    shared: list[str]
    only_ours: list[str]
    only_paper: list[str]

    @property
    def model(self) -> PaperModel:
        """Hub id, top-k and depth of the paper's model."""
        return PAPER_MODELS[self.name]


def check_paper_options(path: str | Path | None, paper_model: str | None, domains: Sequence[str]) -> PaperComparison | None:
    """The paper's counts of `paper_model` read from `path`, matched with our `domains`; None when
    neither option is given. Raises `ReportError` when only one is given, the model is unknown,
    the file is missing or unreadable, or it shares no domain with ours."""
    if path is None and paper_model is None:
        return None
    choices = ", ".join(sorted(PAPER_MODELS))
    if path is None or paper_model is None:
        raise ReportError(f"--paper-counts and --paper-model go together (paper_counts=, paper_model=): "
                          f"pass the paper's routing_counts.json and one of {choices}")
    if paper_model not in PAPER_MODELS:
        raise ReportError(f"unknown paper model {paper_model!r}: the paper's counts are of {choices}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReportError(f"paper counts file not found: {path} (pass the paper's routing_counts.json, "
                          "e.g. ../shared/data/paper/routing_counts.json)")
    try:
        counts = paper_routing_counts(path, paper_model)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReportError(f"cannot read the paper's counts from {path}: {err}") from err
    shared = [d for d in domains if d in counts.domains]
    if not shared:
        raise ReportError(f"no domain in common with the paper's counts: ours are {', '.join(domains)}, the "
                          f"paper's {', '.join(counts.domains)}; name a --corpus after a paper domain "
                          "(e.g. --corpus github=path/to/code.txt)")
    return PaperComparison(paper_model, path.resolve(), counts, shared, [d for d in domains if d not in counts.domains],
                           [d for d in counts.domains if d not in domains])


def _profile(spec: pd.DataFrame, needed: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Per (domain, MoE layer) of `specialization` and `coverage` tables: `depth`, `tokens` and the
    `STATISTICS` columns."""
    per_layer = spec.assign(over=spec["ratio"] >= SPECIALIZATION_RATIO).groupby(["domain", "layer"], sort=False)
    profile = per_layer.agg(tokens=("tokens", "first"), **{SHARE_COLUMN: ("over", "mean")}).reset_index()
    for level, column in COVERAGE_COLUMNS.items():
        at_level = needed[needed["q"] == level]
        if at_level.empty:
            raise ValueError(f"the coverage table has no q={level}: compute it with q={list(COVERAGE_LEVELS)}")
        profile = profile.merge(at_level[["domain", "layer", "fraction_of_experts"]]
                                .rename(columns={"fraction_of_experts": column}), on=["domain", "layer"])
    return profile.assign(depth=(profile["layer"] + 0.5) / n_layers)[["domain", "layer", "depth", "tokens", *STATISTICS]]


def comparison_table(our_spec: pd.DataFrame, our_coverage: pd.DataFrame, our_n_layers: int,
                     paper: PaperComparison) -> pd.DataFrame:
    """Our statistics (from the report's `specialization` and `coverage` tables of a model with
    `our_n_layers` layers) beside the same functions' results on the paper's counts.

    Returns `source` ("ours", "paper"), `domain`, `layer`, `depth`, `tokens` and the `STATISTICS`
    columns, one row per shared domain, source and MoE layer (domains in our order).
    """
    paper_profile = _profile(specialization(paper.counts), coverage(paper.counts, q=COVERAGE_LEVELS),
                             paper.model.n_layers)
    table = pd.concat([_profile(our_spec, our_coverage, our_n_layers).assign(source="ours"),
                       paper_profile.assign(source="paper")], ignore_index=True)
    table = table[table["domain"].isin(paper.shared)]
    rank = {domain: i for i, domain in enumerate(paper.shared)}
    table = table.sort_values(["domain", "source", "layer"], key=lambda c: c.map(rank) if c.name == "domain" else c,
                              kind="stable")
    return table[["source", *table.columns.drop("source")]].reset_index(drop=True)


def comparison_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per domain and source: the tokens routed (at the first MoE layer) and each `STATISTICS`
    column averaged over the MoE layers."""
    means = {f"{name} (mean over layers)": (name, "mean") for name in STATISTICS}
    return table.groupby(["domain", "source"], sort=False).agg(tokens=("tokens", "first"), **means).reset_index()


def _floors(top_k: int, n_experts: int) -> str:
    """The smallest coverage fractions possible (every token picks the same k experts): ceil(q k) / E."""
    return " / ".join(f"{math.ceil(level * top_k - 1e-9) / n_experts:.3f}" for level in COVERAGE_LEVELS)


def section_text(paper: PaperComparison, model_name: str, ours: RoutingCounts, our_n_layers: int) -> list[str]:
    """The section's paragraphs (plain text): what is compared, how, and which domains."""
    card, theirs = paper.model, paper.counts
    levels = " / ".join(f"{level:.0%}" for level in COVERAGE_LEVELS)
    return [
        f"Our model ({model_name}: {ours.n_layers} MoE layers of {our_n_layers}, {ours.n_experts} routed experts, "
        f"top-{ours.top_k}) beside the paper's published routing counts of {card.hub_id} ({theirs.n_layers} MoE "
        f"layers of {card.n_layers}, {theirs.n_experts} routed experts, top-{theirs.top_k}; read from {paper.path}), "
        "both through the same coverage and specialization functions. The models differ in depth and width, so a "
        "layer is placed at its relative depth, (layer + 0.5) / number of layers, and both statistics are fractions "
        "of the layer's routed experts.",
        f"Coverage: the fewest experts that take {levels} of a layer's routing decisions, as a fraction of the "
        f"experts. Uniform routing needs about {' / '.join(f'{level:g}' for level in COVERAGE_LEVELS)} of them; "
        "no routing needs fewer than ceil(q k) / E (every token picking the same k experts): "
        f"{_floors(ours.top_k, ours.n_experts)} for ours, {_floors(theirs.top_k, theirs.n_experts)} for the paper's.",
        f"Specialization: the share of a layer's experts that a domain picks at least {SPECIALIZATION_RATIO} times "
        "as often as uniform routing (k/E) would. This is an effect size without a significance test: the "
        "paper's counts have no per-sequence counts for the sequence-level test, and a token-level test would "
        "call almost any departure significant with the paper's token counts. Few tokens also spread the usage "
        "by chance: compare the tokens per domain of both sides in the table.",
        "Domains in both: " + ", ".join(paper.shared) + "; only in our corpora: "
        + (", ".join(paper.only_ours) or "none") + "; only in the paper's counts: "
        + (", ".join(paper.only_paper) or "none") + ".",
    ]
