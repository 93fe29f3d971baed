"""Causal importance of each routed expert, beside how often it is routed to.

Routing frequency is not importance: an expert picked for many tokens can matter little to
the loss, and a rarely picked one can matter a lot. :func:`expert_importance` measures, per
(domain, MoE layer, expert), the change of the next-token loss when the expert is removed,
with a sequence-level bootstrap interval (:mod:`moe_hooked.analysis.bootstrap`), next to the
fraction of tokens that route to it.

Accumulation: float64 sums per (domain, layer, expert) (:class:`ImportanceSums`), which add
across batches (and, summed over ranks, across processes), plus per-sequence values for the
bootstrap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from moe_hooked.analysis.bootstrap import CONFIDENCE, N_BOOTSTRAP, bootstrap_ratio
from moe_hooked.corpus import corpus_batches, gather_by_batch, shared_failures
from moe_hooked.data import TokenBatch
from moe_hooked.hook_names import get_act_name
from moe_hooked.interventions import ablate_experts

if TYPE_CHECKING:
    from moe_hooked.model import HookedMoETransformer

__all__ = ["ImportanceSums", "expert_importance", "frequency_importance_correlation"]

Method = Literal["ablation", "attribution"]
Mode = Literal["zero", "reroute"]
COLUMNS = ["domain", "layer", "expert", "routed_fraction", "delta_nll", "ci_low", "ci_high", "n_tokens"]


@dataclass
class ImportanceSums:
    """Running sums over `D` domains, the chosen `L` MoE layers and `E` experts.

    `delta_sum` [D L E]: summed change of the next-token NLL (nats) over predicted tokens;
    `routed` [D L E]: real tokens whose top-k holds the expert; `real_tokens` [D]: real tokens
    (BOS included); `predicted_tokens` [D]: tokens with a real target. All float64, so that
    one all-reduce (sum) merges ranks. `per_sequence[d]`: list of (delta [n_seq L E],
    predicted tokens [n_seq]) per batch, for the bootstrap.
    """

    delta_sum: np.ndarray
    routed: np.ndarray
    real_tokens: np.ndarray
    predicted_tokens: np.ndarray
    per_sequence: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)

    @classmethod
    def zeros(cls, n_domains: int, n_layers: int, n_experts: int) -> ImportanceSums:
        shape = (n_domains, n_layers, n_experts)
        return cls(np.zeros(shape), np.zeros(shape), np.zeros(n_domains), np.zeros(n_domains),
                   [[] for _ in range(n_domains)])

    def add(self, d: int, delta: np.ndarray, routed: np.ndarray, mask: torch.Tensor) -> None:
        """Add one batch of domain `d`: per-sequence `delta` and `routed` [batch L E], `mask` [batch pos]."""
        predicted = mask[:, 1:].sum(-1).double().cpu().numpy()
        self.delta_sum[d] += delta.sum(0)
        self.routed[d] += routed.sum(0)
        self.real_tokens[d] += float(mask.sum())
        self.predicted_tokens[d] += predicted.sum()
        self.per_sequence[d].append((delta, predicted))


def _selected(
    indices: Int[torch.Tensor, "batch pos k"], real: Bool[torch.Tensor, "batch pos"], n_experts: int
) -> Float[torch.Tensor, "batch n_experts"]:
    """Per sequence, how many real tokens have each expert in their top-k."""
    one_hot = F.one_hot(indices, n_experts).amax(dim=-2)  # [batch pos E]
    return (one_hot * real[..., None]).sum(1).double()


class _Routing:
    """Forward hooks that record each chosen layer's `hook_topk_indices` (and weights)."""

    def __init__(self, layers: Sequence[int]):
        self.indices: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.layers = list(layers)

    def hooks(self) -> list:
        def record(layer: int, x: torch.Tensor, hook) -> None:
            self.indices[layer] = x

        return [(get_act_name("topk_indices", layer), _bind(record, layer)) for layer in self.layers]

    def routed(self, real: torch.Tensor, experts: list[int], n_experts: int) -> np.ndarray:
        """[batch L E'] routed token counts per sequence, for the chosen experts."""
        per_layer = [_selected(self.indices[layer], real, n_experts)[:, experts] for layer in self.layers]
        return torch.stack(per_layer, 1).cpu().numpy()


def _bind(fn, layer: int):
    return lambda x, hook: fn(layer, x, hook)


def _nll(model: HookedMoETransformer, batch: TokenBatch, hooks: list) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """Per-token next-token NLL, zero at padded targets."""
    return model.run_with_hooks(
        batch.tokens, attention_mask=batch.attention_mask, return_type="loss", loss_per_token=True, fwd_hooks=hooks
    )


def _disjoint_groups(used: Bool[np.ndarray, "batch E"]) -> list[list[int]]:
    """Greedy groups of (column indices of) experts such that no sequence uses two experts of one
    group; experts used by no sequence are left out."""
    groups: list[list[int]] = []
    covered: list[np.ndarray] = []
    for j in np.flatnonzero(used.any(0)):
        for group, seqs in zip(groups, covered):
            if not (seqs & used[:, j]).any():
                group.append(int(j))
                seqs |= used[:, j]
                break
        else:
            groups.append([int(j)])
            covered.append(used[:, j].copy())
    return groups


@torch.inference_mode()
def _ablation_batch(model: HookedMoETransformer, batch: TokenBatch, layers: list[int], experts: list[int], mode: Mode):
    """Per-sequence NLL change [batch L E'] of ablating each (layer, expert) alone, and routed counts."""
    routing = _Routing(layers)
    base = _nll(model, batch, routing.hooks())
    real = batch.attention_mask.bool()
    routed = routing.routed(real, experts, model.cfg.n_experts)
    delta = np.zeros(routed.shape)
    for i, layer in enumerate(layers):
        if mode == "zero":
            # exact in groups: under "zero" an expert no token of a sequence selects leaves it untouched
            plan = [[(j, routed[:, i, j] > 0) for j in group] for group in _disjoint_groups(routed[:, i] > 0)]
        else:
            plan = [[(j, np.ones(routed.shape[0], dtype=bool))] for j in range(len(experts))]
        for group in plan:
            ablated = {layer: [experts[j] for j, _ in group]}
            change = (_nll(model, batch, ablate_experts(model, ablated, mode)) - base).double().sum(-1).cpu().numpy()
            for j, seqs in group:
                delta[seqs, i, j] = change[seqs]
    return delta, routed


def _attribution_batch(model: HookedMoETransformer, batch: TokenBatch, layers: list[int], experts: list[int]):
    """First-order per-sequence NLL change [batch L E'] of zeroing each (layer, expert), and routed counts."""
    routing = _Routing(layers)
    leaves: dict[int, torch.Tensor] = {}

    def perturb(layer: int, weights: torch.Tensor, hook) -> torch.Tensor:
        routing.weights[layer] = weights.detach()
        leaves[layer] = torch.zeros_like(weights, requires_grad=True)
        return weights + leaves[layer]

    hooks = routing.hooks() + [(get_act_name("topk_weights", layer), _bind(perturb, layer)) for layer in layers]
    with torch.enable_grad():
        total = _nll(model, batch, hooks).sum()
        grads = torch.autograd.grad(total, [leaves[layer] for layer in layers])
    real = batch.attention_mask.bool()
    n_experts = model.cfg.n_experts
    delta = []
    for layer, grad in zip(layers, grads):
        change = -(routing.weights[layer] * grad).double() * real[..., None]  # [batch pos k]
        per_expert = torch.zeros(real.shape[0], n_experts, dtype=torch.float64, device=change.device)
        per_expert.scatter_add_(1, routing.indices[layer].flatten(1), change.flatten(1))
        delta.append(per_expert[:, experts])
    return torch.stack(delta, 1).cpu().numpy(), routing.routed(real, experts, n_experts)


def _check_options(model: HookedMoETransformer, method: str, mode: str, experts) -> list[int]:
    if method not in ("ablation", "attribution"):
        raise ValueError(f"unknown method {method!r}: use 'ablation' (exact) or 'attribution' (first order)")
    if mode not in ("zero", "reroute"):
        raise ValueError(f"unknown mode {mode!r}: use 'zero' or 'reroute'")
    if method == "attribution" and mode != "zero":
        raise ValueError(
            "method='attribution' estimates the 'zero' ablation (the gradient of the loss with respect to the "
            "expert's weight); rerouting changes which experts are selected and has no such estimate: "
            "use method='ablation' with mode='reroute'"
        )
    ids = model.cfg.resolve_experts(experts)
    if not ids:
        raise ValueError("experts is empty: give at least one expert id, or None for all of them")
    return ids


@shared_failures("expert_importance")
def expert_importance(
    model: HookedMoETransformer,
    corpora: Mapping[str, Sequence[str]],
    layers: int | Iterable[int] | None = None,
    experts: int | Iterable[int] | None = None,
    method: Method = "ablation",
    mode: Mode = "zero",
    max_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    confidence: float = CONFIDENCE,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """How much the next-token loss of each domain rises when each routed expert is removed.

    For every domain, MoE layer in `layers` (default all) and expert in `experts` (default all):

    - `delta_nll`: mean over the domain's predicted tokens of NLL(expert removed) - NLL
      (nats per token; positive: the expert helps). Removing follows `ablate_experts(mode)`:
      "zero" sets the expert's weight to 0 wherever it is selected, "reroute" masks it out of
      the router so tokens take the next-best experts.
    - `ci_low`, `ci_high`: percentile bootstrap interval at `confidence` over sequences
      (chunks), see :mod:`moe_hooked.analysis.bootstrap` for its assumptions.
    - `routed_fraction`: fraction of the domain's real tokens whose top-k holds the expert (as
      `routing_stats` counts); `n_tokens`: predicted tokens (real tokens with a real target).

    `method="ablation"` is exact: one forward pass per (batch, layer, expert), or, under
    "zero", per group of experts of one layer that no sequence of the batch shares (an expert
    that no token of a sequence selects leaves that sequence's loss unchanged, so one run
    ablates the whole group and each sequence's change belongs to its one expert; grouping by
    token would not be exact, since attention carries a change to later tokens).

    `method="attribution"` ("zero" only) is a first-order estimate for every expert of every
    layer from one forward and one backward pass per batch. With `w[b,p,s]` the weight of
    slot s at position p (`hook_topk_weights`), `i[b,p,s]` its expert and `L_b` the summed
    NLL of sequence b, zeroing expert e changes `L_b` by approximately

        delta_b(e) = - sum over (p, s) with i[b,p,s] = e of  w[b,p,s] * dL_b/dw[b,p,s],

    the first-order Taylor term of setting those weights to 0 (the gradient flows through
    every later layer, routers included, with the routing choices held fixed). `delta_nll` =
    sum_b delta_b(e) / n_tokens.

    Texts are batched as in `routing_stats` (chunks of at most `max_length` tokens, default
    the model's context; `max_tokens` caps each domain). Cost (ablation): one forward pass per
    batch plus one per (layer, expert or group); use `layers=`, `experts=` or attribution on
    large models.

    Returns one row per (domain, layer, expert): `domain, layer, expert, routed_fraction,
    delta_nll, ci_low, ci_high, n_tokens`.
    """
    layers = model.cfg.resolve_moe_layers(layers)
    experts = _check_options(model, method, mode, experts)
    sums = ImportanceSums.zeros(len(corpora), len(layers), len(experts))
    what = f"expert_importance ({method})"
    per_batch = {}  # batch index -> (domain, delta, routed, mask): this rank's share
    for d, batch in corpus_batches(model, corpora, max_length, batch_size, max_tokens, progress, what):
        if method == "ablation":
            delta, routed = _ablation_batch(model, batch, layers, experts, mode)
        else:
            delta, routed = _attribution_batch(model, batch, layers, experts)
        per_batch[batch.index] = (d, delta, routed, batch.attention_mask.cpu())
    for d, delta, routed, mask in gather_by_batch(per_batch, what):  # every rank's, in single-process order
        sums.add(d, delta, routed, mask)
    return _importance_frame(list(corpora), layers, experts, sums, confidence, n_boot, seed)


def _importance_frame(
    domains: list[str], layers: list[int], experts: list[int], sums: ImportanceSums, confidence, n_boot, seed
) -> pd.DataFrame:
    frames = []
    for d, domain in enumerate(domains):
        delta = np.concatenate([x for x, _ in sums.per_sequence[d]])  # [n_seq L E]
        tokens = np.concatenate([n for _, n in sums.per_sequence[d]])
        low, high = bootstrap_ratio(delta, tokens, confidence, n_boot, seed)
        layer_idx, expert_idx = np.indices(delta.shape[1:]).reshape(2, -1)
        frames.append(pd.DataFrame({
            "domain": domain,
            "layer": np.asarray(layers)[layer_idx],
            "expert": np.asarray(experts)[expert_idx],
            "routed_fraction": (sums.routed[d] / sums.real_tokens[d]).ravel(),
            "delta_nll": (sums.delta_sum[d] / sums.predicted_tokens[d]).ravel(),
            "ci_low": low.ravel(),
            "ci_high": high.ravel(),
            "n_tokens": int(sums.predicted_tokens[d]),
        }))
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def frequency_importance_correlation(importance: pd.DataFrame) -> float:
    """Spearman rank correlation between `routed_fraction` and `delta_nll` over the rows of an
    `expert_importance` table: the Pearson correlation of their ranks (ties share their mean
    rank), as ``scipy.stats.spearmanr`` computes it; NaN when either column is constant."""
    ranks = importance[["routed_fraction", "delta_nll"]].rank()
    return float(ranks["routed_fraction"].corr(ranks["delta_nll"]))
