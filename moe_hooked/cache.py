"""`MoEActivationCache`: TransformerLens's activation cache with the MoE hook shorthands, and the one
accessor every analysis reads a cache through."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from transformer_lens import ActivationCache

from moe_hooked.hook_names import get_act_name

__all__ = ["MissingActivationError", "MoEActivationCache", "cached_activations", "cached_layers"]

_LAYER = re.compile(r"blocks\.(\d+)\.")


class MissingActivationError(KeyError, ValueError):
    """The cache lacks a hook an analysis reads (a KeyError, and a ValueError for bad input)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _cache_dict(cache: ActivationCache | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return getattr(cache, "cache_dict", cache)


def cached_activations(
    cache: ActivationCache | Mapping[str, torch.Tensor], layer: int, names: Sequence[str], what: str
) -> list[torch.Tensor]:
    """The activations of hooks `names` (shorthands such as "topk_weights", "resid_mid") at
    `layer`, from an `ActivationCache` or a dict keyed by full hook name.

    Raises :class:`MissingActivationError` naming every missing hook and `what` needs them.
    """
    cache_dict = _cache_dict(cache)
    keys = [get_act_name(name, layer) for name in names]
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
    `cache["router_logits", 3]` to `blocks.3.mlp.hook_router_logits`."""

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple) and isinstance(key[0], str):
            layer = key[1] if len(key) > 1 else None
            if isinstance(layer, int) and layer < 0:
                layer += self.model.cfg.n_layers
            key = get_act_name(key[0], layer, *key[2:])
        return super().__getitem__(key)

    def activations(self, layer: int, names: Sequence[str], what: str = "this analysis") -> list[torch.Tensor]:
        """`cached_activations(self, layer, names, what)`."""
        return cached_activations(self, layer, names, what)

    def layers_with(self, names: Sequence[str]) -> list[int]:
        """`cached_layers(self, names)`: the layers at which every hook of `names` is cached."""
        return cached_layers(self, names)
