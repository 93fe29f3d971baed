"""`MoEActivationCache`: TransformerLens's activation cache with the MoE hook shorthands."""

from __future__ import annotations

import torch

from moe_hooked._tl import ActivationCache
from moe_hooked.hook_names import get_act_name


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
