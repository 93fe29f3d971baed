"""moe_hooked: TransformerLens-style hooked Mixture-of-Experts language models."""

from moe_hooked.config import MoEConfig

__all__ = ["MoEConfig"]
