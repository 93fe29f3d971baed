"""Tests of the `moe-hooked report` console script and `moe_hooked.report.build_report`: the
report folder's files and numbers, its index.html in headless Chromium (no console errors, no
network), and clear errors, before any model work, on bad input."""

from __future__ import annotations

import contextlib
import html
import io
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from chromium import chromium_binary, is_blank, open_page
from hf_models import build_hf, qwen2_moe_config, save_hf
from scipy.stats import spearmanr
from tiny import tiny_model

from moe_hooked import HookedMoETransformer
from moe_hooked.analysis import RoutingCounts, coverage, expert_importance, routing_entropy, specialization
from moe_hooked.cli import main
from moe_hooked.data import count_tokens
from moe_hooked.lens import expert_lens
from moe_hooked.report import SAMPLE_PROMPT_TOKENS, ReportError, build_report

CORPORA = {
    "english": ["The cat sat on the mat and looked at the moon.", "Routers send each token to a few experts."],
    "code": ["def add(a, b): return a + b", "x = 2 + 3 and 7 * 6 = 42"],
}
MAX_TOKENS = 48
REPO = Path(__file__).resolve().parents[1]
PAPER_COUNTS = REPO.parent / "shared/data/paper/routing_counts.json"
needs_chromium = pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)")


FIGURES = ("specialization", "cosine", "perplexity", "perplexity_normalized", "pruning", "importance")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2-MoE (shared expert, layer 1 dense) with a tokenizer."""
    folder = tmp_path_factory.mktemp("qwen")
    tiny_model(qwen2_moe_config(), folder, seed=5)
    return folder


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpora")
    for domain, texts in CORPORA.items():
        (folder / f"{domain}.txt").write_text("\n".join(texts) + "\n")
    return {domain: folder / f"{domain}.txt" for domain in CORPORA}


def run_report(model_dir, corpus_files, out, *options) -> tuple[list[str], str, str]:
    """The console script's `main` run on a command line: returns (argv, stdout, stderr)."""
    argv = ["report", "--model", str(model_dir), "--max-tokens", str(MAX_TOKENS), "--batch-size", "2", "--out", str(out)]
    for domain, path in corpus_files.items():
        argv += ["--corpus", f"{domain}={path}"]
    argv += options
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    assert status == 0, stderr.getvalue()
    return argv, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def report(model_dir, corpus_files, tmp_path_factory):
    """(report folder, argv, stdout, stderr) of a report run by the console script."""
    out = tmp_path_factory.mktemp("run") / "my report"
    return out, *run_report(model_dir, corpus_files, out)


@pytest.fixture(scope="module")
def model(model_dir):
    return HookedMoETransformer.from_pretrained(str(model_dir))


def test_report_writes_every_file(report):
    out, _, stdout, stderr = report
    assert f"report written to {out / 'index.html'}" in stdout
    assert "report:" in stderr  # the tqdm progress bar
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {"index.html", "report.json", "counts.json", "expert_lens.csv"}
    expected |= {f"{name}.csv" for name in ("specialization", "coverage", "entropy", "specialists", "cosine", "perplexity", "pruning",
                                            "importance", "importance_correlation", "top_experts", "routing_intervals")}
    expected |= {f"figures/{name}.png" for name in FIGURES}
    expected |= {f"{kind}_{domain}.html" for kind in ("routing", "expert_lens") for domain in CORPORA}
    expected |= {f"figures/coactivation_{domain}.png" for domain in CORPORA}
    assert files == expected
    assert not list(out.parent.glob(".*partial*"))  # the temporary folder was renamed


SLOW_IMPORTS = ("sympy", "scipy.stats")
"""Modules the report does not need, each about a second of CPU time to import: in every process
at every start, a part of a distributed report that does not shrink with more processes."""


def test_a_report_run_imports_neither_sympy_nor_scipy_stats(model_dir, corpus_files, tmp_path):
    """The run itself imports neither: those that importing moe_hooked's dependencies already
    brings in (TransformerLens 3.x imports sympy, for one) are not the report's doing."""
    argv = ["report", "--model", str(model_dir), "--max-tokens", "16", "--out", str(tmp_path / "out")]
    argv += [arg for domain, path in corpus_files.items() for arg in ("--corpus", f"{domain}={path}")]
    code = (f"import sys; from moe_hooked.cli import main; before = set(sys.modules); status = main({argv!r}); "
            f"print(status, [m for m in {SLOW_IMPORTS!r} if m in sys.modules and m not in before])")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout[-2000:] + done.stderr[-3000:]


def test_python_dash_m_skips_the_final_garbage_collection(tmp_path):
    """`python -m moe_hooked` (like the console script, `cli.script`) freezes the GC after the
    command, so the interpreter's shutdown does not search every object for cycles; the exit
    status and the error message are main's."""
    missing = tmp_path / "no-such-model"
    code = ("import atexit, gc, runpy, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
            f"sys.argv = ['moe_hooked', 'report', '--model', {str(missing)!r}]; "
            "runpy.run_module('moe_hooked', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "no-such-model" in done.stderr, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "frozen True"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["moe-hooked"] == "moe_hooked.cli:script"


def test_report_numbers(report, model):
    out, argv, _, _ = report
    counts = RoutingCounts.load(out / "counts.json")
    assert counts.domains == list(CORPORA)
    assert counts.layers == list(model.cfg.moe_layers)
    for d, texts in enumerate(CORPORA.values()):  # every token of the corpus, up to the budget
        in_corpus = count_tokens(model.tokenizer, texts, model.cfg.n_ctx, prepend_bos=model.cfg.default_prepend_bos)
        n_tokens = min(MAX_TOKENS, in_corpus)
        assert (counts.tokens[d] == n_tokens).all()
    spec = pd.read_csv(out / "specialization.csv")
    expected = specialization(counts, test="sequence")
    pd.testing.assert_frame_equal(spec.drop(columns="specialized"), expected.drop(columns="specialized"), check_dtype=False)
    assert spec["specialized"].tolist() == expected["specialized"].tolist()
    ppl = pd.read_csv(out / "perplexity.csv")
    assert sorted(ppl["k"].unique()) == list(range(1, model.cfg.top_k + 1))
    pruning = pd.read_csv(out / "pruning.csv")
    assert set(pruning["domain"]) == set(CORPORA) and (pruning["n_pruned_per_layer"] <= model.cfg.n_experts - model.cfg.top_k).all()
    cosine = pd.read_csv(out / "cosine.csv")
    assert set(cosine["layer"]) == set(model.cfg.moe_layers)
    importance = pd.read_csv(out / "importance.csv")
    fresh = expert_importance(model, CORPORA, method="attribution", max_tokens=MAX_TOKENS, progress=False)
    np.testing.assert_allclose(importance["delta_nll"], fresh["delta_nll"], rtol=1e-4, atol=1e-9)
    correlation = pd.read_csv(out / "importance_correlation.csv")
    for row in correlation.itertuples():
        at_layer = fresh[fresh["layer"] == row.layer]
        assert row.spearman_rho == pytest.approx(spearmanr(at_layer["routed_fraction"], at_layer["delta_nll"]).statistic)
    intervals = pd.read_csv(out / "routing_intervals.csv").set_index(["domain", "statistic"])
    entropy = routing_entropy(counts).groupby("domain")["normalized_entropy"].mean()
    coverage_50 = coverage(counts, q=0.5).groupby("domain")["n_experts_needed"].mean()
    for domain in CORPORA:
        assert intervals.loc[(domain, "normalized_entropy"), "value"] == pytest.approx(entropy[domain])
        assert intervals.loc[(domain, "experts_for_50%"), "value"] == pytest.approx(coverage_50[domain])
        row = intervals.loc[(domain, "experts_for_50%")]
        assert row["ci_low"] <= row["value"] <= row["ci_high"]

    lens = pd.read_csv(out / "expert_lens.csv", keep_default_na=False)
    for domain, texts in CORPORA.items():  # the sample prompt: the first text's first tokens
        tokens = model.to_tokens(texts[0])[:, :SAMPLE_PROMPT_TOKENS]
        _, cache = model.run_with_cache(tokens)
        fresh = expert_lens(model, cache, include_shared=True)
        saved = lens[lens["domain"] == domain]
        assert saved["token_id"].tolist() == fresh["token_id"].tolist()
        np.testing.assert_allclose(saved["prob"], fresh["prob"], rtol=1e-4)

    meta = json.loads((out / "report.json").read_text())
    assert meta["command"] == "moe-hooked " + shlex.join(argv)
    assert torch.__version__.startswith(meta["versions"]["torch"].split("+")[0])
    assert meta["config"]["n_experts"] == model.cfg.n_experts
    page = (out / "index.html").read_text()
    assert "moe-hooked report --model" in page and "n_experts" in page
    assert "Experts needed to cover 50% of the routing decisions" in page and "Spearman rank correlation" in page
    assert "http://" not in page and "https://" not in page


READY = "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0) && {images: document.images.length, " \
        "iframes: document.querySelectorAll('iframe').length, grids: document.querySelectorAll('table.moe-lens-grid').length}"


@needs_chromium
def test_index_page_loads_offline_in_chromium(report):
    out, _, _, _ = report
    page = open_page(out / "index.html", ready=READY)
    assert page.console_errors == []
    assert page.network_requests == []
    assert all(url.startswith((out.as_uri() + "/")) for url in page.requests), page.requests
    assert page.value == {"images": len(FIGURES) + len(CORPORA), "iframes": len(CORPORA), "grids": len(CORPORA)}
    assert not is_blank(page.screenshot)


@needs_chromium
def test_routing_pages_render_their_component(report):
    out, _, _, _ = report
    ready = "(() => { const root = document.querySelector('[id^=\"circuits-vis-\"]'); " \
            "return root && root.querySelectorAll('select').length; })()"
    for domain in CORPORA:
        page = open_page(out / f"routing_{domain}.html", ready=ready)
        assert page.console_errors == [] and page.network_requests == []
        assert page.value == 2  # the layer and expert pickers
        assert not is_blank(page.screenshot)


def test_overwrite_replaces_a_previous_report(report, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(report[0], out)
    (out / "stale.txt").write_text("from an older run")
    model_dir = json.loads((out / "report.json").read_text())["model"]
    assert build_report(model_dir, {"one": ["The cat sat on the mat."]}, out, max_tokens=16, overwrite=True, progress=False) == out
    assert not (out / "stale.txt").exists()
    assert RoutingCounts.load(out / "counts.json").domains == ["one"]
    assert json.loads((out / "report.json").read_text())["command"].startswith("build_report(")


def test_a_failed_run_leaves_nothing_behind(model_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("analysis failed")

    monkeypatch.setattr("moe_hooked.report.topk_cosine", broken)
    with pytest.raises(RuntimeError, match="analysis failed"):
        build_report(str(model_dir), {"one": ["The cat sat."]}, tmp_path / "out", max_tokens=16, progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the model is loaded: checks on cheap inputs must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr(HookedMoETransformer, "from_pretrained", refuse)


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of `moe-hooked argv...`, whether it returns or exits."""
    try:
        status = main(list(argv))
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def test_existing_output_folder_is_refused(capsys, tmp_path, no_model_loading, corpus_files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status, err = run_cli(capsys, "report", "--out", str(out))
    assert status == 2 and "already exists: pass --overwrite" in err
    status, err = run_cli(capsys, "report", "--out", str(out), "--overwrite")
    assert status == 2 and "not a moe-hooked report" in err
    assert (out / "notes.txt").read_text() == "mine"
    status, err = run_cli(capsys, "report", "--out", str(out / "notes.txt"))
    assert status == 2 and "is a file" in err
    status, err = run_cli(capsys, "report", "--out", str(tmp_path / "no" / "such" / "dir"))
    assert status == 2 and "does not exist" in err


def test_missing_or_malformed_corpus_is_refused(capsys, tmp_path, no_model_loading, corpus_files):
    missing = tmp_path / "nope.txt"
    status, err = run_cli(capsys, "report", "--corpus", f"english={missing}", "--out", str(tmp_path / "out"))
    assert status == 2 and "corpus file not found" in err and str(missing) in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    status, err = run_cli(capsys, "report", "--corpus", f"blank={empty}", "--out", str(tmp_path / "out"))
    assert status == 2 and "no text samples" in err
    status, err = run_cli(capsys, "report", "--corpus", "english", "--out", str(tmp_path / "out"))
    assert status == 2 and "NAME=PATH" in err
    path = corpus_files["code"]
    status, err = run_cli(capsys, "report", "--corpus", f"a={path}", "--corpus", f"a={path}", "--out", str(tmp_path / "out"))
    assert status == 2 and "repeated: a" in err
    assert not (tmp_path / "out").exists()


def test_unloadable_model_is_refused(capsys, tmp_path, corpus_files):
    corpus = f"code={corpus_files['code']}"
    status, err = run_cli(capsys, "report", "--model", str(tmp_path / "no-model"), "--corpus", corpus, "--out", str(tmp_path / "a"))
    assert status == 2 and "cannot load model" in err and "no-model" in err
    no_tokenizer = save_hf(build_hf(qwen2_moe_config()), tmp_path / "no-tokenizer")
    status, err = run_cli(capsys, "report", "--model", str(no_tokenizer), "--corpus", corpus, "--out", str(tmp_path / "b"))
    assert status == 2 and "has no tokenizer" in err
    status, err = run_cli(capsys, "report", "--model", str(no_tokenizer), "--dtype", "float9", "--out", str(tmp_path / "c"))
    assert status == 2 and "unknown dtype 'float9'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tokenizer"]


def test_bad_numbers_are_refused(capsys, tmp_path, no_model_loading):
    status, err = run_cli(capsys, "report", "--max-tokens", "0", "--out", str(tmp_path / "out"))
    assert status == 2 and "--max-tokens" in err and "at least 1" in err
    status, err = run_cli(capsys, "report", "--batch-size", "many", "--out", str(tmp_path / "out"))
    assert status == 2 and "not a whole number" in err


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    assert "report" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main(["report", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--model", "--corpus", "--max-tokens", "--batch-size", "--dtype", "--device", "--out", "--overwrite"):
        assert option in help_text
    status, err = run_cli(capsys)
    assert status == 2 and "COMMAND" in err


# --------------------------------------------------------------------------- beside the paper's counts
PAPER_MODEL = "olmoe"  # 16 layers, all MoE, numbered from 1 in the paper's file; 64 experts, top-8
PAPER_N_LAYERS, PAPER_TOP_K, PAPER_KEY_OFFSET = 16, 8, 1
STATISTICS = ["fraction_for_50%", "fraction_for_90%", "share_over_1.5x_uniform"]


@pytest.fixture(scope="module")
def paper_report(model_dir, corpus_files, tmp_path_factory):
    """(report folder, argv) of a report with --paper-counts (english is shared, code is ours alone)."""
    if not PAPER_COUNTS.is_file():
        pytest.skip(f"the paper's counts are not at {PAPER_COUNTS}")
    out = tmp_path_factory.mktemp("paper") / "report"
    argv, _, _ = run_report(model_dir, corpus_files, out, "--paper-counts", str(PAPER_COUNTS), "--paper-model", PAPER_MODEL)
    return out, argv


def by_hand(counts: list[int], tokens: int, top_k: int) -> list[float]:
    """Fraction of the experts that cover 50% and 90% of the routing, and the share used >= 1.5 k/E, in integers."""
    n_experts, total = len(counts), sum(counts)
    covered = list(itertools.accumulate(sorted(counts, reverse=True)))
    n_50 = next(n for n, c in enumerate(covered, start=1) if 2 * c >= total)
    n_90 = next(n for n, c in enumerate(covered, start=1) if 10 * c >= 9 * total)
    over = sum(2 * c * n_experts >= 3 * top_k * tokens for c in counts)  # c / tokens >= 1.5 k / E
    return [n_50 / n_experts, n_90 / n_experts, over / n_experts]


def expected_rows(out: Path) -> dict[tuple[str, int], list[float]]:
    """(source, layer) -> [depth, tokens, *STATISTICS] of english, from the raw JSON of both sides."""
    ours = json.loads((out / "counts.json").read_text())
    n_layers = json.loads((out / "report.json").read_text())["config"]["n_layers"]
    d = ours["domains"].index("english")
    rows = {("ours", layer): [(layer + 0.5) / n_layers, ours["tokens"][d][i],
                              *by_hand(ours["counts"][d][i], ours["tokens"][d][i], ours["top_k"])]
            for i, layer in enumerate(ours["layers"])}
    for key, counts in json.loads(PAPER_COUNTS.read_text())["counts"][PAPER_MODEL]["english"].items():
        layer, tokens = int(key) - PAPER_KEY_OFFSET, sum(counts) // PAPER_TOP_K
        rows["paper", layer] = [(layer + 0.5) / PAPER_N_LAYERS, tokens, *by_hand(counts, tokens, PAPER_TOP_K)]
    return rows


def test_paper_section_numbers_equal_a_hand_computation(paper_report):
    out, _ = paper_report
    table = pd.read_csv(out / "paper_comparison.csv")
    assert set(table["domain"]) == {"english"}  # code: ours alone
    expected = expected_rows(out)
    assert sorted(zip(table["source"], table["layer"])) == sorted(expected)
    assert (table["source"] == "paper").sum() == PAPER_N_LAYERS
    for row in table.to_dict("records"):
        got = [row["depth"], row["tokens"], *(row[name] for name in STATISTICS)]
        np.testing.assert_allclose(got, expected[row["source"], row["layer"]], rtol=1e-12, err_msg=str(row))
    page = (out / "index.html").read_text()
    section = page[page.index("<h2>Beside the paper: allenai/OLMoE-1B-7B-0924</h2>"):page.index("<h2>Sample prompts</h2>")]
    assert "only in our corpora: code; only in the paper&#x27;s counts: aime-math, arxiv, chinese, french-qa, github, gsm8k" in section
    rows = [[html.unescape(re.sub(r"<.*?>", "", cell)).strip() for cell in re.findall(r"<t[dh].*?</t[dh]>", tr, re.S)]
            for tr in re.findall(r"<tr.*?</tr>", section.split("<h3>Mean over MoE layers")[1], re.S)]
    for source in ("ours", "paper"):  # the page's summary: means over layers of the hand computation
        values = np.array([v for (s, _), v in expected.items() if s == source])
        means = [f"{values[0, 1]:.0f}"] + [f"{x:.4g}" for x in values[:, 2:].mean(0)]
        assert ["english", source, *means] in rows[1:]
    assert (out / "figures/paper_comparison.png").stat().st_size > 0
    options = json.loads((out / "report.json").read_text())["options"]
    assert options["paper_counts"] == str(PAPER_COUNTS.resolve()) and options["paper_model"] == PAPER_MODEL


@needs_chromium
def test_paper_section_loads_offline_in_chromium(paper_report):
    out, _ = paper_report
    page = open_page(out / "index.html", ready=READY)
    assert page.console_errors == [] and page.network_requests == []
    assert page.value["images"] == len(FIGURES) + len(CORPORA) + 1  # and the comparison figure


def small_paper_counts(path: Path, domains=("english", "github")) -> Path:
    """A routing_counts.json of OLMoE's shape with two layers and the given domains."""
    layers = {"1": [8] * 64, "2": [16] * 32 + [0] * 32}
    path.write_text(json.dumps({"counts": {"olmoe": {domain: layers for domain in domains}}}))
    return path


def test_bad_paper_options_are_refused_before_any_work(capsys, tmp_path, no_model_loading, corpus_files):
    corpora = [arg for domain, path in corpus_files.items() for arg in ("--corpus", f"{domain}={path}")]
    good = small_paper_counts(tmp_path / "counts.json")
    out = str(tmp_path / "out")
    cases = [
        (["--paper-counts", str(tmp_path / "nope.json"), "--paper-model", "olmoe"], "paper counts file not found"),
        (["--paper-counts", str(good), "--paper-model", "mixtral"], "invalid choice: 'mixtral'"),
        (["--paper-counts", str(good)], "--paper-counts and --paper-model go together"),
        (["--paper-model", "olmoe"], "--paper-counts and --paper-model go together"),
        (["--paper-counts", str(good), "--paper-model", "qwen"], "has no counts for 'qwen'"),
        (["--paper-counts", str(small_paper_counts(tmp_path / "other.json", ("arxiv", "chinese"))),
          "--paper-model", "olmoe"], "no domain in common with the paper's counts: ours are english, code, the paper's arxiv, chinese"),
    ]
    (tmp_path / "broken.json").write_text("{not json")
    cases.append((["--paper-counts", str(tmp_path / "broken.json"), "--paper-model", "olmoe"], "cannot read the paper's counts"))
    for options, message in cases:
        status, err = run_cli(capsys, "report", *corpora, *options, "--out", out)
        assert status == 2 and message in err, (options, err)
    with pytest.raises(ReportError, match="unknown paper model 'mixtral'"):
        build_report(corpora=CORPORA, out=out, paper_counts=good, paper_model="mixtral")
    assert not (tmp_path / "out").exists()
