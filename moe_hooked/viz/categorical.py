"""Tokens coloured by a category per row (e.g. each token's top-1 expert per MoE layer), with
a categorical palette and a legend: plain HTML and inline CSS, no script, tokens escaped."""

from __future__ import annotations

import colorsys
import html
import torch
from jaxtyping import Int

from moe_hooked.viz.html_page import HtmlPage

TAB20 = (
    "#1f77b4 #aec7e8 #ff7f0e #ffbb78 #2ca02c #98df8a #d62728 #ff9896 #9467bd #c5b0d5 "
    "#8c564b #c49c94 #e377c2 #f7b6d2 #7f7f7f #c7c7c7 #bcbd22 #dbdb8d #17becf #9edae5"
).split()

STYLE = """
.moe-cat { font-family: system-ui, sans-serif; font-size: 13px; }
.moe-cat .row { margin: 2px 0; white-space: nowrap; }
.moe-cat .label { display: inline-block; min-width: 5em; font-weight: 600; }
.moe-cat .tok { font-family: ui-monospace, monospace; white-space: pre; padding: 1px 2px; margin: 0 1px; border-radius: 3px; }
.moe-cat .legend { margin-top: 6px; }
.moe-cat .legend .tok { display: inline-block; margin: 1px 3px 1px 0; }
"""


def palette(n: int) -> list[str]:
    """`n` distinct colours: matplotlib's tab20 up to 20, else hues spread by the golden ratio."""
    if n <= len(TAB20):
        return TAB20[:n]
    colours = []
    for i in range(n):
        r, g, b = colorsys.hls_to_rgb((i * 0.618034) % 1, 0.45 + 0.25 * (i % 3) / 2, 0.75)
        colours.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return colours


def _text_colour(background: str) -> str:
    r, g, b = (int(background[i : i + 2], 16) for i in (1, 3, 5))
    return "#111" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#fff"


class CategoricalTokensView(HtmlPage):
    """`str_tokens` shown once per row, each token coloured by its category in that row.

    Args:
        str_tokens: the tokens (`pos` of them).
        categories: [pos row] category ids in 0..n_categories-1.
        row_labels: one label per row (e.g. "layer 3").
        n_categories: the number of possible categories (fixes the palette).
        category_name: legend text, e.g. "expert" -> "expert 5".
    """

    def __init__(
        self,
        str_tokens: list[str],
        categories: Int[torch.Tensor, "pos row"],
        row_labels: list[str],
        n_categories: int,
        category_name: str = "expert",
        title: str = "moe_hooked",
    ):
        if categories.shape != (len(str_tokens), len(row_labels)):
            raise ValueError(
                f"categories have shape {tuple(categories.shape)}, expected [pos row] = {(len(str_tokens), len(row_labels))}"
            )
        self.str_tokens, self.categories, self.row_labels = str_tokens, categories.long().cpu(), row_labels
        self.colours, self.category_name, self.title = palette(n_categories), category_name, title

    def colour(self, category: int) -> str:
        return self.colours[category]

    def _token(self, text: str, category: int) -> str:
        colour = self.colour(category)
        return (
            f'<span class="tok" data-category="{category}" title="{self.category_name} {category}" '
            f'style="background:{colour};color:{_text_colour(colour)}">{html.escape(text, quote=False)}</span>'
        )

    def _row(self, label: str, column: int) -> str:
        tokens = "".join(self._token(t, int(c)) for t, c in zip(self.str_tokens, self.categories[:, column]))
        return f'<div class="row"><span class="label">{html.escape(label)}</span>{tokens}</div>'

    def _legend(self) -> str:
        shown = sorted(set(self.categories.flatten().tolist()))
        items = "".join(self._token(f"{self.category_name} {c}", c) for c in shown)
        return f'<div class="legend">{items}</div>'

    def page_body(self) -> str:
        """The view as an HTML fragment (what a notebook displays)."""
        rows = "".join(self._row(label, i) for i, label in enumerate(self.row_labels))
        return f'<div class="moe-cat"><style>{STYLE}</style>{rows}{self._legend()}</div>'

    def _repr_html_(self) -> str:
        return self.page_body()
