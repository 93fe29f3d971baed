"""Visualisation: circuitsvis routing views, the expert-lens grid, the paper's figures."""

from moe_hooked.viz.categorical import CategoricalTokensView
from moe_hooked.viz.expert_lens_grid import ExpertLensGrid
from moe_hooked.viz.figures import (
    coactivation_figure,
    comparison_figure,
    cosine_figure,
    importance_figure,
    perplexity_figure,
    pruning_figure,
    specialization_figure,
    to_png,
)
from moe_hooked.viz.routing import (
    CircuitsView,
    expert_weight_view,
    routing_cache,
    routing_view,
    routing_weights,
    top1_expert_view,
    top1_experts,
)

__all__ = [
    "CategoricalTokensView",
    "CircuitsView",
    "ExpertLensGrid",
    "coactivation_figure",
    "comparison_figure",
    "cosine_figure",
    "expert_weight_view",
    "importance_figure",
    "perplexity_figure",
    "pruning_figure",
    "routing_cache",
    "routing_view",
    "routing_weights",
    "specialization_figure",
    "to_png",
    "top1_expert_view",
    "top1_experts",
]
