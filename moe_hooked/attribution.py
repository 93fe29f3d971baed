"""Per-expert decompositions of the residual stream, read from an activation cache.

`hook_expert_out` is indexed by *slot* (slot 0 = the token's highest-weighted expert). The
functions here regroup it by *expert id* through `hook_topk_indices`:

- :func:`expert_output` -- expert e's output at every position (zero where e was not selected).
- :func:`decompose_resid_by_expert` -- the residual stream as embed + per layer: attention,
  the dense MLP or, in MoE layers, one component per routed expert (its weighted output) and
  the shared expert; the components sum to the residual stream, so their logit attributions
  sum to the logit (direct logit attribution per expert).
- :func:`stack_neuron_results` -- every neuron's contribution: dense MLP neurons, each routed
  expert's hidden units (weighted by the routing) and the shared expert's hidden units. It
  replaces TransformerLens's version (which assumes one `d_mlp` and `hook_post` everywhere),
  so that `cache.get_full_resid_decomposition()` works on MoE models.

These are also methods of `MoEActivationCache` (`cache.expert_output(...)`, ...).
"""

from __future__ import annotations

import einops
import numpy as np
import torch
from jaxtyping import Float

from moe_hooked._tl import ActivationCache, Slice
from moe_hooked.hook_names import get_act_name

__all__ = ["decompose_resid_by_expert", "expert_output", "stack_neuron_results"]

SliceLike = Slice | int | tuple[int, ...] | list[int] | torch.Tensor | np.ndarray | None
"""What TransformerLens's `Slice` takes (None: everything), or a `Slice`."""


def _cached(cache: ActivationCache, name: str, layer: int | None = None) -> torch.Tensor:
    """One cached activation: a shorthand at `layer`, or a full hook name (`layer=None`)."""
    return cache.activations(layer, [name], "per-expert attribution")[0]


def _pos_dim(cache: ActivationCache) -> int:
    return 1 if cache.has_batch_dim else 0


def _per_expert(cache: ActivationCache, layer: int, slot_values: torch.Tensor) -> torch.Tensor:
    """Slot-indexed values [... k d] (weighted by the routing) regrouped by expert id: [... n_experts d]."""
    cfg = cache.model.cfg
    indices, weights = _cached(cache, "topk_indices", layer), _cached(cache, "topk_weights", layer)
    weighted = weights[..., None].to(slot_values.dtype) * slot_values
    out = slot_values.new_zeros(*indices.shape[:-1], cfg.n_experts, slot_values.shape[-1])
    return out.scatter_add_(-2, indices[..., None].expand_as(weighted), weighted)


def expert_output(
    cache: ActivationCache, layer: int, expert: int, weighted: bool = False
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Expert `expert`'s output at MoE layer `layer` at every position, gathered through
    `hook_topk_indices` from the slot-indexed `hook_expert_out`; zero where the expert was not
    selected (see `expert_selected`). `weighted=True`: times its routing weight, i.e. its
    contribution to `hook_routed_out`."""
    cfg = cache.model.cfg
    cfg.check_moe_layer(layer)
    cfg.check_expert(expert)
    indices, expert_out = _cached(cache, "topk_indices", layer), _cached(cache, "expert_out", layer)
    in_slot = (indices == expert).to(expert_out.dtype)
    if weighted:
        in_slot = in_slot * _cached(cache, "topk_weights", layer).to(expert_out.dtype)
    return (in_slot[..., None] * expert_out).sum(-2)


def expert_selected(cache: ActivationCache, layer: int, expert: int) -> torch.Tensor:
    """[batch pos] True where MoE layer `layer` routed the token to `expert`."""
    cache.model.cfg.check_moe_layer(layer)
    cache.model.cfg.check_expert(expert)
    return (_cached(cache, "topk_indices", layer) == expert).any(-1)


def decompose_resid_by_expert(
    cache: ActivationCache,
    layer: int | None = None,
    pos_slice: SliceLike = None,
    apply_ln: bool = False,
    return_labels: bool = False,
) -> Float[torch.Tensor, "component batch pos d_model"] | tuple[torch.Tensor, list[str]]:
    """The residual stream entering block `layer` (None: the final one) as a stack of components.

    Labels, in order: "embed"; per block l < layer: "{l}_attn_out", then "{l}_mlp_out" (dense
    blocks) or "L{l}E{e}" for every routed expert e (weight * output, zero where not
    selected) and "L{l}_shared" (the shared expert, with its gate). The components sum to the
    residual stream (`resid_pre` of `layer`). `pos_slice` as in TransformerLens; `apply_ln`
    divides by the cached scale of the norm that reads the stream (ln_final for layer None),
    so that `stack @ model.W_U[:, token]` is each component's direct logit attribution.
    """
    model = cache.model
    layer = model.cfg.n_layers if layer is None or layer == -1 else layer
    pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
    parts, labels = [_cached(cache, "hook_embed")], ["embed"]
    for l in range(layer):
        parts.append(_cached(cache, get_act_name("attn_out", l)))
        labels.append(f"{l}_attn_out")
        if not model.cfg.is_moe_layer(l):
            parts.append(_cached(cache, get_act_name("mlp_out", l)))
            labels.append(f"{l}_mlp_out")
            continue
        per_expert = _per_expert(cache, l, _cached(cache, "expert_out", l))
        parts += list(per_expert.unbind(-2))
        labels += [f"L{l}E{e}" for e in range(model.cfg.n_experts)]
        if model.cfg.d_shared_expert:
            parts.append(_cached(cache, "shared_out", l))
            labels.append(f"L{l}_shared")
    stack = pos_slice.apply(torch.stack(parts), dim=_pos_dim(cache) + 1)
    if apply_ln:
        stack = cache.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
    return (stack, labels) if return_labels else stack


def _neuron_results(cache: ActivationCache, layer: int) -> tuple[Float[torch.Tensor, "... neuron d_model"], list[str]]:
    """Each neuron's contribution to block `layer`'s MLP output, with labels."""
    block = cache.model.blocks[layer]
    mlp = block.mlp
    if not block.is_moe:
        post = _cached(cache, f"blocks.{layer}.mlp.hook_post")
        return post[..., None] * mlp.w_down.T, [f"L{layer}N{n}" for n in range(post.shape[-1])]
    hidden = _per_expert(cache, layer, _cached(cache, "expert_post", layer))  # [... n_experts d_expert]
    routed = einops.einsum(hidden, mlp.experts.W_down, "... e n, e d n -> ... e n d").flatten(-3, -2)
    n_experts, d_expert = hidden.shape[-2:]
    labels = [f"L{layer}E{e}N{n}" for e in range(n_experts) for n in range(d_expert)]
    if not cache.model.cfg.d_shared_expert:
        return routed, labels
    shared_post = _cached(cache, f"blocks.{layer}.mlp.shared_expert.hook_post")
    if cache.model.cfg.shared_expert_gated:
        shared_post = shared_post * _cached(cache, "shared_gate", layer)
    shared = shared_post[..., None] * mlp.shared_expert.w_down.T
    return torch.cat([routed, shared], dim=-2), labels + [f"L{layer}SN{n}" for n in range(shared_post.shape[-1])]


def stack_neuron_results(
    cache: ActivationCache,
    layer: int,
    pos_slice: SliceLike = None,
    neuron_slice: SliceLike = None,
    return_labels: bool = False,
    incl_remainder: bool = False,
    apply_ln: bool = False,
    project_output_onto: torch.Tensor | None = None,
    mlp_input: bool = False,
) -> Float[torch.Tensor, "neuron batch pos d_model"] | tuple[torch.Tensor, list[str]]:
    """Every MLP neuron's contribution to the residual stream entering block `layer`
    (TransformerLens's `stack_neuron_results`, for dense and MoE blocks).

    Components: dense neurons "L{l}N{n}", routed expert neurons "L{l}E{e}N{n}" (routing weight
    * hidden activation * W_down column; zero where expert e was not selected), shared expert
    neurons "L{l}SN{n}". `incl_remainder` adds "remainder" (the rest of the stream: resid_mid
    of `layer` with `mlp_input`, else its resid_pre); `project_output_onto` [d_model] or
    [d_model n] projects each component (after `apply_ln`). Memory: one d_model vector per
    neuron per position. `neuron_slice` is not supported (neuron counts differ per layer).
    """
    if neuron_slice is not None:
        raise ValueError("neuron_slice is not supported on MoE models (neuron counts differ per layer): slice the labels")
    model = cache.model
    layer = model.cfg.n_layers if layer is None or layer == -1 else layer
    pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
    parts, labels = [], []
    for l in range(layer):
        results, names = _neuron_results(cache, l)
        parts.append(pos_slice.apply(results, dim=_pos_dim(cache)))
        labels += names
    embed = pos_slice.apply(_cached(cache, "hook_embed"), dim=_pos_dim(cache))
    stack = einops.rearrange(torch.cat(parts, dim=-2), "... n d -> n ... d") if parts else embed.new_zeros(0, *embed.shape)
    if incl_remainder:
        target = ("resid_mid", layer) if mlp_input else ("resid_post", layer - 1)
        remainder = pos_slice.apply(cache[target], dim=_pos_dim(cache)) - stack.sum(0)
        stack, labels = torch.cat([stack, remainder[None]]), labels + ["remainder"]
    if apply_ln:
        stack = cache.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    if project_output_onto is not None:
        stack = stack @ project_output_onto.to(stack.dtype)
    return (stack, labels) if return_labels else stack
