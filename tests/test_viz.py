"""Tests of moe_hooked.viz: circuitsvis routing views (props and offline rendering in headless
Chromium), the expert-lens grid HTML, and the matplotlib figures' plotted arrays."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import torch
from chromium import chromium_binary, is_blank, open_page
from hf_models import olmoe_config, qwen2_moe_config
from tiny import tiny_model

from moe_hooked.analysis import RoutingCounts, specialization
from moe_hooked.lens import expert_lens
from moe_hooked.viz import (
    CircuitsView,
    ExpertLensGrid,
    coactivation_figure,
    cosine_figure,
    expert_weight_view,
    perplexity_figure,
    pruning_figure,
    routing_cache,
    routing_view,
    routing_weights,
    specialization_figure,
    to_png,
    top1_expert_view,
    top1_experts,
)

PROMPT = "The cat sat on the mat and looked at the moon."
TOL = dict(rtol=1e-5, atol=1e-6)  # separate float32 runs differ in the last bits
needs_chromium = pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    return tiny_model(olmoe_config(), tmp_path_factory.mktemp("olmoe"), seed=3)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Shared expert, layer 1 dense."""
    return tiny_model(qwen2_moe_config(), tmp_path_factory.mktemp("qwen"), seed=4)


def router_probs(model, prompt=PROMPT) -> dict[int, torch.Tensor]:
    """Full router softmax per MoE layer, [pos n_experts], from a plain cached run."""
    _, cache = model.run_with_cache(prompt)
    return {layer: cache[f"blocks.{layer}.mlp.hook_router_probs"][0] for layer in model.cfg.moe_layers}


def hand_dense_weights(model, probs: torch.Tensor) -> torch.Tensor:
    """Top-k of the softmax kept (renormalised if the model does), others 0: [pos n_experts]."""
    values, ids = probs.topk(model.cfg.top_k, dim=-1)
    if model.cfg.norm_topk_prob:
        values = values / values.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, ids, values)


def props(view: CircuitsView) -> dict:
    """The props object circuitsvis passes to its React component."""
    match = re.search(r"CircuitsVis\.render\(\s*\"[^\"]+\",\s*CircuitsVis\.\w+,\s*(\{.*\})\s*\)\s*</script>",
                      view.rendered.local_src, re.S)
    return json.loads(match.group(1))


# --------------------------------------------------------------------------- routing data
@pytest.mark.parametrize("name", ["olmoe", "qwen"])
def test_routing_weights_are_the_top_k_of_the_router_softmax(name, request):
    model = request.getfixturevalue(name)
    cache, str_tokens = routing_cache(model, PROMPT)
    weights, layers = routing_weights(cache)
    assert layers == list(model.cfg.moe_layers)
    assert weights.shape == (len(str_tokens), len(layers), model.cfg.n_experts)
    assert set(cache.keys()) == {f"blocks.{l}.mlp.hook_topk_{h}" for l in layers for h in ("indices", "weights")}
    for i, (layer, probs) in enumerate(router_probs(model).items()):
        torch.testing.assert_close(weights[:, i], hand_dense_weights(model, probs), **TOL)
    top1, top1_layers = top1_experts(cache)
    assert top1_layers == layers
    for i, probs in enumerate(router_probs(model).values()):
        assert torch.equal(top1[:, i], probs.argmax(-1))


def test_views_from_model_and_from_cache_agree(olmoe):
    _, cache = olmoe.run_with_cache(PROMPT)
    str_tokens = olmoe.to_str_tokens(PROMPT)
    from_model = props(routing_view(olmoe, PROMPT))
    from_cache = props(routing_view(cache, str_tokens))
    np.testing.assert_allclose(from_model.pop("activations"), from_cache.pop("activations"), **TOL)
    assert from_model == from_cache
    from_model = props(routing_view(olmoe, PROMPT))
    probs = router_probs(olmoe)
    expected = torch.stack([hand_dense_weights(olmoe, probs[layer]) for layer in olmoe.cfg.moe_layers], dim=1)
    np.testing.assert_allclose(np.array(from_model["activations"]), expected.numpy(), **TOL)
    assert from_model["tokens"] == [html.escape(t, quote=False) for t in str_tokens]
    assert from_model["firstDimensionLabels"] == [str(layer) for layer in olmoe.cfg.moe_layers]
    assert from_model["secondDimensionLabels"] == [str(e) for e in range(olmoe.cfg.n_experts)]


class TokenSpans(HTMLParser):
    """(category, text) of every token span of a categorical view, rows first, then the legend."""

    def __init__(self):
        super().__init__()
        self.spans, self.colours, self.current = [], {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "data-category" in attrs:
            self.current = int(attrs["data-category"])
            self.colours.setdefault(self.current, set()).add(attrs["style"])
            self.spans.append([self.current, ""])

    def handle_data(self, data):
        if self.current is not None:
            self.spans[-1][1] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self.current = None


def test_expert_weight_view_scales_to_the_data(olmoe):
    probs = router_probs(olmoe)
    layer, expert = 1, int(probs[1][-1].argmax())
    weight_props = props(expert_weight_view(olmoe, PROMPT, layer, expert))
    expected = hand_dense_weights(olmoe, probs[layer])[:, expert]
    np.testing.assert_allclose(weight_props["values"], expected.numpy(), **TOL)
    assert weight_props["minValue"] == 0.0
    assert weight_props["maxValue"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert weight_props["values"][-1] > 0  # the expert is this token's top-1
    assert props(expert_weight_view(olmoe, PROMPT, layer, expert, max_value=1.0))["maxValue"] == 1.0
    with pytest.raises(ValueError, match="max_value must be > 0"):
        expert_weight_view(olmoe, PROMPT, layer, expert, max_value=0)


def test_top1_view_is_categorical_with_a_legend(olmoe):
    probs = router_probs(olmoe)
    expected = torch.stack([probs[layer].argmax(-1) for layer in olmoe.cfg.moe_layers], dim=1)  # [pos layer]
    str_tokens = olmoe.to_str_tokens(PROMPT)
    view = top1_expert_view(olmoe, PROMPT)
    parser = TokenSpans()
    parser.feed(view.to_html())
    n_tokens = expected.numel()
    rows, legend = parser.spans[:n_tokens], parser.spans[n_tokens:]
    assert [c for c, _ in rows] == expected.T.flatten().tolist()
    assert [t for _, t in rows] == str_tokens * len(olmoe.cfg.moe_layers)
    assert legend == [[e, f"expert {e}"] for e in sorted(set(expected.flatten().tolist()))]
    assert all(len(styles) == 1 for styles in parser.colours.values())  # one colour per expert id
    backgrounds = {e: next(iter(styles)).split(";")[0] for e, styles in parser.colours.items()}
    assert len(set(backgrounds.values())) == len(backgrounds)  # distinct ids, distinct colours
    for layer in olmoe.cfg.moe_layers:
        assert f"layer {layer}" in view.to_html()


def test_notebook_views_embed_the_bundle_once(olmoe, monkeypatch):
    monkeypatch.setattr(CircuitsView, "bundle_shown", False)
    first, second = routing_view(olmoe, PROMPT)._repr_html_(), expert_weight_view(olmoe, PROMPT, 1, 0)._repr_html_()
    assert len(first) > 1_000_000 and "window.CircuitsVis = CircuitsVis;" in first
    assert len(second) < 20_000 and "CircuitsVis.ColoredTokens" in second and "window.CircuitsVis" in second
    monkeypatch.setitem(__import__("sys").modules, "google.colab", object())  # Colab: every output its own frame
    assert len(expert_weight_view(olmoe, PROMPT, 1, 0)._repr_html_()) > 1_000_000


def test_routing_view_errors(olmoe, qwen):
    _, cache = olmoe.run_with_cache(PROMPT, names_filter=lambda name: name.endswith("resid_post"))
    with pytest.raises(ValueError, match="holds no routing"):
        routing_view(cache, olmoe.to_str_tokens(PROMPT))
    _, cache = olmoe.run_with_cache(PROMPT)
    with pytest.raises(ValueError, match="string tokens given but the cache has"):
        routing_view(cache, ["a", "b"])
    with pytest.raises(TypeError, match="string tokens"):
        routing_view(cache, PROMPT)
    with pytest.raises(ValueError, match="not a MoE layer"):
        expert_weight_view(qwen, PROMPT, layer=1, expert=0)
    with pytest.raises(ValueError, match="out of range"):
        expert_weight_view(olmoe, PROMPT, layer=0, expert=olmoe.cfg.n_experts)


def test_offline_view_never_asks_for_the_network(olmoe, monkeypatch):
    import circuitsvis.utils.render as render

    def no_network():
        raise AssertionError("the offline view must not probe the network")

    monkeypatch.setattr(render, "internet_on", no_network)
    monkeypatch.setattr(CircuitsView, "bundle_shown", False)
    view = routing_view(olmoe, PROMPT)
    shown = view._repr_html_()
    assert shown.replace("\nwindow.CircuitsVis = CircuitsVis;\n", "") == view.rendered.local_src
    assert "unpkg.com" not in shown and "CircuitsVis.render(" in shown
    assert "unpkg.com" not in view.to_html()
    monkeypatch.setattr(render, "internet_on", lambda: True)
    online = routing_view(olmoe, PROMPT, offline=False)._repr_html_()
    assert "https://unpkg.com/circuitsvis@" in online  # circuitsvis's own behaviour when online


RENDERED = """(() => {
  const root = document.querySelector('[id^="circuits-vis-"]');
  return root && root.innerText.length > 0 ? {text: root.innerText, selects: root.querySelectorAll("select").length,
    spans: root.querySelectorAll("span").length, images: document.images.length} : null;
})()"""


@needs_chromium
def test_offline_routing_view_renders_in_chromium_without_network(olmoe, tmp_path):
    _, cache = olmoe.run_with_cache(PROMPT)
    str_tokens = olmoe.to_str_tokens(PROMPT)
    hostile = ["</script>", '<img src="http://example.invalid/x.png">', "a&b"]
    str_tokens[1 : 1 + len(hostile)] = hostile
    path = routing_view(cache, str_tokens).save(tmp_path / "routing.html")
    page = open_page(path, ready=RENDERED)
    assert page.console_errors == []
    assert page.network_requests == []
    assert page.requests == [path.resolve().as_uri()]
    assert not is_blank(page.screenshot)
    assert page.value["selects"] == 2  # the layer and expert pickers
    assert page.value["images"] == 0
    for token in hostile:  # shown as text, not parsed as HTML (circuitsvis shows spaces as &nbsp;)
        assert token in page.value["text"].replace("\xa0", " ")


@needs_chromium
def test_offline_top1_view_renders_in_chromium(olmoe, tmp_path):
    path = top1_expert_view(olmoe, PROMPT).save(tmp_path / "top1.html")
    page = open_page(path, ready="document.querySelector('.moe-cat') && document.querySelector('.moe-cat').innerText")
    assert page.console_errors == [] and page.network_requests == []
    assert not is_blank(page.screenshot)
    for layer in olmoe.cfg.moe_layers:
        assert f"layer {layer}" in page.value


@needs_chromium
def test_views_sharing_one_bundle_render_in_chromium(olmoe, tmp_path, monkeypatch):
    """Two notebook outputs (each in its own output element) in one page: the second view
    renders with the first one's bundle."""
    monkeypatch.setattr(CircuitsView, "bundle_shown", False)
    outputs = [routing_view(olmoe, PROMPT)._repr_html_(), expert_weight_view(olmoe, PROMPT, 1, 0)._repr_html_()]
    path = tmp_path / "notebook.html"
    cells = "".join(f'<div class="output">{output}</div>' for output in outputs)
    path.write_text(f"<!DOCTYPE html><html><body>{cells}</body></html>", encoding="utf-8")
    ready = """(() => { const roots = document.querySelectorAll('[id^="circuits-vis-"]');
      return roots.length == 2 && [...roots].every(r => r.innerText.length > 0) ? roots.length : null; })()"""
    page = open_page(path, ready=ready)
    assert page.console_errors == [] and page.network_requests == []
    assert page.value == 2


# --------------------------------------------------------------------------- expert-lens grid
class CellParser(HTMLParser):
    """Collects the table: header texts and, per body row, the text of each cell."""

    def __init__(self):
        super().__init__()
        self.rows, self.cell, self.styles, self.titles, self.in_cell = [], None, [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.cell, self.in_cell = [], True
            attrs = dict(attrs)
            self.styles.append(attrs.get("style"))
            self.titles.append(attrs.get("title"))
        if tag == "script":
            raise AssertionError("the grid must hold no script")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self.cell))
            self.in_cell = False
        if tag == "span" and self.in_cell:
            self.cell.append("|")

    def handle_data(self, data):
        if self.in_cell:
            self.cell.append(data)


def lens_rows(layer, variant, k, tokens, probs, expert=None, weight=None):
    return [dict(layer=layer, variant=variant, k=k, expert=expert, weight=weight, rank=r, token_id=r,
                 token=t, prob=p) for r, (t, p) in enumerate(zip(tokens, probs))]


def known_lens_table() -> pd.DataFrame:
    rows = []
    for layer in (3, 1):  # out of order on purpose
        rows += lens_rows(layer, "resid_post", 2, [f"post{layer}", "x"], [0.9, 0.1])
        rows += lens_rows(layer, "expert", 2, ["e2tok", "y"], [0.3, 0.2], expert=7, weight=0.25)
        rows += lens_rows(layer, "expert", 1, ["<script>", "z"], [0.6, 0.1], expert=4, weight=0.75)
        rows += lens_rows(layer, "top2", 2, ["a\nb", "q"], [0.5, 0.4])
        rows += lens_rows(layer, "top1", 1, ['"quote"', "&"], [0.2, 0.1])
        rows += lens_rows(layer, "resid_mid", 0, ["mid", "m"], [0.05, 0.01])
    return pd.DataFrame(rows).astype({"expert": "Int64", "weight": "float64"})


def test_expert_lens_grid_layout_and_escaping(tmp_path):
    grid = ExpertLensGrid(known_lens_table(), title="a <title>")
    assert grid.layers == [1, 3]
    assert grid.columns == ["resid_mid", "top1", "top2", "resid_post", "expert 1", "expert 2"]
    parser = CellParser()
    parser.feed(grid.to_html())
    header, *body = parser.rows
    assert header[1:] == ["resid_mid (u)", "Hl,1", "Hl,2", "layer output", "expert #1 alone", "expert #2 alone"]
    for layer, row in zip([1, 3], body):
        assert row[0] == f"layer {layer}"
        tokens = [cell.split("|")[0] for cell in row[1:]]
        assert tokens == ["mid", '"quote"', "a\\nb", f"post{layer}", "<script>", "e2tok"]
        assert row[5].split("|")[1] == "E4 w=0.75 · p=0.60"
        assert row[6].split("|")[1] == "E7 w=0.25 · p=0.30"
        assert row[1].split("|")[1] == "p=0.05"
    assert "<script>" not in grid.to_html() and "&lt;script&gt;" in grid.to_html()
    # background darkens with probability: compare the lightness of p=0.9 and p=0.05 cells
    cell_styles = [s for s in parser.styles if s]
    lightness = [float(re.search(r"(\d+)%\)", s).group(1)) for s in cell_styles]
    assert lightness[3] < lightness[0]  # resid_post (0.9) darker than resid_mid (0.05)
    tooltips = [t for t in parser.titles if t]
    assert tooltips[4] == "<script>  0.600\nz  0.100"
    saved = grid.save(tmp_path / "grid.html").read_text()
    assert saved.startswith("<!DOCTYPE html>") and grid.to_html() in saved


def test_expert_lens_grid_from_the_lens(qwen):
    _, cache = qwen.run_with_cache(PROMPT)
    table = expert_lens(qwen, cache, include_shared=True)
    grid = ExpertLensGrid(table)
    k = qwen.cfg.top_k
    assert grid.layers == list(qwen.cfg.moe_layers)
    assert grid.columns == ["resid_mid", *[f"top{j}" for j in range(1, k + 1)], "shared", "resid_post",
                            *[f"expert {j}" for j in range(1, k + 1)]]
    top = table[table["rank"] == 0]
    for row in top.itertuples():
        column = f"expert {row.k}" if row.variant == "expert" else row.variant
        cell = grid.cell(row.layer, column)
        assert (cell.token, cell.prob) == (row.token, pytest.approx(row.prob))
        if row.variant == "expert":
            assert (cell.expert, cell.weight) == (row.expert, pytest.approx(row.weight))


def test_expert_lens_grid_bad_input():
    with pytest.raises(ValueError, match="missing"):
        ExpertLensGrid(pd.DataFrame({"layer": [0]}))
    table = known_lens_table()
    table.loc[0, "variant"] = "mystery"
    with pytest.raises(ValueError, match="unknown expert_lens variants"):
        ExpertLensGrid(table)


@needs_chromium
def test_expert_lens_grid_renders_in_chromium(tmp_path):
    path = ExpertLensGrid(known_lens_table()).save(tmp_path / "grid.html")
    page = open_page(path, ready="document.querySelectorAll('td').length")
    assert page.console_errors == [] and page.network_requests == []
    assert page.value == 2 * 6
    assert not is_blank(page.screenshot)


# --------------------------------------------------------------------------- figures
COUNTS = np.array([  # [domain, layer, expert], top_k = 2, 10 tokens per (domain, layer)
    [[10, 5, 3, 2], [4, 4, 6, 6]],
    [[1, 9, 9, 1], [5, 5, 5, 5]],
])


def known_spec() -> pd.DataFrame:
    return specialization(RoutingCounts(COUNTS, domains=["code", "math"], layers=[2, 5], top_k=2))


def dashed_lines(ax):
    return [line for line in ax.lines if line.get_linestyle() == "--"]


def test_specialization_figure_bars_and_baseline():
    fig = specialization_figure(known_spec())
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    for l_idx, ax in enumerate(axes):
        assert ax.get_title() == f"layer {[2, 5][l_idx]}"
        for d_idx, bars in enumerate(ax.containers):
            assert bars.get_label() == ["code", "math"][d_idx]
            heights = [bar.get_height() for bar in bars]
            np.testing.assert_allclose(heights, COUNTS[d_idx, l_idx] / 10)
            centres = [bar.get_x() + bar.get_width() / 2 for bar in bars]
            np.testing.assert_allclose(centres, np.arange(4) + (d_idx - 0.5) * 0.4)
        (baseline,) = dashed_lines(ax)
        np.testing.assert_allclose(baseline.get_ydata(), [2 / 4, 2 / 4])
    one = specialization_figure(known_spec(), layers=[5], domains=["math"])
    (ax,) = [ax for ax in one.axes if ax.get_visible()]
    (bars,) = ax.containers
    np.testing.assert_allclose([b.get_height() for b in bars], COUNTS[1, 1] / 10)
    with pytest.raises(ValueError, match="no layer 9"):
        specialization_figure(known_spec(), layers=[9])


def assert_lines(ax, expected: dict[str, tuple[list, list]]):
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}  # not reference lines
    assert list(lines) == list(expected)
    for label, (x, y) in expected.items():
        np.testing.assert_allclose(lines[label].get_xdata(), x)
        np.testing.assert_allclose(lines[label].get_ydata(), y)


def test_line_figures_plot_the_table():
    cosine = pd.DataFrame({
        "domain": ["en"] * 4 + ["fr"] * 4,
        "layer": [0, 0, 2, 2] * 2,
        "variant": ["all_tokens", "last_token"] * 4,
        "cosine": [0.9, 0.8, 0.7, 0.6, 0.95, 0.85, 0.75, 0.65],
        "n_tokens": 1,
    })
    fig = cosine_figure(cosine.sort_values("layer", ascending=False, kind="stable"))  # x in any order
    all_tokens, last_token = fig.axes[:2]
    assert_lines(all_tokens, {"en": ([0, 2], [0.9, 0.7]), "fr": ([0, 2], [0.95, 0.75])})
    assert_lines(last_token, {"en": ([0, 2], [0.8, 0.6]), "fr": ([0, 2], [0.85, 0.65])})

    ppl = pd.DataFrame({"domain": ["en", "en", "en"], "k": [3, 1, 2], "mean_log_ppl": [1.0, 3.0, 2.0],
                        "ppl": np.exp([1.0, 3.0, 2.0]), "delta_log_ppl": [0.0, 2.0, 1.0], "ci_low": [0.0, 1.5, 0.8],
                        "ci_high": [0.0, 2.5, 1.2], "ppl_ratio": np.exp([0.0, 2.0, 1.0]),
                        "normalized_log_ppl": [0.0, 1.0, 0.5], "n_tokens": 5})
    default = perplexity_figure(ppl).axes[0]
    assert_lines(default, {"en": ([1, 2, 3], [2.0, 1.0, 0.0])})
    assert default.get_ylabel().startswith("change in log-perplexity")
    band = default.collections[0].get_paths()[0].vertices
    np.testing.assert_allclose([band[:, 1].min(), band[:, 1].max()], [0.0, 2.5])
    normalized = perplexity_figure(ppl, value="normalized_log_ppl").axes[0]
    assert_lines(normalized, {"en": ([1, 2, 3], [1.0, 0.5, 0.0])})
    assert "min-max normalised" in normalized.get_ylabel() and not normalized.collections
    assert_lines(perplexity_figure(ppl, value="ppl").axes[0], {"en": ([1, 2, 3], np.exp([3.0, 2.0, 1.0]))})

    pruning = pd.DataFrame({"domain": ["en", "en", "fr", "fr"], "fraction": [0.0, 0.5, 0.0, 0.5],
                            "n_pruned_per_layer": [0, 2, 0, 2], "mean_log_ppl": [1, 2, 1.5, 2.5],
                            "ppl": [2.7, 7.4, 4.5, 12.2]})
    assert_lines(pruning_figure(pruning).axes[0], {"en": ([0, 0.5], [2.7, 7.4]), "fr": ([0, 0.5], [4.5, 12.2])})
    with pytest.raises(ValueError, match="columns \\['cosine'\\] are missing"):
        cosine_figure(cosine.drop(columns="cosine"))


def test_cosine_figure_shows_the_baselines_with_intervals():
    variants = ["all_tokens", "last_token", "u_only", "update"]
    cosine = pd.DataFrame({"domain": "en", "layer": np.repeat([1, 2], 4), "variant": variants * 2,
                           "cosine": [0.99, 0.98, 0.95, 0.7, 0.97, 0.96, 0.9, 0.6], "n_tokens": 10})
    cosine["ci_low"], cosine["ci_high"] = cosine["cosine"] - 0.01, cosine["cosine"] + 0.02
    fig = cosine_figure(cosine)
    assert [ax.get_title() for ax in fig.axes] == [
        "cos(H^1, H^k), all tokens", "cos(H^1, H^k), last token (paper)",
        "baseline cos(u, H^k): residual alone", "cos(H^1 - u, H^k - u): the updates"]
    assert_lines(fig.axes[2], {"en": ([1, 2], [0.95, 0.9])})
    assert_lines(fig.axes[3], {"en": ([1, 2], [0.7, 0.6])})
    band = fig.axes[3].collections[0].get_paths()[0].vertices  # the shaded interval spans low..high
    np.testing.assert_allclose([band[:, 1].min(), band[:, 1].max()], [0.59, 0.72])


def test_coactivation_figure_shows_the_matrix():
    matrix = np.array([[1.0, 0.2, 0.0], [0.2, 1.0, 0.5], [0.0, 0.5, 1.0]])
    fig = coactivation_figure(matrix, title="layer 3")
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), matrix)
    assert ax.get_title() == "layer 3"
    with pytest.raises(ValueError, match="square"):
        coactivation_figure(np.zeros((2, 3)))


def test_figures_render_to_png_with_the_agg_backend():
    png = to_png(specialization_figure(known_spec()))
    assert png.startswith(b"\x89PNG")
    import matplotlib.image
    import io

    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert not is_blank(image)
    assert matplotlib.colors.to_hex(image[0, 0, :3]) == "#ffffff"
