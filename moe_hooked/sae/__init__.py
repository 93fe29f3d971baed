"""Sparse autoencoders on hooked MoE models, with SAELens (`pip install "moe_hooked[sae]"`).

- :class:`HookActivationSource`: shuffled batches of any hook's activations over corpora, the
  data provider of SAELens's `SAETrainer`.
- :func:`add_sae`, :func:`reset_saes`, :func:`saes` (also `model.add_sae`, `model.reset_saes`,
  `with model.saes([...])`): splice SAEs into the forward pass, their features as hook points.
- :func:`feature_routing`: correlation of an SAE's features with each expert's selection.

Only training needs `sae_lens` itself; splicing takes any SAELens SAE.
"""

from moe_hooked.sae.activations import HookActivationSource, hook_width
from moe_hooked.sae.routing import FeatureRouting, feature_routing
from moe_hooked.sae.splice import SAEHookPoint, add_sae, attached_saes, reset_saes, saes

__all__ = [
    "FeatureRouting",
    "HookActivationSource",
    "SAEHookPoint",
    "add_sae",
    "attached_saes",
    "feature_routing",
    "hook_width",
    "reset_saes",
    "saes",
]
