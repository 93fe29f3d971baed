"""The key/value cache of incremental decoding: one small object per attention layer.

`KVCache` holds what every layer shares (which key positions are real tokens, the rotary
position of each new token, the attention mask of the current step); `LayerKVCache` holds
one layer's keys and values. An attention module adopts the cache with three lines::

    positions = kv_cache.positions            # [batch new_pos] rotary positions
    k, v = kv_cache.append(k, v)              # [batch all_pos kv_head d_head]
    mask = kv_cache.mask                      # [batch 1 new_pos all_pos], True = attend

Positions count real tokens only (position = number of real tokens before it), so a
left-padded row sees the same positions as when it runs alone.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int


def rotary_positions(key_mask: Bool[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
    """Position of each token among the real tokens of its row (padding: 0 or its left neighbour's)."""
    return (key_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_mask(
    n_query: int, n_key: int, key_mask: Bool[torch.Tensor, "batch pos"] | None, device: torch.device
) -> Bool[torch.Tensor, "batch 1 query_pos key_pos"]:
    """True where a query may attend to a key: the last `n_query` of `n_key` positions each see
    the keys up to themselves that are real tokens (`key_mask`, None: all). A query always sees
    itself, so that a padding query (e.g. the first position of a left-padded row) gets finite
    values instead of a softmax over nothing; real queries never see padding."""
    offset = n_key - n_query
    causal = torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(offset)[None, None]
    if key_mask is None:
        return causal
    itself = torch.arange(n_key, device=device) == torch.arange(offset, n_key, device=device)[:, None]
    return (causal & key_mask[:, None, None, :].bool()) | itself


class LayerKVCache:
    """One attention layer's keys and values [batch pos kv_head d_head], after rotary."""

    def __init__(self, shared: KVCache):
        self.shared = shared
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def positions(self) -> Int[torch.Tensor, "batch new_pos"]:
        return self.shared.positions

    @property
    def mask(self) -> Bool[torch.Tensor, "batch 1 new_pos all_pos"]:
        return self.shared.mask

    def append(
        self, keys: Float[torch.Tensor, "batch new_pos kv_head d_head"], values: Float[torch.Tensor, "batch new_pos kv_head d_head"]
    ) -> tuple[Float[torch.Tensor, "batch all_pos kv_head d_head"], Float[torch.Tensor, "batch all_pos kv_head d_head"]]:
        """Store the new keys and values; return all of them, cached ones first."""
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=1), torch.cat([self.values, values], dim=1)
        self.keys, self.values = keys, values
        return keys, values


class KVCache:
    """Keys and values of every attention layer, for `model(tokens, past_kv_cache=cache)`.

    Each forward pass with the cache first calls `extend` with the mask of its new tokens,
    then every layer appends its keys and values to `cache[layer]`.
    """

    def __init__(self, n_layers: int):
        self.layers = [LayerKVCache(self) for _ in range(n_layers)]
        self.key_mask: Bool[torch.Tensor, "batch pos"] | None = None
        self.positions: Int[torch.Tensor, "batch new_pos"] | None = None
        self.mask: Bool[torch.Tensor, "batch 1 new_pos all_pos"] | None = None

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    @property
    def n_cached(self) -> int:
        """Number of positions (padding included) cached so far."""
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def extend(self, new_mask: Bool[torch.Tensor, "batch new_pos"]) -> None:
        """Start a forward pass over new tokens (`new_mask`: True for real tokens)."""
        new_mask = new_mask.bool()
        if self.key_mask is not None and self.key_mask.shape[0] != new_mask.shape[0]:
            raise ValueError(
                f"the KV cache holds a batch of {self.key_mask.shape[0]} rows but the new tokens have "
                f"{new_mask.shape[0]}: continue with the same batch, or start a new KVCache"
            )
        self.key_mask = new_mask if self.key_mask is None else torch.cat([self.key_mask, new_mask], dim=1)
        n_new, n_all = new_mask.shape[1], self.key_mask.shape[1]
        self.positions = rotary_positions(self.key_mask)[:, -n_new:]
        padded = not bool(self.key_mask.all())
        self.mask = causal_mask(n_new, n_all, self.key_mask if padded else None, new_mask.device)
