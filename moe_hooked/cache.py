"""`MoEActivationCache`: TransformerLens's activation cache with the MoE hook shorthands, and the one
accessor every analysis reads a cache through."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from moe_hooked import attribution
from moe_hooked._tl import ActivationCache
from moe_hooked.attribution import SliceLike
from moe_hooked.hook_names import MOE_HOOKS, HookNameError, get_act_name, unknown_hook_error

if TYPE_CHECKING:
    from moe_hooked.model import HookedMoETransformer

__all__ = ["MissingActivationError", "MoEActivationCache", "cached_activations", "cached_layers"]

_LAYER = re.compile(r"blocks\.(\d+)\.")


class MissingActivationError(KeyError, ValueError):
    """The cache lacks a hook an analysis reads (a KeyError, and a ValueError for bad input)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _cache_dict(cache: ActivationCache | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return getattr(cache, "cache_dict", cache)


def cached_activations(
    cache: ActivationCache | Mapping[str, torch.Tensor], layer: int | None, names: Sequence[str], what: str
) -> list[torch.Tensor]:
    """The activations of hooks `names` (shorthands such as "topk_weights", "resid_mid") at
    `layer`, or with `layer=None` of hooks named in full ("hook_embed", "blocks.0.hook_attn_out"),
    from an `ActivationCache` or a dict keyed by full hook name.

    Raises :class:`MissingActivationError` naming every missing hook and `what` needs them.
    """
    cache_dict = _cache_dict(cache)
    keys = list(names) if layer is None else [get_act_name(name, layer) for name in names]
    missing = [key for key in keys if key not in cache_dict]
    if missing:
        raise MissingActivationError(
            f"the cache has no {', '.join(repr(k) for k in missing)}, which {what} reads: run run_with_cache "
            f"without a names_filter, or with one that keeps {keys}"
        )
    return [cache_dict[key] for key in keys]


def cached_layers(cache: ActivationCache | Mapping[str, torch.Tensor], names: Sequence[str]) -> list[int]:
    """The layers (ascending) at which the cache holds every hook of `names`."""
    cache_dict = _cache_dict(cache)
    layers = sorted({int(m.group(1)) for key in cache_dict if (m := _LAYER.match(key))})
    return [layer for layer in layers if all(get_act_name(name, layer) in cache_dict for name in names)]


class MoEActivationCache(ActivationCache):
    """TransformerLens's `ActivationCache`, also resolving MoE shorthands such as
    `cache["router_logits", 3]` to `blocks.3.mlp.hook_router_logits`.

    `attention_mask` [batch pos] (1 on real tokens) is the mask of the run, None when every
    token was real; the lenses read "the last token" of a row from it.
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: HookedMoETransformer, has_batch_dim: bool = True, attention_mask: torch.Tensor | None = None):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.attention_mask = attention_mask

    def resolve_pos(self, pos: int, batch: int = 0) -> int:
        """Position `pos` of row `batch` as a non-negative index; a negative `pos` counts back
        from the row's last real token (the last position when the cache has no mask)."""
        if pos >= 0 or self.attention_mask is None:
            return pos
        n_batch = self.attention_mask.shape[0]
        if not -n_batch <= batch < n_batch:
            raise IndexError(f"batch={batch} is out of range: the cache holds {n_batch} sequence(s)")
        real = self.attention_mask[batch].bool()
        last = int(torch.arange(real.shape[0], device=real.device)[real].max()) if bool(real.any()) else -1
        return last + 1 + pos

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple) and isinstance(key[0], str):
            layer = key[1] if len(key) > 1 else None
            if isinstance(layer, int) and layer < 0:
                layer += self.model.cfg.n_layers
            key = get_act_name(key[0], layer, *key[2:])
        if isinstance(key, str) and key not in self.cache_dict:
            key = self._shorthand(key)
        return super().__getitem__(key)

    def _shorthand(self, key: str) -> str:
        """A cached hook's full name for a shorthand without a layer (e.g. "embed" -> "hook_embed",
        as TransformerLens's caches and helpers use it), else the error for a missing name."""
        try:
            resolved = get_act_name(key)
        except (HookNameError, ValueError, KeyError):
            resolved = None
        if resolved not in self.cache_dict:
            raise self._missing(key)
        return resolved

    def _missing(self, key: str) -> KeyError:
        if key in self.model.hook_dict:
            return HookNameError(f"the cache holds no '{key}': run run_with_cache without a names_filter that drops it")
        return unknown_hook_error(key, self.cache_dict, self.model.cfg.moe_layers, where="this cache")

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> torch.Tensor:
        """As TransformerLens: the activation of every layer below `layer` (-1: all), stacked
        [n_layers ...]. A MoE hook (e.g. "router_logits") exists only at the MoE layers, so those
        are stacked [n_moe_layers ...], with a warning naming them when dense layers are skipped."""
        if activation_name not in MOE_HOOKS:
            return super().stack_activation(activation_name, layer, sublayer_type)
        top = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        layers = [moe_layer for moe_layer in self.model.cfg.moe_layers if moe_layer < top]
        if len(layers) < top:
            warnings.warn(
                f"'{activation_name}' is a MoE hook: stacked the MoE layers {layers} only "
                f"(the other layers below {top} are dense)",
                stacklevel=2,
            )
        return torch.stack([self[activation_name, moe_layer] for moe_layer in layers])

    def activations(self, layer: int | None, names: Sequence[str], what: str = "this analysis") -> list[torch.Tensor]:
        """`cached_activations(self, layer, names, what)`."""
        return cached_activations(self, layer, names, what)

    def layers_with(self, names: Sequence[str]) -> list[int]:
        """`cached_layers(self, names)`: the layers at which every hook of `names` is cached."""
        return cached_layers(self, names)

    # ------------------------------------------------------------------ per expert (see attribution.py)
    def expert_output(self, layer: int, expert: int, weighted: bool = False) -> torch.Tensor:
        """Expert `expert`'s output [batch pos d_model] at MoE layer `layer`, by expert id
        (zero where not selected); `weighted`: times its routing weight."""
        return attribution.expert_output(self, layer, expert, weighted)

    def expert_selected(self, layer: int, expert: int) -> torch.Tensor:
        """[batch pos] True where MoE layer `layer` routed the token to `expert`."""
        return attribution.expert_selected(self, layer, expert)

    def decompose_resid_by_expert(
        self, layer: int | None = None, pos_slice: SliceLike = None, apply_ln: bool = False, return_labels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream as embed, attention, dense MLPs, each routed expert and the shared
        expert per layer: see `moe_hooked.attribution.decompose_resid_by_expert`."""
        return attribution.decompose_resid_by_expert(self, layer, pos_slice, apply_ln, return_labels)

    def stack_neuron_results(
        self, layer: int, pos_slice: SliceLike = None, neuron_slice: SliceLike = None, return_labels: bool = False,
        **kwargs: bool | torch.Tensor | None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """TransformerLens's `stack_neuron_results` for dense and MoE blocks (routed and shared
        expert neurons): see `moe_hooked.attribution.stack_neuron_results`."""
        return attribution.stack_neuron_results(self, layer, pos_slice, neuron_slice, return_labels, **kwargs)
