"""The MoE Lens paper's published routing counts, with their layers mapped to model layer indices.

The paper's data (``routing_counts.json``: ``counts[model][domain][layer_key]`` = a count per
routed expert) keys layers as its code numbered them: from 1 for OLMoE and Qwen1.5-MoE, whose
every layer is a MoE layer (keys 1..16 and 1..24 are model layers 0..15 and 0..23), and by the
model's own index for DeepSeekMoE, whose layer 0 is dense (keys 1..27 are model layers 1..27).
:func:`paper_routing_counts` applies that offset, so that the paper's counts join ours (from
``routing_stats``, keyed by model layer index) layer by layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moe_hooked.analysis.counts import RoutingCounts

__all__ = ["PAPER_MODELS", "PaperModel", "paper_routing_counts"]


@dataclass(frozen=True)
class PaperModel:
    """A model of the paper's counts: its hub id, top-k, number of layers (dense ones included),
    and what to add to a layer key to get the model's layer index."""

    hub_id: str
    top_k: int
    n_layers: int
    layer_offset: int


PAPER_MODELS = {
    "olmoe": PaperModel("allenai/OLMoE-1B-7B-0924", top_k=8, n_layers=16, layer_offset=-1),
    "qwen": PaperModel("Qwen/Qwen1.5-MoE-A2.7B", top_k=4, n_layers=24, layer_offset=-1),
    "deepseek-base": PaperModel("deepseek-ai/deepseek-moe-16b-base", top_k=6, n_layers=28, layer_offset=0),
    "deepseek-chat": PaperModel("deepseek-ai/deepseek-moe-16b-chat", top_k=6, n_layers=28, layer_offset=0),
}


def paper_routing_counts(path: str | Path, paper_model: str) -> RoutingCounts:
    """The paper's counts of `paper_model` ("olmoe", "qwen", "deepseek-base", "deepseek-chat") read
    from `path` (its ``routing_counts.json``), as a :class:`RoutingCounts` [D, L, E] whose
    `layers` are the model's layer indices (see the module docstring)."""
    if paper_model not in PAPER_MODELS:
        raise ValueError(f"unknown paper model {paper_model!r}: choose from {sorted(PAPER_MODELS)}")
    data = json.loads(Path(path).read_text())
    counts = data.get("counts", data) if isinstance(data, dict) else data
    if not isinstance(counts, dict):
        raise ValueError(f"{path} is not the paper's routing counts: expected a JSON object "
                         '{"counts": {model: {domain: {layer: [count per expert]}}}}')
    if paper_model not in counts:
        raise ValueError(f"{path} has no counts for {paper_model!r}; it has {sorted(counts)}")
    spec = PAPER_MODELS[paper_model]
    shifted = {
        domain: {str(int(key) + spec.layer_offset): values for key, values in layers.items()}
        for domain, layers in counts[paper_model].items()
    }
    return RoutingCounts.from_dict(shifted, top_k=spec.top_k)
