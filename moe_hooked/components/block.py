"""A pre-norm transformer block whose MLP is dense or MoE."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import nn

from moe_hooked.components.attention import Attention
from moe_hooked.components.hook_point import MoEHookPoint
from moe_hooked.components.kv_cache import LayerKVCache
from moe_hooked.components.mla_attention import MLAttention
from moe_hooked.components.mlp import GatedMLP
from moe_hooked.components.moe import MoEBlock
from moe_hooked.components.norms import RMSNorm
from moe_hooked.config import MoEConfig


class TransformerBlock(nn.Module):
    """resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid))."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_gain_float32)
        self.attn = MLAttention(cfg) if cfg.attention_type == "mla" else Attention(cfg, cfg.attention_window(layer))
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_gain_float32)
        self.mlp = MoEBlock(cfg) if cfg.is_moe_layer(layer) else GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn)
        self.hook_resid_pre = MoEHookPoint()  # [batch pos d_model]
        self.hook_attn_out = MoEHookPoint()  # [batch pos d_model]
        self.hook_resid_mid = MoEHookPoint()  # [batch pos d_model]
        self.hook_mlp_out = MoEHookPoint()  # [batch pos d_model]
        self.hook_resid_post = MoEHookPoint()  # [batch pos d_model]

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEBlock)

    def forward(
        self,
        resid_pre: Float[torch.Tensor, "batch pos d_model"],
        key_mask: Bool[torch.Tensor, "batch pos"] | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), key_mask, kv_cache))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)
