"""Analyses over routing: statistics of routing counts, streamed routing statistics over
corpora, and perplexity under routing interventions."""

from moe_hooked.analysis.counts import (
    RoutingCounts,
    coactivation_matrix,
    coverage,
    domain_specialists,
    routing_entropy,
    specialization,
    uniform_baseline,
)
from moe_hooked.analysis.importance import expert_importance
from moe_hooked.analysis.perplexity import perplexity_vs_top_k, pruning_curve
from moe_hooked.analysis.routing import routing_stats, top_tokens_per_expert

__all__ = [
    "RoutingCounts",
    "coactivation_matrix",
    "coverage",
    "domain_specialists",
    "expert_importance",
    "perplexity_vs_top_k",
    "pruning_curve",
    "routing_entropy",
    "routing_stats",
    "specialization",
    "top_tokens_per_expert",
    "uniform_baseline",
]
