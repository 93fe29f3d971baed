"""The `moe-hooked report`: run every analysis on a model and corpora, write a browsable folder.

:func:`build_report` is the whole thing, callable from Python; the console script
(`moe_hooked.cli`) only parses arguments. It runs in two phases:

1. :func:`prepare_report` checks every input before any long work: the output folder (refused
   if it exists, unless `overwrite`), the corpora (files must exist and hold text), the
   model (it must load and have a tokenizer and MoE layers). Problems raise
   :class:`ReportError` with a message naming the input and what to do.
2. :func:`write_report` runs the analyses and writes, into a temporary sibling folder that is
   moved to `out` at the end (a failed run leaves no half-written report; see
   :mod:`moe_hooked.report_folder` for what `overwrite` may replace). In a process group
   (`torchrun`) the ranks share out the corpus batches, the sample prompts and the figures,
   and rank 0 writes the same files one process would:

   - `index.html`: figures, tables, the model's config, the exact command and package versions;
     opens offline (figures are PNG files beside it, no external request);
   - `counts.json` (:meth:`RoutingCounts.save`), `specialization.csv`, `coverage.csv`,
     `entropy.csv`, `specialists.csv` (two domains or more), `cosine.csv`, `perplexity.csv`,
     `importance.csv`, `importance_correlation.csv`, `top_experts.csv`, `routing_intervals.csv`,
     `pruning.csv`, `expert_lens.csv` (one sample prompt per domain);
   - with `paper_counts` and `paper_model`: `paper_comparison.csv`, our coverage and specialization
     beside the same statistics of the paper's published counts (:mod:`moe_hooked.report_paper`),
     and its section and figure in `index.html`;
   - `figures/*.png`; per sample prompt `expert_lens_<domain>.html` (the grid) and
     `routing_<domain>.html` (a circuitsvis view, JavaScript embedded);
   - `report.json`: model, options, command, versions, timings and the file list.
"""

from __future__ import annotations

import html
import json
import math
import platform
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from moe_hooked.analysis import (
    RoutingCounts,
    coactivation_matrix,
    coverage,
    domain_specialists,
    expert_importance,
    perplexity_vs_top_k,
    pruning_curve,
    routing_entropy,
    routing_stats,
    specialization,
)
from moe_hooked.corpus import is_main_process, map_over_ranks, rank_and_world, shared_failures
from moe_hooked.data import builtin_corpora, load_corpora
from moe_hooked.lens import expert_lens, topk_cosine
from moe_hooked.loading import CheckpointError, UnsupportedArchitectureError
from moe_hooked.model import HookedMoETransformer
from moe_hooked.report_findings import headline_numbers, importance_tables, routing_intervals
from moe_hooked.report_folder import METADATA_FILE, ReportError, build_folder, check_out, publish
from moe_hooked.report_paper import (
    COVERAGE_LEVELS,
    FIGURE as PAPER_FIGURE,
    STATISTICS,
    PaperComparison,
    check_paper_options,
    comparison_summary,
    comparison_table,
    section_text,
)
from moe_hooked.viz import (
    ExpertLensGrid,
    coactivation_figure,
    comparison_figure,
    cosine_figure,
    importance_figure,
    perplexity_figure,
    pruning_figure,
    routing_view,
    specialization_figure,
    to_png,
)
from moe_hooked.viz.tokens import readable_str_tokens

DEFAULT_MODEL = "moe-hooked/demo"
DEFAULT_OUT = "moe_hooked_report"
DEFAULT_MAX_TOKENS = 2048
"""Tokens read per domain by each corpus analysis. The analyses make ten passes over the
corpora (routing, cosine, four k', four pruning fractions): with the demo model and the five
built-in corpora the whole default report takes about 46 s on two CPU cores."""
DEFAULT_BATCH_SIZE = 8
SAMPLE_PROMPT_TOKENS = 24
"""Length (BOS included) of each domain's sample prompt for the expert lens and routing view."""
MAX_SPECIALIZATION_PANELS = 6
PRUNING_FRACTIONS = (0.0, 0.25, 0.5, 0.75)
"""Tried in this order; those that would leave fewer than top_k experts are skipped."""
VERSION_PACKAGES = ("moe_hooked", "torch", "transformers", "transformer_lens", "circuitsvis",
                    "numpy", "pandas", "scipy", "matplotlib")


@dataclass
class ReportInputs:
    """Everything `write_report` needs, already checked by `prepare_report`."""

    model: HookedMoETransformer
    model_name: str
    corpora: dict[str, list[str]]
    out: Path
    max_tokens: int
    batch_size: int
    command: str
    progress: bool = True
    options: dict = field(default_factory=dict)
    overwrite: bool = False
    paper: PaperComparison | None = None


# --------------------------------------------------------------------------- phase 1: checks
def _check_corpora(corpora: Mapping[str, str | Path | Sequence[str]] | None) -> dict[str, list[str]]:
    if corpora is None:
        return builtin_corpora()
    if not corpora:
        raise ReportError("no corpora given: pass at least one name=path, or none for the built-in corpora")
    try:
        return load_corpora(corpora)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReportError(f"bad corpus: {err}") from err


def _check_model(
    model_name: str, dtype: str | torch.dtype | None, device: str | None, expert_memory: int | str | None = None
) -> HookedMoETransformer:
    try:
        kind = torch.device(device or "cpu").type
    except RuntimeError as err:
        raise ReportError(f"unknown device '{device}': use e.g. 'cpu' or 'cuda' ({err})") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ReportError(f"device '{device}' was asked for but CUDA is not available here: use --device cpu")
    try:
        model = HookedMoETransformer.from_pretrained(model_name, dtype=dtype, device=device, expert_memory=expert_memory)
    except (CheckpointError, UnsupportedArchitectureError, ValueError, OSError) as err:
        raise ReportError(f"cannot load model '{model_name}': {err}") from err
    if model.tokenizer is None:
        raise ReportError(f"model '{model_name}' has no tokenizer (its folder has no tokenizer files): the report tokenizes text")
    if not model.cfg.moe_layers:
        raise ReportError(f"model '{model_name}' has no MoE layers: there is no routing to report")
    return model


MIN_TOKENS = 2
"""The smallest `max_tokens` budget that leaves a token to predict (a BOS or first token, and the next)."""


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ReportError(f"{name} must be a positive whole number, got {value!r}")


def _check_budget(max_tokens: int) -> None:
    if max_tokens < MIN_TOKENS:
        raise ReportError(
            f"max_tokens={max_tokens} leaves no token to predict: every analysis needs at least "
            f"{MIN_TOKENS} tokens per domain (use e.g. --max-tokens 256)"
        )


def prepare_report(
    model_name: str = DEFAULT_MODEL,
    corpora: Mapping[str, str | Path | Sequence[str]] | None = None,
    out: str | Path = DEFAULT_OUT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    expert_memory: int | str | None = None,
    paper_counts: str | Path | None = None,
    paper_model: str | None = None,
) -> ReportInputs:
    """Check the inputs (cheap ones first), load the corpora and the model; raise ReportError on bad input.

    `expert_memory`: stream the routed experts from disk under this budget (see `from_pretrained`).
    `paper_counts`, `paper_model`: the paper's ``routing_counts.json`` and one of its models
    ("olmoe", "qwen", "deepseek-base", "deepseek-chat"), to compare with on the shared domains."""
    _check_positive(max_tokens=max_tokens, batch_size=batch_size)
    _check_budget(max_tokens)
    out_dir = check_out(out, overwrite) if is_main_process() else Path(out).expanduser().resolve()
    texts = _check_corpora(corpora)
    paper = check_paper_options(paper_counts, paper_model, list(texts))
    model = _check_model(model_name, dtype, device, expert_memory)
    sources = {d: str(s) if isinstance(s, (str, Path)) else f"{len(s)} texts" for d, s in (corpora or {}).items()}
    options = dict(model=model_name, corpora=sources or "built-in", out=str(out_dir), max_tokens=max_tokens,
                   batch_size=batch_size, dtype=str(model.cfg.dtype).removeprefix("torch."), device=str(model.cfg.device),
                   expert_memory=expert_memory, paper_counts=str(paper.path) if paper else None, paper_model=paper_model,
                   **_distribution())
    command = command or "build_report(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"
    return ReportInputs(model, model_name, texts, out_dir, max_tokens, batch_size, command, progress, options, overwrite,
                        paper)


def _distribution() -> dict[str, object]:
    """The process group the report runs in: `world_size` and `backend` ("none" without one)."""
    world_size = rank_and_world()[1]
    backend = str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else "none"
    return dict(world_size=world_size, backend=backend)


# --------------------------------------------------------------------------- phase 2: analyses
def _slugs(names: Sequence[str]) -> dict[str, str]:
    """A distinct file-name-safe slug per domain name."""
    slugs: dict[str, str] = {}
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "domain"
        slug, n = base, 1
        while slug in slugs.values():
            n += 1
            slug = f"{base}_{n}"
        slugs[name] = slug
    return slugs


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in VERSION_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@dataclass
class _Results:
    counts: RoutingCounts | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)  # caption -> relative PNG path
    samples: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _spec_layers(layers: Sequence[int]) -> list[int]:
    """All MoE layers, or `MAX_SPECIALIZATION_PANELS` of them evenly spaced (first and last included)."""
    if len(layers) <= MAX_SPECIALIZATION_PANELS:
        return list(layers)
    step = (len(layers) - 1) / (MAX_SPECIALIZATION_PANELS - 1)
    return [layers[round(i * step)] for i in range(MAX_SPECIALIZATION_PANELS)]


def _run_corpus_analyses(inputs: ReportInputs, results: _Results, stage: Callable[[str], ContextManager]) -> None:
    model, corpora = inputs.model, inputs.corpora
    budget = dict(batch_size=inputs.batch_size, max_tokens=inputs.max_tokens, progress=inputs.progress)
    with stage("routing statistics"):
        counts = results.counts = routing_stats(model, corpora, **budget)
        results.tables["specialization"] = specialization(counts, test="sequence")
        results.tables["coverage"] = coverage(counts, q=COVERAGE_LEVELS)
        results.tables["entropy"] = routing_entropy(counts)
        if counts.n_domains >= 2:
            results.tables["specialists"] = domain_specialists(counts)
    with stage("top-1 vs top-k cosine"):
        results.tables["cosine"] = topk_cosine(model, corpora, **budget)
    with stage("perplexity vs top-k"):
        results.tables["perplexity"] = perplexity_vs_top_k(model, corpora, **budget)
    with stage("expert importance"):
        _run_importance(inputs, results, budget)
    with stage("pruning curve"):
        cfg = model.cfg
        fractions = [f for f in PRUNING_FRACTIONS if math.floor(f * cfg.n_experts) <= cfg.n_experts - cfg.top_k]
        results.tables["pruning"] = pruning_curve(model, corpora, fractions, usage=counts, **budget)


def _run_importance(inputs: ReportInputs, results: _Results, budget: dict) -> None:
    """Causal importance by attribution (one forward and backward pass per batch: cheap enough for
    the default report), its correlation with routing frequency, and the routing intervals."""
    importance = expert_importance(inputs.model, inputs.corpora, method="attribution", **budget)
    results.tables["importance"] = importance
    results.tables.update(importance_tables(importance))
    results.tables["routing_intervals"] = routing_intervals(results.counts)


def _draw_sample(model: HookedMoETransformer, domain: str, text: str) -> dict:
    """One domain's sample prompt, the first `SAMPLE_PROMPT_TOKENS` tokens of `text`: its
    expert-lens rows (`lens`) and grid (`grid`, `grid_page`) and its routing view
    (`routing_page`), as a table and HTML ready to write."""
    tokens = model.to_tokens(text)[:, :SAMPLE_PROMPT_TOKENS]
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, return_type=None)
    lens = expert_lens(model, cache, pos=-1, include_shared=bool(model.cfg.d_shared_expert))
    grid = ExpertLensGrid(lens, title=f"{domain}: next token after the prompt, decoded at each MoE layer")
    routing = routing_view(cache, readable_str_tokens(model, tokens[0]))
    return dict(domain=domain, prompt=model.to_string(tokens[0]),
                lens=lens.assign(domain=domain)[["domain", *lens.columns]],
                grid=grid.to_html(), grid_page=grid.page(), routing_page=routing.to_html())


def _run_samples(inputs: ReportInputs, results: _Results, folder: Path | None, slugs: dict[str, str]) -> None:
    """Per domain: the expert lens and the routing of the first text's first tokens. In a
    process group the ranks draw the domains in turn; rank 0 (`folder` given) writes the pages."""
    model, corpora = inputs.model, inputs.corpora
    samples = map_over_ranks(lambda domain: _draw_sample(model, domain, corpora[domain][0]), list(corpora),
                             "report: sample prompts")
    results.tables["expert_lens"] = pd.concat([sample.pop("lens") for sample in samples], ignore_index=True)
    if folder is None:
        return
    for sample in samples:
        slug = slugs[sample["domain"]]
        routing, grid = f"routing_{slug}.html", f"expert_lens_{slug}.html"
        (folder / routing).write_text(sample.pop("routing_page"), encoding="utf-8")
        (folder / grid).write_text(sample.pop("grid_page"), encoding="utf-8")
        results.samples.append(dict(sample, routing=routing, expert_lens=grid))


def _figures(results: _Results, slugs: dict[str, str]) -> list[tuple[str, str, Callable[[], Figure]]]:
    """`(caption, file name, drawing function)` of every figure, in the page's order."""
    counts, tables = results.counts, results.tables
    figures = [
        ("Specialization: fraction of each domain's tokens routed to each expert (dashed: uniform k/E)",
         "specialization", lambda: specialization_figure(tables["specialization"], layers=_spec_layers(counts.layers))),
        ("Top-1 vs top-k cosine per layer, beside the baselines cos(u, H^k) and cos(H^1 - u, H^k - u) "
         "(shaded: 95% bootstrap interval)", "cosine", lambda: cosine_figure(tables["cosine"])),
        ("Change in log-perplexity vs experts kept, from the unmodified model (shaded: 95% bootstrap interval "
         "over chunks)", "perplexity", lambda: perplexity_figure(tables["perplexity"])),
        ("The paper's min-max normalised log-perplexity (hides the size and direction of each change)",
         "perplexity_normalized", lambda: perplexity_figure(tables["perplexity"], value="normalized_log_ppl")),
        ("Perplexity when pruning each layer's least-used experts", "pruning",
         lambda: pruning_figure(tables["pruning"])),
        ("Routing frequency vs causal importance (attribution estimate of the loss increase when the expert is "
         "removed; bars: 95% bootstrap interval)", "importance", lambda: importance_figure(tables["importance"])),
    ]
    if counts.coactivation is not None:
        middle = counts.layers[len(counts.layers) // 2]
        for domain in counts.domains:
            figures.append((f"Expert co-activation, {domain}, layer {middle}", f"coactivation_{slugs[domain]}",
                            partial(_coactivation_figure, counts, domain, middle)))
    return figures


def _coactivation_figure(counts: RoutingCounts, domain: str, layer: int) -> Figure:
    matrix = coactivation_matrix(counts, domain, layer)
    return coactivation_figure(matrix, title=f"{domain}: co-activation (Jaccard), layer {layer}")


def _draw_figures(results: _Results, folder: Path | None, slugs: dict[str, str]) -> None:
    """Render every figure to PNG, the ranks of a process group taking them in turn; rank 0
    (`folder` given) writes them to `figures/`."""
    figures = _figures(results, slugs)
    pngs = map_over_ranks(lambda figure: to_png(figure[2]()), figures, "report: figures")
    if folder is None:
        return
    (folder / "figures").mkdir()
    for (caption, name, _), png in zip(figures, pngs):
        path = folder / "figures" / f"{name}.png"
        path.write_bytes(png)
        results.figures[caption] = path.relative_to(folder).as_posix()
    if "paper_comparison" in results.tables:  # drawn by rank 0 alone, in its own section of the page
        figure = comparison_figure(results.tables["paper_comparison"], STATISTICS,
                                   xlabel="relative depth, (layer + 0.5) / layers", ylabel="fraction of the layer's experts")
        (folder / PAPER_FIGURE).write_bytes(to_png(figure))


def _write_files(inputs: ReportInputs, results: _Results, folder: Path) -> None:
    """counts.json, a CSV per table, index.html, then report.json (which marks a finished report)."""
    results.counts.save(folder / "counts.json")
    for name, table in results.tables.items():
        table.to_csv(folder / f"{name}.csv", index=False)
    versions = _versions()
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    (folder / "index.html").write_text(_index_html(inputs, results, files, versions), encoding="utf-8")
    metadata_json = dict(model=inputs.model_name, command=inputs.command, options=inputs.options,
                         config=inputs.model.cfg.to_dict(), versions=versions, timings_s=results.timings,
                         files=["index.html", *files])
    (folder / METADATA_FILE).write_text(json.dumps(metadata_json, indent=2, default=str))


# --------------------------------------------------------------------------- index.html
PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #111; }
h1 { font-size: 24px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table.data { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
table.data th { background: #f4f4f4; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; white-space: pre-wrap; }
figure { margin: 16px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
iframe { width: 100%; height: 260px; border: 1px solid #ddd; }
.files a { margin-right: 12px; }
"""


P_VALUE_FLOOR = 1e-300
"""p-values below this (down to those that underflowed to 0) display as "< 1e-300"."""


def _p_value_text(p: float) -> str:
    return f"< {P_VALUE_FLOOR:.0e}" if p < P_VALUE_FLOOR else f"{p:.4g}"


def _table(frame: pd.DataFrame) -> str:
    p_values = {column: frame[column].map(_p_value_text) for column in frame.columns if column.startswith("p_")}
    return frame.assign(**p_values).to_html(classes="data", index=False, border=0, float_format=lambda x: f"{x:.4g}")


def _key_values(values: Mapping[str, object]) -> str:
    return _table(pd.DataFrame({"": list(values), "value": [str(v) for v in values.values()]}))


def _by_domain(frame: pd.DataFrame, columns: str, values: str) -> pd.DataFrame:
    """`values` with one row per domain (in corpus order) and one column per value of `columns`."""
    table = frame.pivot(index="domain", columns=columns, values=values).reindex(frame["domain"].unique())
    table.columns = [f"{columns} {c}" for c in table.columns]
    return table.reset_index()


def _summary_tables(results: _Results) -> list[tuple[str, pd.DataFrame]]:
    """Small views of the result tables for the page (the CSV files hold everything)."""
    t = results.tables
    spec = t["specialization"]
    n_specialized = spec.groupby(["domain", "layer"], sort=False)["specialized"].sum().reset_index()
    most = spec[spec["specialized"]].sort_values("ratio", ascending=False).head(15)
    return [
        ("Most important experts per domain (loss increase when removed, attribution estimate, 95% interval)",
         t["top_experts"]),
        ("Routing frequency vs causal importance: Spearman rank correlation per layer", t["importance_correlation"]),
        ("Specialized experts per domain and layer (one-sided sequence-level test, Holm-corrected, alpha 0.05, "
         "and at least 1.5 times the uniform rate)",
         _by_domain(n_specialized, "layer", "specialized")),
        ("Most specialized experts (fraction / uniform baseline)",
         most[["domain", "layer", "expert", "fraction", "baseline", "ratio", "ratio_ci_low", "ratio_ci_high",
              "p_adjusted"]]),
        ("Experts needed to cover 50% of the routing decisions",
         _by_domain(t["coverage"][t["coverage"]["q"] == 0.5], "layer", "n_experts_needed")),
        ("Normalised entropy of expert usage", _by_domain(t["entropy"], "layer", "normalized_entropy")),
        ("Top-1 vs top-k cosine (all tokens)",
         _by_domain(t["cosine"][t["cosine"]["variant"] == "all_tokens"], "layer", "cosine")),
        ("Perplexity with the top-k' experts only", _by_domain(t["perplexity"], "k", "ppl")),
        ("Perplexity after pruning the least-used experts", _by_domain(t["pruning"], "fraction", "ppl")),
    ]


def _summary_list(n_experts: int, tables: dict[str, pd.DataFrame]) -> str:
    lines = headline_numbers(n_experts, tables["routing_intervals"], tables["perplexity"],
                             tables.get("importance_correlation"))
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def _paper_section(inputs: ReportInputs, results: _Results) -> list[str]:
    """Our coverage and specialization beside the paper's (nothing without `paper_counts`)."""
    paper = inputs.paper
    if paper is None:
        return []
    caption = (f"Ours (solid) and the paper's {paper.model.hub_id} (dashed) against relative depth, per domain both have")
    return [
        f"<h2>Beside the paper: {html.escape(paper.model.hub_id)}</h2>",
        *[f"<p>{html.escape(line)}</p>" for line in section_text(paper, inputs.model_name, results.counts,
                                                                   inputs.model.cfg.n_layers)],
        f'<figure><img src="{PAPER_FIGURE}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
        "</figcaption></figure>",
        "<h3>Mean over MoE layers (every layer: paper_comparison.csv)</h3>",
        _table(comparison_summary(results.tables["paper_comparison"])),
    ]


def _index_html(inputs: ReportInputs, results: _Results, files: list[str], versions: dict[str, str]) -> str:
    model = inputs.model
    esc = html.escape
    counts = results.counts
    corpus_rows = pd.DataFrame({"domain": counts.domains, "texts": [len(inputs.corpora[d]) for d in counts.domains],
                                "tokens routed": counts.tokens[:, 0]})
    parts = [
        f"<h1>moe_hooked report: {esc(inputs.model_name)}</h1>",
        f"<p>{esc(model.cfg.architecture)} model, {model.cfg.n_layers} layers, {model.cfg.n_experts} routed experts, "
        f"top-{model.cfg.top_k}, MoE layers {esc(str(list(model.cfg.moe_layers)))}; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters.</p>",
        "<h2>Summary</h2>", _summary_list(model.cfg.n_experts, results.tables),
        "<h2>Run</h2>", f"<pre>{esc(inputs.command)}</pre>",
        _key_values({"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "processes": f"{inputs.options.get('world_size', 1)} ({inputs.options.get('backend', 'none')})",
                     **{f"time: {k}": f"{v:.1f} s" for k, v in results.timings.items()}}),
        "<h2>Corpora</h2>", _table(corpus_rows),
        "<h2>Figures</h2>",
        *[f'<figure><img src="{esc(path)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'
          for caption, path in results.figures.items()],
        "<h2>Tables</h2>",
        *[f"<h3>{esc(title)}</h3>{_table(frame)}" for title, frame in _summary_tables(results)],
        *_paper_section(inputs, results),
        "<h2>Sample prompts</h2>",
    ]
    for sample in results.samples:
        parts += [
            f"<h3>{esc(sample['domain'])}</h3>", f"<pre>{esc(sample['prompt'])}</pre>", sample["grid"],
            f'<p><a href="{esc(sample["expert_lens"])}">the expert-lens grid alone</a></p>',
            f'<p>Routing weight of every expert on every token (pick a layer and an expert; '
            f'<a href="{esc(sample["routing"])}">open alone</a>):</p>',
            f'<iframe src="{esc(sample["routing"])}" title="routing {esc(sample["domain"])}"></iframe>',
        ]
    parts += [
        "<h2>Model configuration</h2>", _key_values(model.cfg.to_dict()),
        "<h2>Versions</h2>", _key_values(versions),
        "<h2>Files</h2>", '<p class="files">' + "\n".join(f'<a href="{esc(f)}">{esc(f)}</a>' for f in files) + "</p>",
    ]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>moe_hooked report: '
            f"{esc(inputs.model_name)}</title><style>{PAGE_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


# --------------------------------------------------------------------------- driver
@shared_failures("report")
def write_report(inputs: ReportInputs) -> Path:
    """Run the analyses and write the report folder (see the module docstring); returns its path.

    In a process group every rank must call it: the corpus analyses, the sample prompts and the
    figures are shared out, and only rank 0 writes the folder (the other ranks return `out`
    once their share is done). The files are the same whatever the number of processes, apart
    from the recorded process count and timings."""
    results = _Results()
    main = is_main_process()
    slugs = _slugs(list(inputs.corpora))
    folder = build_folder(inputs.out) if main else None
    bar = tqdm(total=7, desc="report", unit="step", disable=not (inputs.progress and main))

    @contextmanager
    def stage(name: str):
        bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        results.timings[name] = time.perf_counter() - start
        bar.update()

    try:
        _run_corpus_analyses(inputs, results, stage)
        with stage("sample prompts"):
            _run_samples(inputs, results, folder, slugs)
        with stage("figures and files"):
            if inputs.paper is not None:
                results.tables["paper_comparison"] = comparison_table(
                    results.tables["specialization"], results.tables["coverage"], inputs.model.cfg.n_layers, inputs.paper)
            _draw_figures(results, folder, slugs)
            if folder is not None:
                _write_files(inputs, results, folder)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        bar.close()
    if folder is not None:
        publish(folder, inputs.out, inputs.overwrite)
    return inputs.out


def build_report(*args, **kwargs) -> Path:
    """Run every analysis on `model_name` over `corpora` and write the report folder `out`.

    Takes the arguments of :func:`prepare_report` (`model_name`, `corpora`, `out`,
    `max_tokens`, `batch_size`, `dtype`, `device`, `overwrite`, `progress`, `command`,
    `expert_memory`, `paper_counts`, `paper_model`).

    `corpora`: `{domain: path to a .txt/.jsonl file, or a list of texts}`; None uses the
    built-in sample corpora. `max_tokens` caps the tokens each corpus analysis reads per
    domain. `command` is recorded in the report (the CLI passes its command line). Raises
    :class:`ReportError` before any analysis if an input is unusable. Returns `out`.
    """
    return write_report(prepare_report(*args, **kwargs))


__all__ = ["ReportError", "ReportInputs", "build_report", "prepare_report", "write_report"]
