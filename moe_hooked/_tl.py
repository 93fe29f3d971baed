"""The one module that imports TransformerLens.

moe_hooked builds on TransformerLens's `HookedRootModule`, `HookPoint`, `ActivationCache` and
`get_act_name`, which TransformerLens 3.x (>= 3.9, the line SAELens depends on) and 4.x both
ship. 4.x removed the `transformer_lens.utils` module (3.x has it next to `utilities`), so
names come from `utilities`, which both lines have; any later difference between the two is
bridged here, so that the rest of the package imports from this module only.
"""

from __future__ import annotations

from transformer_lens import ActivationCache, FactoredMatrix, HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice, get_act_name

__all__ = ["ActivationCache", "FactoredMatrix", "HookPoint", "HookedRootModule", "Slice", "get_act_name"]
