"""Multiple-comparison corrections of p-values (Holm, Bonferroni, Benjamini-Hochberg)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["Correction", "adjust_pvalues"]

Correction = Literal["holm", "bonferroni", "fdr_bh", "none"]


def _via_sorted(p: np.ndarray, adjust) -> np.ndarray:
    """Apply ``adjust(sorted_p [.., m], m)`` to ``p`` sorted ascending along the
    last axis, clip to 1 and return the result in the original order."""
    order = np.argsort(p, axis=-1, kind="stable")
    adjusted = np.minimum(adjust(np.take_along_axis(p, order, -1), p.shape[-1]), 1.0)
    out = np.empty_like(adjusted)
    np.put_along_axis(out, order, adjusted, -1)
    return out


def _holm(ps: np.ndarray, m: int) -> np.ndarray:
    # step-down: max over j <= i of (m - j + 1) p_(j)
    return np.maximum.accumulate(ps * (m - np.arange(m)), axis=-1)


def _fdr_bh(ps: np.ndarray, m: int) -> np.ndarray:
    # step-up: min over j >= i of m p_(j) / j
    scaled = ps * m / np.arange(1, m + 1)
    return np.minimum.accumulate(scaled[..., ::-1], axis=-1)[..., ::-1]


_CORRECTIONS = {
    "none": lambda p: p.copy(),
    "bonferroni": lambda p: np.minimum(p * p.shape[-1], 1.0),
    "holm": lambda p: _via_sorted(p, _holm),
    "fdr_bh": lambda p: _via_sorted(p, _fdr_bh),
}


def adjust_pvalues(p_values: ArrayLike, method: Correction = "holm") -> np.ndarray:
    """Multiple-comparison adjusted p-values; each slice along the last axis is one family.

    Args:
        p_values: ``[..., m]`` p-values in [0, 1].
        method: "holm" (Holm-Bonferroni step-down, controls the family-wise error
            rate), "bonferroni" (``m * p``), "fdr_bh" (Benjamini-Hochberg step-up,
            controls the false discovery rate) or "none".

    Returns:
        ``[..., m]`` adjusted p-values (clipped to 1); reject where ``<= alpha``.
    """
    if method not in _CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; choose from {sorted(_CORRECTIONS)}")
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim == 0 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p_values must be a non-empty array of numbers in [0, 1]")
    return _CORRECTIONS[method](p)
