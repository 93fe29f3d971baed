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
    """Final-norm gain and output projection: logits = (gain * normalized) @ weight^T.

    `weight` [d_vocab, d_model] is the hub's `lm_head.weight`, `gain` [d_model] the final
    RMSNorm's weight, applied here in the dtype of `normalized` (the model dtype, or float32
    when the model's norms apply their gain in float32) and cast to the model dtype, exactly
    as the reference does, so that `ln_final` (which has no gain) plus this module reproduce
    the logits bit for bit.
    `W_U` [d_model d_vocab] is the gain folded into the projection, so that
    `ln_final(x) @ W_U` gives the logits (exactly, up to rounding in low precision).
    """

    def __init__(self, d_model: int, d_vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))
        self.gain = nn.Parameter(torch.ones(d_model))

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        """Computed on access (folded in float32, cast to the model dtype)."""
        return (self.weight.float() * self.gain.float()).T.to(self.weight.dtype)

    def directions(self, tokens: Int[torch.Tensor, "..."]) -> Float[torch.Tensor, "... d_model"]:
        """The columns of `W_U` for `tokens`, without materialising all of `W_U`."""
        return (self.weight[tokens].float() * self.gain.float()).to(self.weight.dtype)

    def forward(self, normalized: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        return F.linear((self.gain * normalized).to(self.weight.dtype), self.weight)
