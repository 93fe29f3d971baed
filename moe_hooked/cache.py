"""`MoEActivationCache`: TransformerLens's activation cache with the MoE hook shorthands."""

from __future__ import annotations

import torch
from transformer_lens import ActivationCache

from moe_hooked.hook_names import get_act_name


class MoEActivationCache(ActivationCache):
    """TransformerLens's `ActivationCache`, also resolving MoE shorthands such as
    `cache["router_logits", 3]` to `blocks.3.mlp.hook_router_logits`.

    `attention_mask` [batch pos] (1 on real tokens) is the mask of the run, None when every
    token was real; the lenses read "the last token" of a row from it.
    """

    def __init__(self, cache_dict, model, has_batch_dim: bool = True, attention_mask: torch.Tensor | None = None):
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
        return super().__getitem__(key)
