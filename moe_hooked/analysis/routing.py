"""Routing statistics streamed over corpora: which experts each domain's tokens select.

Both functions run the model with forward hooks on the router hook points only (no
activation cache) and add each batch into fixed-size accumulators, so memory does not
grow with the corpus. Only real tokens count: padding is masked out.

- :func:`routing_stats` -- per (domain, MoE layer, expert) top-k selection counts, plus
  co-activation and router entropy, as a :class:`RoutingCounts`.
- :func:`top_tokens_per_expert` -- vocabulary specialization: the input tokens each expert
  of one layer is most often selected for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from moe_hooked.analysis.counts import RoutingCounts
from moe_hooked.corpus import all_reduce_sums, corpus_batches, gather_by_batch, shared_failures
from moe_hooked.hook_names import get_act_name

if TYPE_CHECKING:
    from moe_hooked.model import HookedMoETransformer

__all__ = ["routing_stats", "top_tokens_per_expert"]


class _RoutingAccumulator:
    """Running sums over `D` domains and the model's `L` MoE layers (`E` experts), on the model's device."""

    def __init__(self, model: HookedMoETransformer, n_domains: int, coactivation: bool) -> None:
        cfg = model.cfg
        device = model.W_E.device
        shape = (n_domains, len(cfg.moe_layers))
        self.n_experts = cfg.n_experts
        self.counts = torch.zeros(*shape, cfg.n_experts, dtype=torch.long, device=device)
        self.tokens = torch.zeros(shape, dtype=torch.long, device=device)
        self.coactivation = None
        if coactivation:
            self.coactivation = torch.zeros(*shape, cfg.n_experts, cfg.n_experts, dtype=torch.long, device=device)
        self.layers = list(cfg.moe_layers)
        self.batches: dict[int, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        """batch index -> (domain, counts [b L E] and tokens [b] of its sequences, entropy sum [L]).
        The entropy sums (floats) are added up in batch order after gathering, so that their
        total is the same bits whatever the number of processes (unlike a sum over ranks)."""

    def hooks(self, domain: int, mask: Bool[torch.Tensor, "batch pos"], index: int) -> list[tuple[str, Callable]]:
        """Forward hooks that add batch `index` (real tokens: `mask`) into the sums of `domain`."""
        shape = (mask.shape[0], len(self.layers), self.n_experts)
        per_sequence = torch.zeros(shape, dtype=torch.int32, device=mask.device)
        entropy = torch.zeros(len(self.layers), dtype=torch.float64, device=mask.device)
        self.batches[index] = (domain, per_sequence, mask.sum(-1), entropy)
        hooks = []
        for i, layer in enumerate(self.layers):
            hooks.append((get_act_name("topk_indices", layer), partial(self._count, domain, i, mask, per_sequence)))
            hooks.append((get_act_name("router_probs", layer), partial(self._entropy, i, mask, entropy)))
        return hooks

    def _count(
        self,
        d: int,
        i: int,
        mask: torch.Tensor,
        per_sequence: Int[torch.Tensor, "batch L E"],
        indices: Int[torch.Tensor, "batch pos k"],
        hook,
    ) -> None:
        in_top_k = F.one_hot(indices, self.n_experts).amax(dim=-2)  # [batch pos E], 1 where in the top-k
        per_sequence[:, i] = (in_top_k * mask[..., None]).sum(1).int()
        selected = in_top_k[mask]  # [n_tokens E]
        self.counts[d, i] += selected.sum(0)
        self.tokens[d, i] += selected.shape[0]
        if self.coactivation is not None:
            as_float = selected.float()  # exact: per-batch sums stay far below 2**24
            self.coactivation[d, i] += (as_float.T @ as_float).long()

    @staticmethod
    def _entropy(
        i: int, mask: torch.Tensor, entropy: Float[torch.Tensor, " L"], probs: Float[torch.Tensor, "batch pos E"], hook
    ) -> None:
        entropy[i] = torch.special.entr(probs[mask].double()).sum()

    def result(self, domains: list[str], top_k: int) -> RoutingCounts:
        """The sums, totalled over the ranks of a process group (if any), as RoutingCounts."""
        sums = [self.counts, self.tokens] + ([] if self.coactivation is None else [self.coactivation])
        counts, tokens, *coactivation = (x.cpu().numpy() for x in all_reduce_sums(sums, "routing_stats"))
        by_batch = {i: (d, *(x.cpu().numpy() for x in tensors)) for i, (d, *tensors) in self.batches.items()}
        batches = gather_by_batch(by_batch, "routing_stats")  # every rank's, in single-process order
        entropy_sum = np.zeros(tokens.shape)
        for d, _, _, entropy in batches:
            entropy_sum[d] += entropy
        return RoutingCounts(
            counts=counts,
            tokens=tokens,
            domains=domains,
            layers=self.layers,
            top_k=top_k,
            coactivation=coactivation[0] if coactivation else None,
            entropy_sum=entropy_sum,
            sequence_counts=np.concatenate([c for _, c, _, _ in batches]),
            sequence_tokens=np.concatenate([n for _, _, n, _ in batches]),
            sequence_domains=np.concatenate([np.full(len(n), d) for d, _, n, _ in batches]),
        )


def _require_moe(model: HookedMoETransformer) -> None:
    if not model.cfg.moe_layers:
        raise ValueError("this model has no MoE layers: there is no routing to count")


@shared_failures("routing_stats")
@torch.inference_mode()
def routing_stats(
    model: HookedMoETransformer,
    corpora: Mapping[str, Sequence[str]],
    max_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    coactivation: bool = True,
    progress: bool = True,
) -> RoutingCounts:
    """Count, per domain and MoE layer, how many real tokens select each routed expert.

    `corpora` maps a domain name to its texts. Texts are tokenized with the model's
    tokenizer and BOS convention, cut into chunks of at most `max_length` tokens (default:
    the model's context), and run `batch_size` chunks at a time; `max_tokens` caps each
    domain's tokens. An expert counts for a token when it is among the token's top-k
    (`hook_topk_indices`), whatever its weight. Also accumulated: `coactivation`
    [D, L, E, E] (tokens on which both experts are selected; optional) and `entropy_sum`
    [D, L] (sum over tokens of the router softmax entropy, nats), and per sequence (chunk)
    its counts [S, L, E] (int32: 4 * L * E bytes per chunk), tokens and domain, for the
    sequence-level test and intervals of `specialization`.

    The forward pass stops after the last MoE layer and keeps no activations: memory is
    that of one batch plus the accumulators, whatever the corpus size.
    """
    _require_moe(model)
    acc = _RoutingAccumulator(model, len(corpora), coactivation)
    stop = max(model.cfg.moe_layers) + 1
    for d, batch in corpus_batches(model, corpora, max_length, batch_size, max_tokens, progress, "routing_stats"):
        model.run_with_hooks(
            batch.tokens,
            attention_mask=batch.attention_mask,
            stop_at_layer=stop,
            fwd_hooks=acc.hooks(d, batch.attention_mask.bool(), batch.index),
        )
    return acc.result(list(corpora), model.cfg.top_k)


@shared_failures("top_tokens_per_expert")
@torch.inference_mode()
def top_tokens_per_expert(
    model: HookedMoETransformer,
    texts: Sequence[str],
    layer: int,
    top: int = 10,
    max_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The input tokens each routed expert of MoE layer `layer` is most often selected for.

    Over the real tokens of `texts` (batched as in :func:`routing_stats`), counts how often
    each (expert, token id) pair occurs, an expert counting when it is in the token's top-k.
    Memory: one [n_experts, d_vocab] count table, updated in place (scatter-add) per batch. In a
    process group the whole table is summed over the ranks before the top tokens are picked
    (exact: merging each rank's top lists would miss tokens that are frequent only overall).

    Returns one row per (expert, rank), at most `top` ranks per expert and only tokens the
    expert was selected for (experts never selected have no rows):
    `layer, expert, rank, token_id, token, count, fraction_of_expert, token_fraction`, where
    `fraction_of_expert = count / (tokens routed to the expert)` and
    `token_fraction = count / (occurrences of the token)` (1.0: the expert handles every
    occurrence of that token). Rank 0 is the most frequent; ties keep token-id order.
    """
    model.cfg.check_moe_layer(layer)
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    n_experts, d_vocab = model.cfg.n_experts, model.cfg.d_vocab
    pairs = torch.zeros(n_experts * d_vocab, dtype=torch.long, device=model.W_E.device)  # flat [E, V]
    occurrences = torch.zeros(d_vocab, dtype=torch.long, device=model.W_E.device)

    def count(tokens: torch.Tensor, mask: torch.Tensor, indices: Int[torch.Tensor, "batch pos k"], hook) -> None:
        pair_ids = (indices[mask] * d_vocab + tokens[mask][:, None]).flatten()  # [n_tokens * k]
        pairs.index_add_(0, pair_ids, torch.ones_like(pair_ids))

    what = "top_tokens_per_expert"
    for _, batch in corpus_batches(model, {"texts": texts}, max_length, batch_size, max_tokens, progress, what):
        mask = batch.attention_mask.bool()
        real = batch.tokens[mask]
        occurrences.index_add_(0, real, torch.ones_like(real))
        model.run_with_hooks(
            batch.tokens,
            attention_mask=batch.attention_mask,
            stop_at_layer=layer + 1,
            fwd_hooks=[(get_act_name("topk_indices", layer), partial(count, batch.tokens, mask))],
        )
    pairs, occurrences = (x.cpu() for x in all_reduce_sums([pairs, occurrences], what))
    return _top_tokens_frame(model, layer, pairs.view(n_experts, d_vocab), occurrences, top)


def _top_tokens_frame(
    model, layer: int, pairs: Int[torch.Tensor, "E V"], occurrences: Int[torch.Tensor, " V"], top: int
) -> pd.DataFrame:
    """The table of :func:`top_tokens_per_expert` from the (expert, token) count table."""
    counts, token_ids = pairs.sort(dim=-1, descending=True, stable=True)
    counts, token_ids = counts[:, :top].numpy(), token_ids[:, :top].numpy()  # [E top]
    expert_totals = pairs.sum(-1, keepdim=True).numpy()  # [E 1]
    expert, rank = np.nonzero(counts)  # row-major: expert by expert, rank by rank
    ids = token_ids[expert, rank]
    return pd.DataFrame(
        {
            "layer": layer,
            "expert": expert,
            "rank": rank,
            "token_id": ids,
            "token": [model.tokenizer.decode([i]) for i in ids.tolist()],
            "count": counts[expert, rank],
            "fraction_of_expert": counts[expert, rank] / expert_totals[expert, 0],
            "token_fraction": counts[expert, rank] / occurrences.numpy()[ids],
        }
    )
