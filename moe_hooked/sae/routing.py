"""Which SAE features drive routing: features of an SAE on a MoE layer's router input against
each expert's selection.

For every real token of a corpus (BOS excluded, as in training), `feature_routing` encodes the
SAE's hook activation into feature activations f [d_sae] and records which experts the layer
selected, s [n_experts] (1 where the expert holds a slot with non-zero weight), then returns the
Pearson correlation of every feature with every expert's selection over all tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from jaxtyping import Float

from moe_hooked.corpus import corpus_batches
from moe_hooked.sae.activations import cache_hooks, check_hook_name, hook_layer, token_mask
from moe_hooked.sae.splice import check_sae

if TYPE_CHECKING:
    from sae_lens import SAE

    from moe_hooked.model import HookedMoETransformer


@dataclass
class FeatureRouting:
    """Feature activations against expert selection at one MoE layer.

    correlation: [d_sae n_experts] Pearson correlation of feature activation and selection
        (0 where a feature never fires or an expert is always or never chosen).
    feature_frequency: [d_sae] fraction of tokens on which each feature is active (> 0).
    expert_frequency: [n_experts] fraction of tokens routed to each expert.
    n_tokens: tokens counted; layer: the MoE layer.
    """

    correlation: Float[torch.Tensor, "d_sae n_experts"]
    feature_frequency: Float[torch.Tensor, " d_sae"]
    expert_frequency: Float[torch.Tensor, " n_experts"]
    n_tokens: int
    layer: int

    def top_features(self, k: int = 3) -> pd.DataFrame:
        """For each expert, the `k` features most positively correlated with its selection:
        columns expert, rank, feature, correlation, feature_frequency."""
        values, features = self.correlation.topk(k, dim=0)  # [k n_experts]
        rows = [
            dict(expert=e, rank=r, feature=int(features[r, e]), correlation=float(values[r, e]),
                 feature_frequency=float(self.feature_frequency[features[r, e]]))
            for e in range(self.correlation.shape[1]) for r in range(k)
        ]
        return pd.DataFrame(rows)


class _Moments:
    """Running sums for the correlation of features f [n d_sae] with selections s [n n_experts]."""

    def __init__(self, d_sae: int, n_experts: int):
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
        self.n, self.f, self.f2, self.active, self.s = 0, zeros(d_sae), zeros(d_sae), zeros(d_sae), zeros(n_experts)
        self.fs = zeros(d_sae, n_experts)

    def add(self, f: torch.Tensor, s: torch.Tensor) -> None:
        f, s = f.double().cpu(), s.double().cpu()
        self.n += len(f)
        self.f += f.sum(0)
        self.f2 += (f * f).sum(0)
        self.active += (f > 0).double().sum(0)
        self.s += s.sum(0)  # s is 0/1, so it is also the sum of squares
        self.fs += f.T @ s

    def result(self, layer: int) -> FeatureRouting:
        n = self.n
        cov = n * self.fs - self.f[:, None] * self.s[None, :]
        var = (n * self.f2 - self.f**2)[:, None] * (n * self.s - self.s**2)[None, :]
        correlation = torch.where(var > 0, cov / var.clamp(min=1e-300).sqrt(), torch.zeros_like(cov))
        return FeatureRouting(correlation.float(), (self.active / n).float(), (self.s / n).float(), n, layer)


@torch.no_grad()
def feature_routing(
    model: HookedMoETransformer,
    sae: SAE,
    corpora: Mapping[str, Sequence[str]],
    layer: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> FeatureRouting:
    """Correlate `sae`'s features with the expert selection of MoE layer `layer` over `corpora`.

    The SAE must read a per-token hook ([batch pos d_in], e.g. `blocks.{l}.hook_resid_mid`, the
    router's input); `layer` defaults to the block of that hook. The model runs as it is: call
    this with no SAE spliced in for the model's own routing. `batch_size`, `max_length`,
    `max_tokens` as in `corpus_batches`.
    """
    hook_name = check_sae(model, sae)
    layer = hook_layer(hook_name) if layer is None else layer
    if layer not in model.cfg.moe_layers:
        raise ValueError(f"layer {layer} is not a MoE layer (MoE layers: {list(model.cfg.moe_layers)}): pass layer=")
    chosen, weights = f"blocks.{layer}.mlp.hook_topk_indices", f"blocks.{layer}.mlp.hook_topk_weights"
    check_hook_name(model, chosen)
    moments = _Moments(sae.cfg.d_sae, model.cfg.n_experts)
    batches = corpus_batches(model, corpora, max_length=max_length, batch_size=batch_size, max_tokens=max_tokens,
                             progress=progress, what="feature routing")
    for _, batch in batches:
        cached = cache_hooks(model, batch.tokens, batch.attention_mask, [hook_name, chosen, weights])
        if cached[hook_name].ndim != 3:
            raise ValueError(f"'{hook_name}' is not a per-token hook [batch pos d]: feature_routing needs one")
        mask = token_mask(model, batch.tokens, batch.attention_mask, include_bos=False)
        selected = torch.zeros(*mask.shape, model.cfg.n_experts, device=mask.device)
        selected.scatter_(-1, cached[chosen], (cached[weights] != 0).float())
        moments.add(sae.encode(cached[hook_name][mask]), selected[mask])
    return moments.result(layer)
