"""Model components: one concept per class, hook points declared in `__init__`."""

from moe_hooked.components.attention import Attention
from moe_hooked.components.block import TransformerBlock
from moe_hooked.components.embed import Embed, Unembed
from moe_hooked.components.experts import Experts
from moe_hooked.components.hook_point import HookShapeError, MoEHookPoint
from moe_hooked.components.mla_attention import MLAttention
from moe_hooked.components.mlp import GatedMLP
from moe_hooked.components.moe import MoEBlock
from moe_hooked.components.norms import RMSNorm, RMSNormPre
from moe_hooked.components.rotary import RotaryEmbedding
from moe_hooked.components.router import Router

__all__ = [
    "Attention",
    "Embed",
    "Experts",
    "GatedMLP",
    "MLAttention",
    "HookShapeError",
    "MoEBlock",
    "MoEHookPoint",
    "RMSNorm",
    "RMSNormPre",
    "RotaryEmbedding",
    "Router",
    "TransformerBlock",
    "Unembed",
]
