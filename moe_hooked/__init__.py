"""moe_hooked: TransformerLens-style hooked Mixture-of-Experts language models."""

from moe_hooked.cache import MoEActivationCache
from moe_hooked.components import HookShapeError
from moe_hooked.components.hook_point import HookDtypeError
from moe_hooked.config import MoEConfig
from moe_hooked.hook_names import HookNameError, get_act_name
from moe_hooked.loading import CheckpointError, UnsupportedArchitectureError
from moe_hooked.model import HookedMoETransformer

__all__ = [
    "CheckpointError",
    "HookDtypeError",
    "HookNameError",
    "HookShapeError",
    "HookedMoETransformer",
    "MoEActivationCache",
    "MoEConfig",
    "UnsupportedArchitectureError",
    "get_act_name",
]
