"""The expert-lens grid of the MoE Lens paper's Figure 2, as a self-contained HTML table.

One row per MoE layer; one column per decoded residual vector of :func:`moe_hooked.lens.expert_lens`:
`resid_mid` (u), the partial sums `H^{l,1}..H^{l,k}`, the shared expert (if decoded), the
layer output `resid_post`, then each selected expert alone (`u + w_j E_j`, highest weight
first). A cell shows the top-1 decoded token; its background darkens with that token's
probability; expert cells also show the expert id and routing weight. Hovering a cell lists
all decoded tokens of the table (`top` of them) with their probabilities.

Plain HTML and inline CSS: no script, no external request, tokens HTML-escaped.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REQUIRED_COLUMNS = ("layer", "variant", "k", "expert", "weight", "rank", "token", "prob")
_TOPK_VARIANT = re.compile(r"top(\d+)")

STYLE = """
.moe-lens-grid { border-collapse: collapse; font-family: system-ui, sans-serif; font-size: 13px; }
.moe-lens-grid th, .moe-lens-grid td { border: 1px solid #ccc; padding: 3px 6px; text-align: center; }
.moe-lens-grid th { background: #f4f4f4; font-weight: 600; }
.moe-lens-grid td .tok { font-family: ui-monospace, monospace; white-space: pre; }
.moe-lens-grid td .meta { display: block; font-size: 10px; opacity: 0.8; }
.moe-lens-grid caption { caption-side: top; text-align: left; padding: 4px 0; font-weight: 600; }
"""


@dataclass(frozen=True)
class LensCell:
    """One decoded vector: its top-1 token and probability, and the `(token, prob)` list by rank."""

    token: str
    prob: float
    alternatives: tuple[tuple[str, float], ...]
    expert: int | None = None
    weight: float | None = None


def _column_label(column: str) -> str:
    if column == "resid_mid":
        return "resid_mid (u)"
    if match := _TOPK_VARIANT.fullmatch(column):
        return f"H<sup>l,{match.group(1)}</sup>"
    if column.startswith("expert "):
        return f"expert #{column.split()[1]} alone"
    return {"shared": "u + shared expert", "resid_post": "layer output"}[column]


def _shown(token) -> str:
    """A token made visible: None as "?", newlines and tabs as escapes, then HTML-escaped."""
    text = "?" if token is None or pd.isna(token) else str(token)
    return html.escape(text.replace("\n", "\\n").replace("\t", "\\t"))


def _background(prob: float) -> tuple[str, str]:
    """(background, text colour): white at probability 0 to dark blue at 1."""
    lightness = 97 - 62 * min(max(prob, 0.0), 1.0)
    return f"hsl(215, 70%, {lightness:.0f}%)", "#fff" if lightness < 60 else "#111"


class ExpertLensGrid:
    """Figure 2 of the MoE Lens paper from an `expert_lens` DataFrame (one prompt position).

    `layers` and `columns` give the grid's order; `cell(layer, column)` its content, or None
    where that layer has no such vector. Display it in a notebook, or `save(path)` a page.
    """

    def __init__(self, frame: pd.DataFrame, title: str | None = None):
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"not an expert_lens table: columns {missing} are missing")
        if frame.empty:
            raise ValueError("the expert_lens table is empty")
        self.title = title
        self._cells = self._build(frame)
        self.layers = sorted({layer for layer, _ in self._cells})
        self.columns = self._order({column for _, column in self._cells})

    @staticmethod
    def _column_of(row) -> str:
        return f"expert {row.k}" if row.variant == "expert" else row.variant

    def _build(self, frame: pd.DataFrame) -> dict[tuple[int, str], LensCell]:
        frame = frame.assign(column=[self._column_of(row) for row in frame.itertuples()])
        cells = {}
        for (layer, column), rows in frame.groupby(["layer", "column"], sort=False):
            rows = rows.sort_values("rank")
            first = rows.iloc[0]
            cells[int(layer), column] = LensCell(
                token=first.token,
                prob=float(first.prob),
                alternatives=tuple(zip(rows.token, rows.prob.astype(float))),
                expert=None if pd.isna(first.expert) else int(first.expert),
                weight=None if pd.isna(first.weight) else float(first.weight),
            )
        return cells

    @staticmethod
    def _order(columns: set[str]) -> list[str]:
        """resid_mid, top1..topk, shared, resid_post, expert 1..k; unknown variants are an error."""
        topk = sorted((c for c in columns if _TOPK_VARIANT.fullmatch(c)), key=lambda c: int(c[3:]))
        experts = sorted((c for c in columns if c.startswith("expert ")), key=lambda c: int(c.split()[1]))
        order = [c for c in ("resid_mid",) if c in columns] + topk
        order += [c for c in ("shared", "resid_post") if c in columns] + experts
        unknown = columns - set(order)
        if unknown:
            raise ValueError(f"unknown expert_lens variants {sorted(unknown)}")
        return order

    def cell(self, layer: int, column: str) -> LensCell | None:
        return self._cells.get((layer, column))

    def _cell_html(self, cell: LensCell | None) -> str:
        if cell is None:
            return "<td></td>"
        background, colour = _background(cell.prob)
        tooltip = "\n".join(f"{_shown(t)}  {p:.3f}" for t, p in cell.alternatives)
        meta = f"p={cell.prob:.2f}"
        if cell.expert is not None:
            meta = f"E{cell.expert} w={cell.weight:.2f} · {meta}"
        return (
            f'<td style="background:{background};color:{colour}" title="{tooltip}">'
            f'<span class="tok">{_shown(cell.token)}</span><span class="meta">{meta}</span></td>'
        )

    def to_html(self) -> str:
        """The table with its <style>, to embed in a page or a notebook."""
        header = "".join(f"<th>{_column_label(c)}</th>" for c in self.columns)
        rows = [
            f"<tr><th>layer {layer}</th>" + "".join(self._cell_html(self.cell(layer, c)) for c in self.columns) + "</tr>"
            for layer in self.layers
        ]
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return (
            f'<div class="moe-lens-grid-wrap"><style>{STYLE}</style><table class="moe-lens-grid">{caption}'
            f"<thead><tr><th></th>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def page(self) -> str:
        """A standalone HTML page holding the grid (what `save` writes)."""
        title = html.escape(self.title or "expert lens")
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>\n'
            f"<body>\n{self.to_html()}\n</body></html>\n"
        )

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page holding the grid."""
        path = Path(path)
        path.write_text(self.page(), encoding="utf-8")
        return path
