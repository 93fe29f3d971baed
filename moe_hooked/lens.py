"""Logit lenses for MoE models, after "MoE Lens - An Expert Is All You Need" (Chaudhari et al., 2025).

Every lens decodes a residual-stream vector `x` as `softmax(ln_final(x) @ W_U)`, with the
final RMSNorm recomputed on `x` itself. `pos` and `batch` index the cache as it is: in a
right-padded batch, `pos=-1` of a shorter sequence is padding.

- :func:`logit_lens` -- the standard lens: `resid_pre` of every layer and the final `resid_post`.
- :func:`expert_lens` -- the extended lens at one MoE layer's output:
  `H^{l,k'} = u^l + sum of the k' highest-weighted expert outputs (times their weights)`,
  `u^l = resid_mid`, for k' = 1..k; and each selected expert alone, `u^l + w_j E_j`.
- :func:`expert_resid_stack` -- the `H^{l,k'}` vectors at every position, from a cache.
- :func:`topk_cosine`, :func:`topk_cosine_from_cache` -- cosine similarity between
  `H^{l,1}` and `H^{l,k}` per MoE layer, over all real tokens and over the last real token of
  each sequence (the paper's variant), beside two baselines: `cos(u, H^{l,k})` (how close the
  residual alone already is) and `cos(H^{l,1} - u, H^{l,k} - u)` (the updates themselves),
  each with a bootstrap interval over sequences; :func:`topk_cosine` streams over corpora.

The shared expert (Qwen-MoE, DeepSeekMoE) is left out of `H` unless `include_shared=True`;
with it, `H^{l,k} = resid_post`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from moe_hooked.analysis.bootstrap import CONFIDENCE, bootstrap_ratio
from moe_hooked.cache import cached_activations
from moe_hooked.corpus import corpus_batches, gather_by_batch, shared_failures
from moe_hooked.hook_names import get_act_name

if TYPE_CHECKING:
    from moe_hooked._tl import ActivationCache
    from moe_hooked.model import HookedMoETransformer

__all__ = [
    "expert_lens",
    "expert_resid_stack",
    "logit_lens",
    "token_topk_cosine",
    "topk_cosine",
    "topk_cosine_from_cache",
]

COSINE_VARIANTS = ("all_tokens", "last_token", "u_only", "update")
"""cos(H^{k'}, H^k) over all real tokens and over each sequence's last real token; cos(u, H^k) and
cos(H^{k'} - u, H^k - u) over all real tokens (u: `resid_mid`, plus the shared expert's output
with `include_shared`)."""


# ---------------------------------------------------------------------------
# Reading the cache
# ---------------------------------------------------------------------------


def _get(cache: ActivationCache, name: str, layer: int) -> torch.Tensor:
    return cached_activations(cache, layer, [name], "the lens")[0]


def _at(x: Float[torch.Tensor, "batch pos ..."], batch: int, pos: int) -> Float[torch.Tensor, "..."]:
    """`x[batch, pos]`, with an error naming the cache's size when either is out of range."""
    n_batch, n_pos = x.shape[:2]
    if not -n_batch <= batch < n_batch:
        raise IndexError(f"batch={batch} is out of range: the cache holds {n_batch} sequence(s)")
    if not -n_pos <= pos < n_pos:
        raise IndexError(f"pos={pos} is out of range: the cache holds {n_pos} position(s)")
    return x[batch, pos]


def _row_pos(cache: ActivationCache, batch: int, pos: int) -> int:
    """`pos` in row `batch`, a negative one counted from the row's last real token (see
    `MoEActivationCache.resolve_pos`); unchanged for a cache without a mask."""
    return cache.resolve_pos(pos, batch) if hasattr(cache, "resolve_pos") else pos


def _check_shared(model: HookedMoETransformer, include_shared: bool) -> None:
    if include_shared and not model.cfg.d_shared_expert:
        raise ValueError(f"include_shared=True, but this {model.cfg.architecture} model has no shared expert")


def _by_weight(
    weights: Float[torch.Tensor, "... k"], *slot_tensors: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """`weights` and each `[... k ...]` tensor with the slots reordered by decreasing weight.

    The router already emits slots in that order; this keeps the lens exact when a hook
    has edited the weights.
    """
    order = weights.argsort(dim=-1, descending=True, stable=True)
    dim = weights.ndim - 1

    def take(x: torch.Tensor) -> torch.Tensor:
        index = order.reshape(*order.shape, *[1] * (x.ndim - order.ndim)).expand(*order.shape, *x.shape[order.ndim :])
        return x.gather(dim, index)

    return (weights.gather(dim, order), *map(take, slot_tensors))


def _accumulate(
    base: Float[torch.Tensor, "... d_model"],
    weights: Float[torch.Tensor, "... k"],
    expert_out: Float[torch.Tensor, "... k d_model"],
) -> Float[torch.Tensor, "... k d_model"]:
    """`base + sum_{j < k'} w_j E_j` for k' = 1..k (slots already ordered by weight)."""
    return base.unsqueeze(-2) + (weights.unsqueeze(-1) * expert_out).cumsum(dim=-2)


def expert_resid_stack(
    model: HookedMoETransformer, cache: ActivationCache, layer: int, include_shared: bool = False
) -> Float[torch.Tensor, "batch pos k d_model"]:
    """`H^{l,k'}` for k' = 1..k at every position of MoE layer `layer`: `resid_mid` (plus the
    shared expert's output if `include_shared`) plus the k' highest-weighted routed expert
    outputs times their weights. Entry `k-1` is `resid_mid + routed_out` (`resid_post` with
    the shared expert).

    Reads `hook_resid_mid`, `hook_topk_weights`, `hook_expert_out` (and `hook_shared_out`).
    """
    model.cfg.check_moe_layer(layer)
    _check_shared(model, include_shared)
    weights, expert_out = _by_weight(_get(cache, "topk_weights", layer), _get(cache, "expert_out", layer))
    return _accumulate(_stack_base(cache, layer, include_shared), weights, expert_out)


def _stack_base(cache: ActivationCache, layer: int, include_shared: bool) -> Float[torch.Tensor, "batch pos d_model"]:
    """u = `resid_mid`, plus the shared expert's output if `include_shared`."""
    base = _get(cache, "resid_mid", layer)
    return base + _get(cache, "shared_out", layer) if include_shared else base


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def _token_strings(model: HookedMoETransformer, ids: Sequence[int]) -> list[str | None]:
    if model.tokenizer is None:
        return [None] * len(ids)
    return [model.tokenizer.decode([i]) for i in ids]


def _top_tokens(model: HookedMoETransformer, normalized: Float[torch.Tensor, "n d_model"], top: int, meta: pd.DataFrame) -> pd.DataFrame:
    """Decode each row of `normalized` (already through `ln_final`): `top` rows per row of
    `meta`, with `rank, token_id, token, prob` added (rank 0 = most probable)."""
    if not 1 <= top <= model.cfg.d_vocab:
        raise ValueError(f"top must be in [1, d_vocab={model.cfg.d_vocab}], got {top}")
    probs = model.unembed(normalized).float().softmax(dim=-1)
    top_probs, top_ids = probs.topk(top, dim=-1)
    table = meta.loc[meta.index.repeat(top)].reset_index(drop=True)
    table["rank"] = np.tile(np.arange(top), len(meta))
    table["token_id"] = top_ids.flatten().cpu().numpy()
    table["token"] = _token_strings(model, table["token_id"].tolist())
    table["prob"] = top_probs.flatten().cpu().numpy()
    return table


@torch.no_grad()
def logit_lens(
    model: HookedMoETransformer, cache: ActivationCache, pos: int = -1, top: int = 5, batch: int = 0
) -> pd.DataFrame:
    """The standard logit lens at one position: `resid_pre` of every layer, then the final
    `resid_post` (whose decoding is the model's own output distribution).

    Returns `layer, label, rank, token_id, token, prob`: `top` rows per residual stream,
    `layer` 0..n_layers (n_layers: the final `resid_post`), `label` as TransformerLens's
    `accumulated_resid` ("0_pre", ..., "final_post"). A negative `pos` counts back from the
    row's last real token when the cache holds an attention mask (padded batches).
    """
    pos = _row_pos(cache, batch, pos)
    _at(_get(cache, "resid_pre", 0), batch, pos)  # range check
    normalized, labels = cache.accumulated_resid(apply_ln=True, pos_slice=pos, return_labels=True)
    meta = pd.DataFrame({"layer": np.arange(len(labels)), "label": labels})
    return _top_tokens(model, normalized[:, batch], top, meta)


def _expert_lens_layer(
    model: HookedMoETransformer,
    cache: ActivationCache,
    layer: int,
    batch: int,
    pos: int,
    include_shared: bool,
    experts_alone: bool,
) -> tuple[Float[torch.Tensor, "n d_model"], pd.DataFrame]:
    """The residual vectors expert_lens decodes at one layer, and their description rows."""

    def at(name: str) -> torch.Tensor:
        return _at(_get(cache, name, layer), batch, pos)

    weights, indices, expert_out = _by_weight(at("topk_weights"), at("topk_indices"), at("expert_out"))
    u = at("resid_mid")
    base = u + at("shared_out") if include_shared else u  # every expert row is built on it
    top_k = weights.shape[-1]
    rows = [dict(variant="resid_mid", k=0)]
    vectors = [u[None]]
    rows += [dict(variant=f"top{j}", k=j) for j in range(1, top_k + 1)]
    vectors.append(_accumulate(base, weights, expert_out))
    if experts_alone:
        rows += [
            dict(variant="expert", k=j + 1, expert=e, weight=w)
            for j, (e, w) in enumerate(zip(indices.tolist(), weights.float().tolist()))
        ]
        vectors.append(base + weights[:, None] * expert_out)
    if include_shared:
        rows.append(dict(variant="shared", k=0))
        vectors.append(base[None])
    rows.append(dict(variant="resid_post", k=top_k))
    vectors.append(at("resid_post")[None])
    meta = pd.DataFrame(rows, columns=["variant", "k", "expert", "weight"])
    meta.insert(0, "layer", layer)
    return torch.cat(vectors), meta


@torch.no_grad()
def expert_lens(
    model: HookedMoETransformer,
    cache: ActivationCache,
    pos: int = -1,
    batch: int = 0,
    top: int = 5,
    layers: Sequence[int] | None = None,
    include_shared: bool = False,
    experts_alone: bool = True,
) -> pd.DataFrame:
    """The MoE Lens extended logit lens at one position, for every MoE layer (or `layers`).

    Decodes, per layer `l` with `u = resid_mid` and the selected experts' weights `w_j` and
    unweighted outputs `E_j` (ordered by decreasing weight):

    - "resid_mid": `u` (k = 0);
    - "top1".."top{k}": `H^{l,k'} = u + sum_{j<k'} w_j E_j` (k = k');
    - "expert" (if `experts_alone`): `u + w_j E_j` for each selected expert, with its
      `expert` id, `weight`, and k = its rank among the selected (1 = highest weight);
    - "shared" (if `include_shared`): `u + S`, S the shared expert's output (k = 0);
    - "resid_post": the block's true output `hook_resid_post` (k = top_k).

    With `include_shared`, S is added in every "top" and "expert" row (`u + S + ...`), so
    "top{k}" equals "resid_post"; without it, no row but "resid_post" holds S.

    Returns `layer, variant, k, expert, weight, rank, token_id, token, prob`, `top` rows per
    decoded vector (`expert` and `weight` are empty outside "expert" rows). A negative `pos`
    counts back from the row's last real token when the cache holds an attention mask.
    """
    _check_shared(model, include_shared)
    pos = _row_pos(cache, batch, pos)
    blocks = [_expert_lens_layer(model, cache, layer, batch, pos, include_shared, experts_alone)
              for layer in model.cfg.resolve_moe_layers(layers)]
    vectors = torch.cat([v for v, _ in blocks])
    meta = pd.concat([m for _, m in blocks], ignore_index=True).astype({"expert": "Int64", "weight": "float64"})
    return _top_tokens(model, model.ln_final(vectors), top, meta)


# ---------------------------------------------------------------------------
# Top-1 vs top-k cosine similarity
# ---------------------------------------------------------------------------


def token_topk_cosine(
    model: HookedMoETransformer, cache: ActivationCache, layer: int, k: int = 1, include_shared: bool = False
) -> Float[torch.Tensor, "batch pos"]:
    """cos(H^{l,k}, H^{l,top_k}) at every position of MoE layer `layer` (k = 1: the paper's
    top-1 vs top-k), computed in float32."""
    model.cfg.check_top_k(k)
    stack = expert_resid_stack(model, cache, layer, include_shared).float()
    return F.cosine_similarity(stack[..., k - 1, :], stack[..., -1, :], dim=-1)


def _last_real(mask: Bool[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
    """True at the last real token of each sequence (rows without real tokens: nowhere)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=-1)
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0], device=mask.device), last] = True
    return out & mask


def _token_cosines(
    model: HookedMoETransformer, cache: ActivationCache, layer: int, k: int, include_shared: bool
) -> tuple[Float[torch.Tensor, "batch pos"], ...]:
    """cos(H^{k'}, H^k), cos(u, H^k), cos(H^{k'} - u, H^k - u) at every position, float32."""
    stack = expert_resid_stack(model, cache, layer, include_shared).float()
    base = _stack_base(cache, layer, include_shared).float()
    top_k, full = stack[..., k - 1, :], stack[..., -1, :]
    return (
        F.cosine_similarity(top_k, full, dim=-1),
        F.cosine_similarity(base, full, dim=-1),
        F.cosine_similarity(top_k - base, full - base, dim=-1),
    )


def _cosine_sums(
    model: HookedMoETransformer,
    cache: ActivationCache,
    mask: Bool[torch.Tensor, "batch pos"],
    k: int,
    include_shared: bool,
) -> Float[torch.Tensor, "batch layer variant 2"]:
    """Per sequence, MoE layer and variant (`COSINE_VARIANTS`): (sum of cosines, n tokens)."""
    last = _last_real(mask)
    sums = []
    for layer in model.cfg.moe_layers:
        topk, u_only, update = (c.double() for c in _token_cosines(model, cache, layer, k, include_shared))
        pairs = [(topk, mask), (topk, last), (u_only, mask), (update, mask)]
        sums.append(torch.stack([torch.stack([(c * m).sum(-1), m.sum(-1).double()], -1) for c, m in pairs], 1))
    return torch.stack(sums, 1).cpu()


def _cosine_frame(model: HookedMoETransformer, sums: Float[torch.Tensor, "seq layer variant 2"], confidence: float) -> pd.DataFrame:
    """`layer, variant, cosine, ci_low, ci_high, n_tokens` from per-sequence sums (mean = sum / n;
    interval: bootstrap over sequences)."""
    layers = np.repeat(np.asarray(model.cfg.moe_layers), len(COSINE_VARIANTS))
    totals = sums.sum(0).reshape(-1, 2).numpy()
    low, high = bootstrap_ratio(sums[..., 0].numpy(), sums[..., 1].numpy(), confidence)
    return pd.DataFrame(
        {
            "layer": layers,
            "variant": list(COSINE_VARIANTS) * len(model.cfg.moe_layers),
            "cosine": totals[:, 0] / totals[:, 1],
            "ci_low": low.ravel(),
            "ci_high": high.ravel(),
            "n_tokens": totals[:, 1].astype(np.int64),
        }
    )


def topk_cosine_from_cache(
    model: HookedMoETransformer,
    cache: ActivationCache,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    k: int = 1,
    include_shared: bool = False,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """Mean cos(H^{l,k}, H^{l,top_k}) per MoE layer over one cache's real tokens, with baselines.

    `attention_mask` [batch pos] marks the real tokens (default: the cache's own mask, else
    all). Returns `layer, variant, cosine, ci_low, ci_high, n_tokens`, one row per variant of
    `COSINE_VARIANTS`:
    "all_tokens" (every real token), "last_token" (the last real token of each sequence, as
    the paper), "u_only" (cos(u, H^{l,top_k}) over every real token: what the residual alone
    already gives) and "update" (cos(H^{l,k} - u, H^{l,top_k} - u): the expert updates
    themselves). `ci_low`, `ci_high`: percentile bootstrap interval at `confidence` over the
    sequences of the batch (see `moe_hooked.analysis.bootstrap`).
    """
    model.cfg.check_top_k(k)
    first = _get(cache, "resid_mid", model.cfg.moe_layers[0])
    mask = torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
    attention_mask = getattr(cache, "attention_mask", None) if attention_mask is None else attention_mask
    if attention_mask is not None:
        mask = attention_mask.to(first.device).bool()
    return _cosine_frame(model, _cosine_sums(model, cache, mask, k, include_shared), confidence)


@shared_failures("topk_cosine")
@torch.inference_mode()
def topk_cosine(
    model: HookedMoETransformer,
    corpora: Mapping[str, Sequence[str]],
    max_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    k: int = 1,
    include_shared: bool = False,
    progress: bool = True,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """Mean cos(H^{l,k}, H^{l,top_k}) per domain and MoE layer, streamed over `corpora`.

    Texts are batched as by `routing_stats` (chunks of at most `max_length` tokens, default
    the model's context; `max_tokens` per domain). Only the hooks the cosine reads are cached,
    and the forward pass stops after the last MoE layer. A "last_token" is the last real token
    of each chunk.

    Returns `domain, layer, variant, cosine, ci_low, ci_high, n_tokens`, the variants and
    intervals of :func:`topk_cosine_from_cache` (the bootstrap resamples a domain's chunks).
    """
    model.cfg.check_top_k(k)
    _check_shared(model, include_shared)
    hooks = ("resid_mid", "topk_weights", "expert_out") + (("shared_out",) if include_shared else ())
    names = [get_act_name(name, layer) for layer in model.cfg.moe_layers for name in hooks]
    per_batch: dict[int, tuple[int, torch.Tensor]] = {}  # batch index -> (domain, per-sequence sums)
    for d, batch in corpus_batches(model, corpora, max_length, batch_size, max_tokens, progress, "topk_cosine"):
        _, cache = model.run_with_cache(
            batch.tokens,
            attention_mask=batch.attention_mask,
            names_filter=names,
            stop_at_layer=max(model.cfg.moe_layers) + 1,
        )
        per_batch[batch.index] = (d, _cosine_sums(model, cache, batch.attention_mask.bool(), k, include_shared).cpu())
    gathered = gather_by_batch(per_batch, "topk_cosine")  # every rank's batches, in single-process order
    frames = [
        _cosine_frame(model, torch.cat([x for dd, x in gathered if dd == d]), confidence) for d in range(len(corpora))
    ]
    table = pd.concat(frames, keys=list(corpora), names=["domain", None]).reset_index(level=0)
    return table.reset_index(drop=True)
