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

import numpy as np
import pandas as pd
import torch

from moe_hooked.analysis.counts import RoutingCounts
from moe_hooked.analysis.routing import routing_stats
from moe_hooked.corpus import all_reduce_sums, corpus_batches, shared_failures
from moe_hooked.interventions import FwdHooks, ablate_experts, keep_top_k

__all__ = ["perplexity_vs_top_k", "pruning_curve"]

MAX_LENGTH = 512
"""Default chunk length, capped by the model's context."""


def _nll_sums(
    model,
    corpora: Mapping[str, Sequence[str]],
    variants: Sequence[FwdHooks],
    max_length: int,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token NLL [domain variant] of each domain under each list of hooks, and the
    number of predicted (real target) tokens [domain]."""
    sums = np.zeros((len(corpora), len(variants)))
    n_tokens = np.zeros(len(corpora), dtype=np.int64)
    batches = corpus_batches(model, corpora, max_length, batch_size, max_tokens, progress, what)
    with torch.inference_mode():
        for d, batch in batches:
            for v, hooks in enumerate(variants):
                nll = model.run_with_hooks(
                    batch.tokens,
                    attention_mask=batch.attention_mask,
                    return_type="loss",
                    loss_per_token=True,
                    fwd_hooks=hooks,
                )  # [batch pos-1], zero at padded targets
                sums[d, v] += nll.double().sum().item()
            n_tokens[d] += int(batch.attention_mask[:, 1:].sum())
    sums, n_tokens = (x.numpy() for x in all_reduce_sums([torch.from_numpy(sums), torch.from_numpy(n_tokens)], what))
    empty = [domain for domain, n in zip(corpora, n_tokens) if n == 0]
    if empty:
        raise ValueError(f"domains {empty} have no token to predict: every chunk is a single token")
    return sums, n_tokens


def _max_length(model, max_length: int | None) -> int:
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
    model,
    corpora: Mapping[str, Sequence[str]],
    ks: Sequence[int] | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Log-perplexity of each domain when every MoE layer uses only its top k' experts.

    For each k' in `ks` (default 1..top_k) the model runs with `keep_top_k(model, k')`: the k'
    highest-weighted experts keep the weights the model computed (no renormalisation), as in
    the paper. Texts are cut into chunks of at most `max_length` tokens (default
    min(n_ctx, 512)); `max_tokens` caps the tokens read per domain.

    Returns columns `domain, k, mean_log_ppl, ppl, normalized_log_ppl, n_tokens`:
    `mean_log_ppl` is the mean next-token NLL (nats) over the `n_tokens` predicted tokens,
    `ppl` = exp(mean_log_ppl), and `normalized_log_ppl` min-max normalises mean_log_ppl over
    the k' of each domain to [0, 1] (0 when all k' give the same value).
    """
    ks = list(range(1, model.cfg.top_k + 1)) if ks is None else list(ks)
    variants = [keep_top_k(model, k) for k in ks]
    max_length = _max_length(model, max_length)
    sums, n_tokens = _nll_sums(
        model, corpora, variants, max_length, batch_size, max_tokens, progress, "perplexity_vs_top_k"
    )
    frame = _frame(corpora, "k", ks, sums, n_tokens)
    by_domain = frame.groupby("domain", sort=False)["mean_log_ppl"]
    low, high = by_domain.transform("min"), by_domain.transform("max")
    frame["normalized_log_ppl"] = ((frame["mean_log_ppl"] - low) / (high - low)).where(high > low, 0.0)
    return frame[["domain", "k", "mean_log_ppl", "ppl", "normalized_log_ppl", "n_tokens"]]


@shared_failures("pruning_curve")
def pruning_curve(
    model,
    corpora: Mapping[str, Sequence[str]],
    fractions: Sequence[float] = (0, 0.25, 0.5, 0.75),
    usage=None,
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
    sums, n_tokens = _nll_sums(model, corpora, variants, max_length, batch_size, max_tokens, progress, "pruning_curve")
    frame = _frame(corpora, "fraction", list(fractions), sums, n_tokens)
    frame["n_pruned_per_layer"] = np.tile(n_pruned, len(corpora))
    return frame[["domain", "fraction", "n_pruned_per_layer", "mean_log_ppl", "ppl"]]


def _n_pruned(cfg, fraction: float) -> int:
    if not 0 <= fraction <= 1:
        raise ValueError(f"pruning fractions must lie in [0, 1], got {fraction}")
    n = math.floor(fraction * cfg.n_experts + 1e-9)
    if n > cfg.n_experts - cfg.top_k:
        raise ValueError(
            f"fraction {fraction} would prune {n} of the {cfg.n_experts} experts per layer, leaving fewer than "
            f"top_k={cfg.top_k}: use fractions up to {(cfg.n_experts - cfg.top_k) / cfg.n_experts:g}"
        )
    return n


def _least_used(cfg, usage: np.ndarray, n: int) -> dict[int, list[int]]:
    """The n least-used experts of every MoE layer (stable: lower ids first among ties)."""
    return {layer: np.argsort(usage[i], kind="stable")[:n].tolist() for i, layer in enumerate(cfg.moe_layers)}


def _usage_matrix(cfg, usage) -> np.ndarray:
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
