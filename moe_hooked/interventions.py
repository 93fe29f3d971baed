"""Interventions on the routing and the experts, as ordinary TransformerLens hooks.

Every intervention takes the model (or its `MoEConfig`) first, validates its arguments
against it, and returns a list of `(hook_name, hook_fn)` pairs, usable as::

    model.run_with_hooks(tokens, fwd_hooks=ablate_experts(model, {3: [12]}))
    with model.hooks(fwd_hooks=keep_top_k(model, 1) + route_to(model, 5, [0, 7])):
        logits, cache = model.run_with_cache(tokens)   # the cache sees the edited run

`ablate_experts`, `keep_top_k`, `route_to` and `patch_expert_outputs` take `positions=` (an int,
a list of ints or a boolean mask [pos] / [batch pos]) to act at those positions only.

Lists concatenate, so interventions compose with each other and with any other hook; hooks
on one hook point run in list order. Some interventions need the routing of the current
token in a later hook of the same layer (e.g. which expert sits in each slot when editing
`hook_topk_weights`): they add a hook that records `hook_topk_indices` (or
`hook_router_logits`) as it is at that point of the list, so put hooks that edit those
before them.

- `ablate_experts(model, {layer: [ids]}, mode)`: "zero" (contribution removed, other weights
  kept), "reroute" (masked out of the router, the token goes to the next-best expert) or
  "mean" (output replaced by its mean over a reference set, see `expert_output_means`).
- `keep_top_k(model, k)`: keep the k highest-weighted slots of each token.
- `route_to(model, layer, experts)`: send every token to the given experts.
- `patch_expert_outputs(model, source_cache, layers)`: activation patching of the expert
  outputs from a clean run.

A slot whose weight is 0 is not computed by the experts (its `hook_expert_out` holds zeros), so
"zero" ablation, `keep_top_k` and the padding slots of `route_to` really save expert compute.

To study experts that were *not* selected, run inside `with model.all_experts():`: every
MoE layer then also runs every expert on every token and exposes
`blocks.{l}.mlp.hook_all_expert_out` [batch pos n_experts d_model]. That costs
n_experts / top_k times the routed-expert compute and, when cached,
batch * pos * n_experts * d_model values per layer (n_experts / top_k times `hook_expert_out`:
8x for OLMoE, 64 experts of which 8 are selected), so cache it for few layers at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from moe_hooked._tl import HookPoint
from moe_hooked.cache import cached_activations
from moe_hooked.config import MoEConfig
from moe_hooked.corpus import all_reduce_sums, check_same_inputs, corpus_batches, deal, rank_and_world, shared_failures
from moe_hooked.hook_names import get_act_name

if TYPE_CHECKING:
    from moe_hooked._tl import ActivationCache
    from moe_hooked.model import HookedMoETransformer

HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor | None]
FwdHooks = list[tuple[str, HookFn]]
AblationMode = Literal["zero", "reroute", "mean"]
Positions = int | Sequence[int] | Bool[torch.Tensor, " pos"] | Bool[torch.Tensor, "batch pos"] | None
"""Where an intervention acts: a position, a list of positions (negative ids count from the
end), a boolean mask [pos] or [batch pos], or None for every position. Positions index the
current forward pass: during cached generation that is the new token(s) only."""
PATCHABLE = ("expert_out", "routed_out", "shared_out")

__all__ = [
    "FwdHooks",
    "Positions",
    "ablate_experts",
    "expert_output_means",
    "keep_top_k",
    "patch_expert_outputs",
    "route_to",
]


# ----------------------------------------------------------------------------- argument checks
def _cfg(model: HookedMoETransformer | MoEConfig) -> MoEConfig:
    cfg = getattr(model, "cfg", model)
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"expected a HookedMoETransformer or its MoEConfig, got {type(model).__name__}")
    return cfg


def _expert_spec(cfg: MoEConfig, experts: Mapping[int, int | Iterable[int]]) -> dict[int, list[int]]:
    """`{layer: [expert ids]}` checked against the model; layers with no ids are dropped."""
    if not isinstance(experts, Mapping):
        raise TypeError(f"experts must be a dict {{layer: [expert ids]}}, got {type(experts).__name__}")
    spec = {cfg.check_moe_layer(layer): cfg.resolve_experts(ids) for layer, ids in experts.items()}
    return {layer: ids for layer, ids in spec.items() if ids}


def _check_positions(positions: Positions) -> Positions:
    """`positions` if its type is valid (the range is checked against each run)."""
    if positions is None or isinstance(positions, int):
        return positions
    if isinstance(positions, torch.Tensor):
        if positions.dtype != torch.bool and positions.ndim != 1:
            raise ValueError(f"positions as a tensor must be a boolean mask or a 1-D tensor of ids, got {positions.dtype}")
        return positions if positions.dtype == torch.bool else [int(p) for p in positions]
    ids = list(positions)
    if not ids or not all(isinstance(p, int) for p in ids):
        raise ValueError(f"positions must be an int, a non-empty list of ints or a boolean mask, got {positions!r}")
    return ids


def _position_mask(positions: Positions, batch_pos: torch.Size, device: torch.device) -> Bool[torch.Tensor, "batch pos"]:
    """[batch pos] True where the intervention acts, or a ValueError naming the valid range."""
    n_pos = batch_pos[1]
    if isinstance(positions, torch.Tensor):
        if positions.shape not in (batch_pos[1:], batch_pos):
            raise ValueError(
                f"the positions mask has shape {tuple(positions.shape)}, but this run is [batch pos] = "
                f"{tuple(batch_pos)}: give a mask [pos] or [batch pos]"
            )
        return positions.to(device).expand(batch_pos)
    where = torch.zeros(batch_pos, dtype=torch.bool, device=device)
    if positions is None:
        return where.fill_(True)
    ids = [positions] if isinstance(positions, int) else positions
    bad = [p for p in ids if not -n_pos <= p < n_pos]
    if bad:
        raise ValueError(f"positions {bad} are out of range: this run has {n_pos} positions (valid: {-n_pos}..{n_pos - 1})")
    where[:, ids] = True
    return where


def _only_at(positions: Positions, edited: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """`edited` at `positions`, `original` elsewhere (both [batch pos ...])."""
    if positions is None:
        return edited
    where = _position_mask(positions, original.shape[:2], original.device)
    return torch.where(where.reshape(*where.shape, *[1] * (original.ndim - 2)), edited, original)


class _Latest:
    """Records the last tensor seen at a hook point, for a later hook of the same forward pass."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def record(self, x: torch.Tensor, hook: HookPoint) -> None:
        self.value = x


# ----------------------------------------------------------------------------- ablation
def ablate_experts(
    model: HookedMoETransformer | MoEConfig,
    experts: Mapping[int, int | Iterable[int]],
    mode: AblationMode = "zero",
    mean_from: ActivationCache | Mapping[int, torch.Tensor] | torch.Tensor | None = None,
    positions: Positions = None,
) -> FwdHooks:
    """Hooks that ablate routed experts, `experts` = `{layer: [expert ids]}`, at `positions`
    (an int, a list of ints or a boolean mask [pos] / [batch pos]; None: everywhere).

    - "zero": in every slot holding an ablated expert the weight (`hook_topk_weights`) is set
      to 0, so the expert's contribution is removed and it is not computed; the other selected
      experts keep their weights (nothing is renormalised, the token uses fewer experts).
    - "reroute": the ablated experts' router logits (`hook_router_logits`) are set to -inf before
      the softmax and the top-k, so every token takes the next-best experts instead. The
      softmax then runs over the remaining experts only: every remaining probability is
      p_j / (1 - sum of the ablated p_i), the top-k is taken over these, and
      `norm_topk_prob` models renormalise the k weights to sum to one as usual.
      `hook_router_probs` shows the renormalised probabilities. With sigmoid scores (DeepSeek-V3)
      the other experts' scores are unchanged. The router never selects an expert whose logit is
      -inf, whatever its selection bias or expert group. At least top_k experts must remain.
    - "mean": in every slot holding an ablated expert, `hook_expert_out` is replaced by that
      expert's mean output; routing and weights are unchanged (the expert is still computed).
      `mean_from` gives the means: an `ActivationCache` of a reference run (see
      `expert_output_means` for what is averaged), the dict `{layer: [n_experts d_model]}` that
      `expert_output_means` returns, or one [n_experts d_model] tensor when ablating one layer.
    """
    cfg = _cfg(model)
    spec = _expert_spec(cfg, experts)
    positions = _check_positions(positions)
    if mode == "zero":
        return [hook for layer, ids in spec.items() for hook in _zero_hooks(layer, ids, positions)]
    if mode == "reroute":
        return [hook for layer, ids in spec.items() for hook in _reroute_hooks(cfg, layer, ids, positions)]
    if mode == "mean":
        means = _means_for(cfg, spec, mean_from)
        return [hook for layer, ids in spec.items() for hook in _mean_hooks(layer, ids, means[layer], positions)]
    raise ValueError(f"unknown ablation mode '{mode}': use 'zero', 'reroute' or 'mean'")


def _zero_hooks(layer: int, ids: list[int], positions: Positions) -> FwdHooks:
    routing = _Latest()

    def zero_weights(weights: Float[torch.Tensor, "batch pos k"], hook: HookPoint) -> torch.Tensor:
        ablated = torch.isin(routing.value, torch.tensor(ids, device=weights.device))
        return _only_at(positions, weights.masked_fill(ablated, 0), weights)

    return [(get_act_name("topk_indices", layer), routing.record), (get_act_name("topk_weights", layer), zero_weights)]


def _reroute_hooks(cfg: MoEConfig, layer: int, ids: list[int], positions: Positions) -> FwdHooks:
    if cfg.n_experts - len(ids) < cfg.top_k:
        raise ValueError(
            f"rerouting {len(ids)} of the {cfg.n_experts} experts of layer {layer} leaves fewer than "
            f"top_k={cfg.top_k}: mask at most {cfg.n_experts - cfg.top_k} experts per layer"
        )

    def mask_logits(logits: Float[torch.Tensor, "batch pos n_experts"], hook: HookPoint) -> torch.Tensor:
        masked = logits.index_fill(-1, torch.tensor(ids, device=logits.device), float("-inf"))
        return _only_at(positions, masked, logits)

    return [(get_act_name("router_logits", layer), mask_logits)]


def _mean_hooks(
    layer: int, ids: list[int], means: Float[torch.Tensor, "n_experts d_model"], positions: Positions
) -> FwdHooks:
    routing = _Latest()

    def replace_outputs(expert_out: Float[torch.Tensor, "batch pos k d_model"], hook: HookPoint) -> torch.Tensor:
        indices = routing.value
        ablated = torch.isin(indices, torch.tensor(ids, device=indices.device))
        return _only_at(positions, torch.where(ablated[..., None], means.to(expert_out)[indices], expert_out), expert_out)

    return [(get_act_name("topk_indices", layer), routing.record), (get_act_name("expert_out", layer), replace_outputs)]


def _means_for(
    cfg: MoEConfig,
    spec: dict[int, list[int]],
    mean_from: ActivationCache | Mapping[int, torch.Tensor] | torch.Tensor | None,
) -> dict[int, torch.Tensor]:
    """The [n_experts d_model] mean outputs of every ablated layer, checked."""
    if mean_from is None:
        raise ValueError("mode='mean' needs mean_from=: a reference run's cache, or expert_output_means(...)")
    if isinstance(mean_from, torch.Tensor):
        if len(spec) != 1:
            raise ValueError(
                f"one tensor of means was given for {len(spec)} layers: pass a dict {{layer: [n_experts d_model]}}"
            )
        means = {layer: mean_from for layer in spec}
    elif _is_cache(mean_from):
        means = {layer: _means_from_cache(cfg, mean_from, layer) for layer in spec}
    else:
        means = dict(mean_from)
    for layer, ids in spec.items():
        _check_means(cfg, layer, ids, means.get(layer))
    return means


def _check_means(cfg: MoEConfig, layer: int, ids: list[int], means: torch.Tensor | None) -> None:
    if means is None:
        raise ValueError(f"mean_from has no means for layer {layer}")
    if tuple(means.shape) != (cfg.n_experts, cfg.d_model):
        raise ValueError(
            f"the means of layer {layer} have shape {tuple(means.shape)}, expected "
            f"[n_experts d_model] = {(cfg.n_experts, cfg.d_model)}"
        )
    undefined = [e for e in ids if not torch.isfinite(means[e]).all()]
    if undefined:
        raise ValueError(
            f"experts {undefined} of layer {layer} were never selected in the reference set, so their "
            "mean output is undefined: use a larger reference set"
        )


# ----------------------------------------------------------------------------- expert means
def _is_cache(x) -> bool:
    """An `ActivationCache`, or a plain dict of activations keyed by hook name."""
    return hasattr(x, "cache_dict") or (isinstance(x, Mapping) and all(isinstance(key, str) for key in x))


def _expert_sums(
    cfg: MoEConfig,
    indices: Int[torch.Tensor, "... k"],
    expert_out: Float[torch.Tensor, "... k d_model"],
    selected: Bool[torch.Tensor, "... k"],
) -> tuple[Float[torch.Tensor, "n_experts d_model"], Int[torch.Tensor, " n_experts"]]:
    """Sum of `expert_out` over the `selected` slots, per expert id, and the number of slots."""
    ids = indices[selected]
    sums = torch.zeros(cfg.n_experts, cfg.d_model, dtype=torch.float64, device=expert_out.device)
    sums.index_add_(0, ids, expert_out[selected].double())
    return sums, torch.bincount(ids, minlength=cfg.n_experts)


def _cached_sums(
    cfg: MoEConfig, cache: ActivationCache | Mapping[str, torch.Tensor], layer: int, real: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_expert_sums` of a cache at `layer`, over the slots with a nonzero weight (when the cache
    has `hook_topk_weights`) at real positions (`real` [batch pos], when given)."""
    indices, expert_out = cached_activations(cache, layer, ("topk_indices", "expert_out"), "a mean over a cache")
    if indices.shape[-1] != cfg.top_k or expert_out.shape != (*indices.shape, cfg.d_model):
        raise ValueError(
            f"the cache's hook_topk_indices {tuple(indices.shape)} and hook_expert_out "
            f"{tuple(expert_out.shape)} at layer {layer} do not fit this model (k={cfg.top_k}, d_model={cfg.d_model})"
        )
    cache_dict = getattr(cache, "cache_dict", cache)
    weights = cache_dict.get(get_act_name("topk_weights", layer))
    selected = torch.ones_like(indices, dtype=torch.bool) if weights is None else weights != 0
    if real is not None:
        selected = selected & real.bool()[..., None]
    return _expert_sums(cfg, indices, expert_out, selected)


def _means(sums: torch.Tensor, counts: torch.Tensor) -> Float[torch.Tensor, "n_experts d_model"]:
    """sums / counts as float32; NaN rows for experts never selected."""
    return (sums / counts[:, None]).float()


def _means_from_cache(cfg: MoEConfig, cache: ActivationCache, layer: int) -> Float[torch.Tensor, "n_experts d_model"]:
    return _means(*_cached_sums(cfg, cache, layer, getattr(cache, "attention_mask", None)))


@shared_failures("expert_output_means")
def expert_output_means(
    model: HookedMoETransformer | MoEConfig,
    tokens_or_texts: Int[torch.Tensor, "batch pos"] | Sequence[str],
    layers: int | Iterable[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> dict[int, Float[torch.Tensor, "n_experts d_model"]]:
    """Each expert's mean output over a reference set, for `ablate_experts(mode="mean")`.

    The mean of `hook_expert_out` over the slots where that expert was selected with a nonzero
    weight, over all batches and (real) positions; NaN rows for experts never selected.
    `tokens_or_texts`: token ids [batch pos] (every position counts) or texts, streamed in padded
    batches of `batch_size` chunks of at most `max_length` tokens (default `cfg.n_ctx`).
    Returns `{layer: [n_experts d_model]}` for the MoE `layers` (default all).
    """
    cfg = _cfg(model)
    layers = cfg.resolve_moe_layers(layers)
    device = model.W_E.device
    sums = {layer: torch.zeros(cfg.n_experts, cfg.d_model, dtype=torch.float64, device=device) for layer in layers}
    counts = {layer: torch.zeros(cfg.n_experts, dtype=torch.long, device=device) for layer in layers}
    names = [get_act_name(name, layer) for layer in layers for name in ("topk_indices", "topk_weights", "expert_out")]
    with torch.inference_mode():
        for tokens, mask in _reference_batches(model, tokens_or_texts, batch_size, max_length, progress):
            _, cache = model.run_with_cache(
                tokens, attention_mask=mask, return_type=None, stop_at_layer=max(layers) + 1, names_filter=names
            )
            for layer in layers:
                layer_sums, layer_counts = _cached_sums(cfg, cache, layer, mask)
                sums[layer] += layer_sums
                counts[layer] += layer_counts
    totals = all_reduce_sums([*sums.values(), *counts.values()], "expert_output_means")
    return {layer: _means(totals[i], totals[len(layers) + i]) for i, layer in enumerate(layers)}


def _reference_batches(model: HookedMoETransformer, tokens_or_texts, batch_size: int, max_length: int | None, progress: bool):
    """Yield (tokens [batch pos], attention mask [batch pos]) batches on the model's device."""
    if isinstance(tokens_or_texts, torch.Tensor):
        tokens = torch.atleast_2d(tokens_or_texts).to(model.W_E.device)
        if rank_and_world()[1] > 1:
            check_same_inputs(model, "expert_output_means", tokens=tokens.cpu().numpy(), batch_size=batch_size)
        for batch in deal(tokens.split(batch_size)):
            yield batch, torch.ones_like(batch)
        return
    corpus = {"reference": list(tokens_or_texts)}
    for _, batch in corpus_batches(model, corpus, max_length, batch_size, progress=progress, what="expert_output_means"):
        yield batch.tokens, batch.attention_mask


# ----------------------------------------------------------------------------- top-k and routing
def keep_top_k(
    model: HookedMoETransformer | MoEConfig,
    k: int,
    layers: int | Iterable[int] | None = None,
    renormalize: bool = False,
    positions: Positions = None,
) -> FwdHooks:
    """Hooks that keep slots 0..k-1 of every token (at `positions`: an int, a list or a boolean
    mask; None: every position). The router emits slots by decreasing weight, so these are its k
    highest-weighted experts, unless an earlier hook reordered them.

    The kept slots keep the weights the model computed and the other slots get weight 0 (so
    their experts are not computed). This is the paper's top-1..top-k experiment; for models
    without `norm_topk_prob` it equals running the original model with k experts per token.
    `renormalize=True` scales the kept weights so that they sum to the original sum of all
    top_k weights. `k` = the model's top_k changes nothing. `layers`: MoE layers (default all).
    `positions`: where to act (an int, a list or a boolean mask; None: everywhere).
    """
    cfg = _cfg(model)
    cfg.check_top_k(k)
    positions = _check_positions(positions)

    def keep(weights: Float[torch.Tensor, "batch pos k"], hook: HookPoint) -> torch.Tensor:
        kept = weights[..., :k]
        if renormalize:
            kept_sum = kept.sum(-1, keepdim=True)
            scale = torch.where(kept_sum != 0, weights.sum(-1, keepdim=True) / kept_sum, 0)
            kept = kept * scale
        return _only_at(positions, torch.cat([kept, torch.zeros_like(weights[..., k:])], dim=-1), weights)

    return [(get_act_name("topk_weights", layer), keep) for layer in cfg.resolve_moe_layers(layers)]


def route_to(
    model: HookedMoETransformer | MoEConfig, layer: int, experts: int | Iterable[int], positions: Positions = None
) -> FwdHooks:
    """Hooks that send every token of MoE `layer` (at `positions`: an int, a list or a boolean
    mask; None: every position) to exactly the given experts.

    With m = len(experts) <= top_k, slots 0..m-1 hold the given experts in the given order,
    weighted by the router's softmax restricted to them: softmax(logits[experts]) in float32,
    which sums to one whatever `norm_topk_prob` says. The remaining top_k - m slots hold the
    best other experts by router logit with weight 0 (so they are not computed).
    `hook_router_logits` / `hook_router_probs` are left as the router computed them.
    """
    cfg = _cfg(model)
    cfg.check_moe_layer(layer)
    ids = cfg.resolve_experts(experts)
    positions = _check_positions(positions)
    if not 1 <= len(ids) <= cfg.top_k:
        raise ValueError(f"route_to takes 1..{cfg.top_k} experts (the model's top-k), got {len(ids)}")
    logits = _Latest()

    def force_indices(indices: Int[torch.Tensor, "batch pos k"], hook: HookPoint) -> torch.Tensor:
        forced = torch.tensor(ids, device=indices.device)
        others = logits.value.index_fill(-1, forced, float("-inf")).topk(cfg.top_k - len(ids), dim=-1).indices
        routed = torch.cat([forced.expand(*indices.shape[:-1], len(ids)), others], dim=-1).to(indices.dtype)
        return _only_at(positions, routed, indices)

    def force_weights(weights: Float[torch.Tensor, "batch pos k"], hook: HookPoint) -> torch.Tensor:
        restricted = F.softmax(logits.value[..., ids], dim=-1, dtype=torch.float32).to(weights.dtype)
        routed = torch.cat([restricted, torch.zeros_like(weights[..., len(ids) :])], dim=-1)
        return _only_at(positions, routed, weights)

    return [
        (get_act_name("router_logits", layer), logits.record),
        (get_act_name("topk_indices", layer), force_indices),
        (get_act_name("topk_weights", layer), force_weights),
    ]


# ----------------------------------------------------------------------------- activation patching
def patch_expert_outputs(
    model: HookedMoETransformer | MoEConfig,
    source_cache: ActivationCache,
    layers: int | Iterable[int] | None,
    slots: int | Sequence[int] | None = None,
    positions: Positions = None,
    hooks: Sequence[str] = ("expert_out",),
    match: Literal["slot", "expert"] = "slot",
) -> FwdHooks:
    """Hooks that patch expert outputs from a clean run (`source_cache`) into the current run.

    `hooks` names what is patched at each MoE layer in `layers` (None: all): "expert_out"
    (`hook_expert_out` [batch pos k d_model], the unweighted output of each slot's expert),
    "routed_out" (`hook_routed_out`, the weighted sum of the routed experts) and/or
    "shared_out" (`hook_shared_out`, models with a shared expert). `positions` restricts the
    patch to those positions and `slots` (with "expert_out") to those slots; None means all.
    The current run must have the source's batch and pos sizes.

    `hook_expert_out` is patched per *slot*. If the current run routes a token differently, a
    patched slot carries the clean output of the expert the *clean* run had in that slot,
    multiplied by the *current* run's weight for that slot (which belongs to another expert).
    `match="expert"` patches only the slots whose expert id is the clean run's id at that slot
    (the source cache then needs `hook_topk_indices`); patch "routed_out" to transplant the whole
    weighted mix of the routed experts instead.
    """
    cfg = _cfg(model)
    layers = cfg.resolve_moe_layers(layers)
    names = _patch_names(cfg, hooks, slots, match)
    slots = _slot_ids(cfg, slots)
    positions = _check_positions(positions)
    result = []
    for layer in layers:
        clean = dict(zip(names, cached_activations(source_cache, layer, names, "patch_expert_outputs")))
        for name in names:
            _check_source_shape(cfg, layer, name, clean[name])
        for name in hooks:
            result += _patch_hooks(layer, name, clean, positions, slots if name == "expert_out" else None, match)
    return result


def _patch_names(cfg: MoEConfig, hooks: Sequence[str], slots, match: str) -> list[str]:
    """The source activations the patch needs, after checking the options."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    unknown = [name for name in hooks if name not in PATCHABLE]
    if unknown or not hooks:
        raise ValueError(f"hooks must be a non-empty subset of {PATCHABLE}, got {hooks}")
    if "shared_out" in hooks and not cfg.d_shared_expert:
        raise ValueError(f"this {cfg.architecture} model has no shared expert: 'shared_out' cannot be patched")
    if match not in ("slot", "expert"):
        raise ValueError(f"match must be 'slot' or 'expert', got '{match}'")
    if (slots is not None or match == "expert") and "expert_out" not in hooks:
        raise ValueError("slots= and match='expert' apply to hook_expert_out: include 'expert_out' in hooks")
    return hooks + (["topk_indices"] if match == "expert" else [])


def _slot_ids(cfg: MoEConfig, slots: int | Sequence[int] | None) -> list[int] | None:
    if slots is None:
        return None
    slots = [slots] if isinstance(slots, int) else list(slots)
    bad = [s for s in slots if not 0 <= s < cfg.top_k]
    if bad:
        raise ValueError(f"slots {bad} are out of range: valid slots are 0..{cfg.top_k - 1} (top_k={cfg.top_k})")
    return slots


def _check_source_shape(cfg: MoEConfig, layer: int, name: str, tensor: torch.Tensor) -> None:
    """Trailing dims of a source activation must match this model (k, d_model)."""
    trailing = {"expert_out": (cfg.top_k, cfg.d_model), "topk_indices": (cfg.top_k,)}.get(name, (cfg.d_model,))
    if tensor.ndim != 2 + len(trailing) or tuple(tensor.shape[2:]) != trailing:
        raise ValueError(
            f"source_cache's {get_act_name(name, layer)} has shape {tuple(tensor.shape)}, but this model's is "
            f"[batch pos {' '.join(map(str, trailing))}] (k={cfg.top_k}, d_model={cfg.d_model}): the cache "
            "comes from a model of another shape (or was cached without its batch dim)"
        )


def _patch_hooks(layer: int, name: str, clean: dict, positions, slots: list[int] | None, match: str) -> FwdHooks:
    source = clean[name]
    routing = _Latest()

    def patch(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if act.shape != source.shape:
            raise ValueError(
                f"cannot patch {hook.name}: the source has shape {tuple(source.shape)} but this run's is "
                f"{tuple(act.shape)}: run on inputs with the source's batch and pos sizes"
            )
        where = _position_mask(positions, act.shape[:2], act.device)
        if act.ndim == 4:
            where = where[..., None].expand(act.shape[:-1]).clone()
        if slots is not None:
            where[..., [s for s in range(act.shape[2]) if s not in slots]] = False
        if match == "expert" and name == "expert_out":
            where &= routing.value == clean["topk_indices"].to(act.device)
        return torch.where(where[..., None], source.to(act), act)

    hooks = [(get_act_name(name, layer), patch)]
    if match == "expert" and name == "expert_out":
        hooks.insert(0, (get_act_name("topk_indices", layer), routing.record))
    return hooks
