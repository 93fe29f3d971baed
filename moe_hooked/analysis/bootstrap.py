"""Confidence intervals by resampling whole sequences (chunks).

Every corpus statistic here is a ratio of sums over tokens: a mean NLL change is
`sum of per-token changes / number of tokens`, a routed fraction is
`tokens routed to the expert / tokens`, a mean cosine is `sum of cosines / tokens`. Tokens of
one sequence are not independent draws (a topic, a language, a code block runs over many
neighbouring tokens), so intervals that treat tokens as independent are too narrow. The
sequence bootstrap resamples sequences with replacement, keeping each sequence's tokens
together, and recomputes the ratio of sums.

Assumptions, stated once for every interval built on it:

- Sequences are independent and identically distributed draws from the domain's text. The
  unit is the chunk that the corpus streaming yields (a text cut to at most `max_length`
  tokens); chunks of one long text are treated as independent, which is optimistic when a
  text is much longer than a chunk.
- The percentile interval is accurate when there are enough sequences (tens at least); with
  few sequences it is too narrow. With one sequence the interval is a point.
- The quantity is a smooth function of the sums (a ratio of means), so the bootstrap is
  consistent for it.
"""

from __future__ import annotations

import numpy as np
from scipy import special

__all__ = ["bootstrap_greater_test", "bootstrap_ratio", "resample_weights"]

N_BOOTSTRAP = 1000
CONFIDENCE = 0.95


def resample_weights(n: int, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """[n_boot n] how many times each of `n` sequences is drawn in each bootstrap resample
    (each row a multinomial draw of `n` with equal probabilities)."""
    if n < 1:
        raise ValueError("the bootstrap needs at least one sequence")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def bootstrap_ratio(
    numerators: np.ndarray,
    denominators: np.ndarray,
    confidence: float = CONFIDENCE,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of `sum(numerators) / sum(denominators)` over sequences.

    Args:
        numerators: [n_seq ...] per-sequence sums (e.g. summed NLL change of one expert's
            ablation; any trailing shape: one statistic per trailing index).
        denominators: [n_seq] or [n_seq ...] per-sequence counts (e.g. tokens), broadcast
            against `numerators`.
        confidence: coverage of the two-sided interval, in (0, 1).
        n_boot: bootstrap resamples; seed: their random seed (the result is reproducible).

    Returns:
        (low, high), each of the trailing shape of `numerators`. A resample whose
        denominator is 0 gives NaN and is left out of the quantiles.
    """
    return _percentiles(_bootstrap_ratios(numerators, denominators, n_boot, seed), confidence)


def _bootstrap_ratios(numerators, denominators, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot ...] the ratio of sums in each sequence-bootstrap resample (NaN where the
    resampled denominator is 0)."""
    num, den = _per_sequence(numerators, denominators)
    weights = resample_weights(num.shape[0], n_boot, seed)  # [B n]
    num_b = weights @ num.reshape(num.shape[0], -1)  # [B G]
    den_b = weights @ den.reshape(num.shape[0], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(den_b != 0, num_b / den_b, np.nan)
    return ratios.reshape(n_boot, *num.shape[1:])


def _per_sequence(numerators, denominators) -> tuple[np.ndarray, np.ndarray]:
    """float64 numerators [n_seq ...] and denominators broadcast to their shape."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if den.ndim == 1 and num.ndim > 1:
        den = den.reshape(-1, *[1] * (num.ndim - 1))
    if num.shape[0] != den.shape[0]:
        raise ValueError(f"numerators have {num.shape[0]} sequences but denominators {den.shape[0]}")
    return num, np.broadcast_to(den, num.shape)


def _percentiles(ratios: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The two-sided percentile interval at `confidence` over the first axis, ignoring NaN."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(ratios, [tail, 1 - tail], axis=0)
    return low, high

def bootstrap_greater_test(
    numerators: np.ndarray,
    denominators: np.ndarray,
    null_value: float,
    confidence: float = CONFIDENCE,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-sided sequence-level test of H1: `sum(num) / sum(den) > null_value`, and the interval.

    The p-value is `P(Z >= (ratio - null_value) / se)` for a standard normal Z, with `se` the
    standard deviation of the ratio over sequence-bootstrap resamples: a z-test whose standard
    error respects the dependence between tokens of one sequence (the mean over many
    independent sequences being approximately normal). A normal tail instead of the raw
    bootstrap tail gives p-values below 1 / n_boot, which a multiple-comparison correction
    over many experts needs. When `se` is 0 (e.g. an expert no sequence selects) the p-value
    is 0 if the ratio exceeds `null_value`, else 1.

    Returns (p_value, low, high), each of the trailing shape of `numerators`.
    """
    ratios = _bootstrap_ratios(numerators, denominators, n_boot, seed)  # [B ...]
    num, den = _per_sequence(numerators, denominators)
    ratio = num.sum(0) / den.sum(0)
    se = np.nanstd(ratios, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_value = np.where(se > 0, special.ndtr((null_value - ratio) / se), (ratio <= null_value).astype(float))
    low, high = _percentiles(ratios, confidence)
    return p_value, low, high
