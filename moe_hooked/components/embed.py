"""Token embedding and unembedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn


class Embed(nn.Module):
    """Token ids -> embeddings. `W_E` [d_vocab, d_model]."""

    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class Unembed(nn.Module):
    """Normalised residual -> logits.

    The weight is stored as `weight` [d_vocab, d_model] (the hub's `lm_head.weight`
    layout) with the final RMSNorm gain already folded in, so that
    `ln_final(x) @ W_U` equals the model's logits exactly.
    """

    def __init__(self, d_model: int, d_vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        return self.weight.T

    def forward(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        return F.linear(x, self.weight)
