"""Perplexity under routing interventions: fewer experts per token, pruned experts.

- :func:`perplexity_vs_top_k` -- the paper's top-1..top-k experiment: every MoE layer keeps
  only its k' highest-weighted experts (`keep_top_k`, no renormalisation).
- :func:`pruning_curve` -- each layer's least-used experts are removed from the router
  (`ablate_experts(mode="reroute")`), for growing fractions of the experts.

Both stream every domain's texts once, in padded batches, running all the variants on each
batch; the loss is the mean next-token negative log-likelihood (natural log) over the real
(unpadded) target tokens, i.e. the log-perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from moe_hooked.analysis.bootstrap import CONFIDENCE, N_BOOTSTRAP, bootstrap_ratio
from moe_hooked.analysis.counts import RoutingCounts
from moe_hooked.analysis.routing import routing_stats
from moe_hooked.corpus import corpus_batches, gather_by_batch, shared_failures
from moe_hooked.interventions import FwdHooks, ablate_experts, keep_top_k

if TYPE_CHECKING:
    from moe_hooked.config import MoEConfig
    from moe_hooked.model import HookedMoETransformer

__all__ = ["perplexity_vs_top_k", "pruning_curve"]

MAX_LENGTH = 512
"""Default chunk length, capped by the model's context."""


@dataclass
class _NLL:
    """Per domain: summed next-token NLL per sequence (chunk) and variant [n_seq variant], and
    the predicted (real target) tokens per sequence [n_seq]."""

    per_sequence: list[np.ndarray]
    tokens: list[np.ndarray]

    @property
    def sums(self) -> np.ndarray:
        """[domain variant] summed NLL."""
        return np.stack([x.sum(0) for x in self.per_sequence])

    @property
    def n_tokens(self) -> np.ndarray:
        """[domain] predicted tokens."""
        return np.array([n.sum() for n in self.tokens], dtype=np.int64)


def _nll_sums(
    model: HookedMoETransformer,
    corpora: Mapping[str, Sequence[str]],
    variants: Sequence[FwdHooks],
    max_length: int,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
    what: str,
) -> _NLL:
    """Next-token NLL of each domain's sequences under each list of hooks."""
    per_batch: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # batch index -> (domain, nll [b variant], tokens [b])
    batches = corpus_batches(model, corpora, max_length, batch_size, max_tokens, progress, what)
    with torch.inference_mode():
        for d, batch in batches:
            nll = [
                model.run_with_hooks(
                    batch.tokens,
                    attention_mask=batch.attention_mask,
                    return_type="loss",
                    loss_per_token=True,
                    fwd_hooks=hooks,
                ).double().sum(-1)  # [batch]: padded targets count zero
                for hooks in variants
            ]
            per_batch[batch.index] = (d, torch.stack(nll, -1).cpu().numpy(), batch.attention_mask[:, 1:].sum(-1).cpu().numpy())
    gathered = gather_by_batch(per_batch, what)  # every rank's batches, in single-process order
    per_sequence = [np.concatenate([x for dd, x, _ in gathered if dd == d]) for d in range(len(corpora))]
    tokens = [np.concatenate([n for dd, _, n in gathered if dd == d]) for d in range(len(corpora))]
    result = _NLL(per_sequence, tokens)
    empty = [domain for domain, n in zip(corpora, result.n_tokens) if n == 0]
    if empty:
        raise ValueError(f"domains {empty} have no token to predict: every chunk is a single token")
    return result


def _max_length(model: HookedMoETransformer, max_length: int | None) -> int:
    return min(model.cfg.n_ctx, MAX_LENGTH) if max_length is None else max_length


def _frame(corpora, column: str, values: Sequence, sums: np.ndarray, n_tokens: np.ndarray) -> pd.DataFrame:
    """One row per (domain, value) with the mean NLL and its exponential."""
    rows = [
        {"domain": domain, column: value, "mean_log_ppl": sums[d, v] / n_tokens[d], "n_tokens": int(n_tokens[d])}
        for d, domain in enumerate(corpora)
        for v, value in enumerate(values)
    ]
    frame = pd.DataFrame(rows)
    frame["ppl"] = np.exp(frame["mean_log_ppl"])
    return frame


@shared_failures("perplexity_vs_top_k")
def perplexity_vs_top_k(
    model: HookedMoETransformer,
    corpora: Mapping[str, Sequence[str]],
    ks: Sequence[int] | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
    renormalize: bool = False,
    average: Literal["token", "sample"] = "token",
    confidence: float = CONFIDENCE,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> pd.DataFrame:
    """Log-perplexity of each domain when every MoE layer uses only its top k' experts, and its
    change from the unmodified model with a bootstrap interval.

    For each k' in `ks` (default 1..top_k) the model runs with `keep_top_k(model, k',
    renormalize=renormalize)`: slots 0..k'-1 keep the weights the model computed (the paper; with
    `renormalize` they are scaled to the original total weight). Texts are cut into chunks of at
    most `max_length` tokens (default min(n_ctx, 512); the paper used 2048); `max_tokens` caps
    the tokens read per domain.

    `average`: "token" (micro: the mean NLL over all predicted tokens of the domain) or
    "sample" (macro, as the paper's code: the mean over chunks of each chunk's mean NLL, so
    that every chunk weighs the same).

    Returns columns `domain, k, mean_log_ppl, ppl, delta_log_ppl, ci_low, ci_high, ppl_ratio,
    normalized_log_ppl, n_tokens`: `mean_log_ppl` (nats) as `average` says over the `n_tokens`
    predicted tokens, `ppl` = exp(mean_log_ppl); `delta_log_ppl` = mean_log_ppl - that of the
    unmodified model (top_k experts), with its percentile bootstrap interval over chunks
    (`ci_low`, `ci_high`, see `moe_hooked.analysis.bootstrap`) and `ppl_ratio` =
    exp(delta_log_ppl); `normalized_log_ppl` is the paper's min-max normalisation of
    mean_log_ppl over the k' of each domain to [0, 1] (0 when all k' give the same value). It
    hides the size and the direction of the change: plot `delta_log_ppl` first.
    """
    if average not in ("token", "sample"):
        raise ValueError(f"average must be 'token' (per-token, micro) or 'sample' (per-chunk, macro), got {average!r}")
    ks = list(range(1, model.cfg.top_k + 1)) if ks is None else list(ks)
    variants = [keep_top_k(model, k, renormalize=renormalize) for k in ks]
    reference = ks.index(model.cfg.top_k) if model.cfg.top_k in ks else len(variants)
    variants += [] if reference < len(ks) else [[]]  # the unmodified model, when not among the k'
    nll = _nll_sums(model, corpora, variants, _max_length(model, max_length), batch_size, max_tokens, progress,
                    "perplexity_vs_top_k")
    frames = []
    for d, domain in enumerate(corpora):
        num, den = _averaged(nll.per_sequence[d], nll.tokens[d], average)
        mean = num.sum(0) / den.sum()  # [variant]
        low, high = bootstrap_ratio(num - num[:, reference, None], den, confidence, n_boot, seed)
        frames.append(pd.DataFrame({"domain": domain, "k": ks, "mean_log_ppl": mean[: len(ks)],
                                    "delta_log_ppl": (mean - mean[reference])[: len(ks)],
                                    "ci_low": low[: len(ks)], "ci_high": high[: len(ks)],
                                    "n_tokens": int(nll.tokens[d].sum())}))
    frame = pd.concat(frames, ignore_index=True)
    frame["ppl"] = np.exp(frame["mean_log_ppl"])
    frame["ppl_ratio"] = np.exp(frame["delta_log_ppl"])
    by_domain = frame.groupby("domain", sort=False)["mean_log_ppl"]
    low, high = by_domain.transform("min"), by_domain.transform("max")
    frame["normalized_log_ppl"] = ((frame["mean_log_ppl"] - low) / (high - low)).where(high > low, 0.0)
    return frame[["domain", "k", "mean_log_ppl", "ppl", "delta_log_ppl", "ci_low", "ci_high", "ppl_ratio",
                  "normalized_log_ppl", "n_tokens"]]


def _averaged(per_sequence: np.ndarray, tokens: np.ndarray, average: str) -> tuple[np.ndarray, np.ndarray]:
    """Numerators [n_seq variant] and denominators [n_seq] whose ratio of sums is the average:
    (NLL sums, tokens) per token; (per-chunk mean NLL, 1) per sample (chunks with a target)."""
    if average == "token":
        return per_sequence, tokens
    keep = tokens > 0
    return per_sequence[keep] / tokens[keep, None], np.ones(int(keep.sum()))


@shared_failures("pruning_curve")
def pruning_curve(
    model: HookedMoETransformer,
    corpora: Mapping[str, Sequence[str]],
    fractions: Sequence[float] = (0, 0.25, 0.5, 0.75),
    usage: RoutingCounts | np.ndarray | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Log-perplexity of each domain when each MoE layer loses its least-used experts.

    For a fraction f, every MoE layer prunes its n = floor(f * n_experts) least-used routed
    experts (ties: lower id first) by rerouting (`ablate_experts(mode="reroute")`: their router
    logits are -inf, tokens go to the next-best experts). At least top_k experts must remain:
    a fraction that prunes more than n_experts - top_k raises a ValueError.

    `usage`: routing counts per (MoE layer, expert), a `RoutingCounts` (summed over its
    domains; its layers must be the model's MoE layers) or an array [n_moe_layers n_experts];
    None counts the model's top-k selections on `corpora` first (`routing_stats`, one more pass).
    Other arguments as in `perplexity_vs_top_k`.

    Returns columns `domain, fraction, n_pruned_per_layer, mean_log_ppl, ppl`.
    """
    n_pruned = [_n_pruned(model.cfg, f) for f in fractions]
    max_length = _max_length(model, max_length)
    if usage is None:
        usage = routing_stats(model, corpora, max_length, batch_size, max_tokens, coactivation=False, progress=progress)
    usage = _usage_matrix(model.cfg, usage)
    variants = [ablate_experts(model, _least_used(model.cfg, usage, n), mode="reroute") for n in n_pruned]
    nll = _nll_sums(model, corpora, variants, max_length, batch_size, max_tokens, progress, "pruning_curve")
    frame = _frame(corpora, "fraction", list(fractions), nll.sums, nll.n_tokens)
    frame["n_pruned_per_layer"] = np.tile(n_pruned, len(corpora))
    return frame[["domain", "fraction", "n_pruned_per_layer", "mean_log_ppl", "ppl"]]


def _n_pruned(cfg: MoEConfig, fraction: float) -> int:
    if not 0 <= fraction <= 1:
        raise ValueError(f"pruning fractions must lie in [0, 1], got {fraction}")
    n = math.floor(fraction * cfg.n_experts + 1e-9)
    if n > cfg.n_experts - cfg.top_k:
        raise ValueError(
            f"fraction {fraction} would prune {n} of the {cfg.n_experts} experts per layer, leaving fewer than "
            f"top_k={cfg.top_k}: use fractions up to {(cfg.n_experts - cfg.top_k) / cfg.n_experts:g}"
        )
    return n


def _least_used(cfg: MoEConfig, usage: np.ndarray, n: int) -> dict[int, list[int]]:
    """The n least-used experts of every MoE layer (stable: lower ids first among ties)."""
    return {layer: np.argsort(usage[i], kind="stable")[:n].tolist() for i, layer in enumerate(cfg.moe_layers)}


def _usage_matrix(cfg: MoEConfig, usage: RoutingCounts | np.ndarray) -> np.ndarray:
    """Routing counts [n_moe_layers n_experts] from a RoutingCounts or an array."""
    if isinstance(usage, RoutingCounts):
        if list(usage.layers) != list(cfg.moe_layers):
            raise ValueError(
                f"the routing counts cover layers {list(usage.layers)}, but the model's MoE layers are "
                f"{list(cfg.moe_layers)}"
            )
        usage = np.asarray(usage.counts).sum(0)
    usage = np.asarray(usage)
    expected = (len(cfg.moe_layers), cfg.n_experts)
    if usage.shape != expected:
        raise ValueError(f"usage has shape {usage.shape}, expected [n_moe_layers n_experts] = {expected}")
    return usage
