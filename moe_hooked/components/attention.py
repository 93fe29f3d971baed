"""Llama-style causal self-attention: rotary, grouped-query heads, optional bias, q/k norm and sliding window."""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import nn

from moe_hooked.components.hook_point import MoEHookPoint
from moe_hooked.components.kv_cache import LayerKVCache, causal_mask, rotary_positions
from moe_hooked.components.norms import RMSNorm
from moe_hooked.components.rotary import RotaryEmbedding, apply_rotary
from moe_hooked.config import MoEConfig


class Attention(nn.Module):
    """Causal self-attention.

    Weights in the hub's [out, in] layout: `w_q` [n_heads*d_head, d_model],
    `w_k`/`w_v` [n_kv_heads*d_head, d_model], `w_o` [d_model, n_heads*d_head]; biases
    `b_q`/`b_k`/`b_v` when `cfg.qkv_bias`, `b_o` when `cfg.o_bias`; `q_norm`/`k_norm` when
    `cfg.qk_norm`, over the full projected width or, with `cfg.qk_norm_per_head`, over each
    head's d_head. `sliding_window`: keys further back than that many positions are masked.
    `sinks` [n_heads] when `cfg.attn_sinks` (gpt-oss): each head's sink logit joins the softmax
    over the keys (`hook_sinks` [batch head_index query_pos 1]); `hook_pattern` then holds the
    keys' share only, its rows summing to 1 minus the sink's share. TransformerLens-shaped views: `W_Q`, `W_K`, `W_V` [head d_model d_head],
    `W_O` [head d_head d_model].

    When neither `hook_attn_scores` nor `hook_pattern` is hooked, the pattern is not
    materialised: PyTorch's fused scaled-dot-product attention computes the same result.

    With a `kv_cache` (incremental decoding) the hooks on q, k, v, rot_q, rot_k and z see the
    new positions only ([batch new_pos ...]) and `hook_attn_scores` / `hook_pattern` are
    [batch head_index new_pos all_pos]: the new queries against every cached and new key.
    """

    def __init__(self, cfg: MoEConfig, sliding_window: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.sliding_window = sliding_window
        self.scale = cfg.attn_scale or cfg.d_head**-0.5
        self._init_projections(cfg)
        if cfg.attn_sinks:
            self.sinks = nn.Parameter(torch.empty(cfg.n_heads))
            self.hook_sinks = MoEHookPoint()  # [batch head_index query_pos 1]
        self.hook_q = MoEHookPoint()  # [batch pos head_index d_head]
        self.hook_k = MoEHookPoint()  # [batch pos kv_head_index d_head]
        self.hook_v = MoEHookPoint()  # [batch pos kv_head_index d_head]
        self.hook_rot_q = MoEHookPoint()  # [batch pos head_index d_head]
        self.hook_rot_k = MoEHookPoint()  # [batch pos kv_head_index d_head]
        self.hook_attn_scores = MoEHookPoint()  # [batch head_index query_pos key_pos]
        self.hook_pattern = MoEHookPoint()  # [batch head_index query_pos key_pos]
        self.hook_z = MoEHookPoint()  # [batch pos head_index d_head]

    def _init_projections(self, cfg: MoEConfig) -> None:
        """The projection weights, norms and rotary table (what a subclass like `MLAttention` replaces)."""
        q_width, kv_width = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
        self.w_q = nn.Parameter(torch.empty(q_width, cfg.d_model))
        self.w_k = nn.Parameter(torch.empty(kv_width, cfg.d_model))
        self.w_v = nn.Parameter(torch.empty(kv_width, cfg.d_model))
        self.w_o = nn.Parameter(torch.empty(cfg.d_model, q_width))
        if cfg.qkv_bias:
            self.b_q = nn.Parameter(torch.empty(q_width))
            self.b_k = nn.Parameter(torch.empty(kv_width))
            self.b_v = nn.Parameter(torch.empty(kv_width))
        if cfg.o_bias:
            self.b_o = nn.Parameter(torch.empty(cfg.d_model))
        if cfg.qk_norm:
            per_head = cfg.qk_norm_per_head
            self.q_norm = RMSNorm(cfg.d_head if per_head else q_width, cfg.eps, cfg.norm_gain_float32)
            self.k_norm = RMSNorm(cfg.d_head if per_head else kv_width, cfg.eps, cfg.norm_gain_float32)
        self.rotary = RotaryEmbedding(cfg.d_head, cfg.rope_theta, cfg.rope_yarn)

    @property
    def W_Q(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return einops.rearrange(self.w_q, "(head d_head) d_model -> head d_model d_head", d_head=self.cfg.d_head)

    @property
    def W_K(self) -> Float[torch.Tensor, "kv_head d_model d_head"]:
        return einops.rearrange(self.w_k, "(head d_head) d_model -> head d_model d_head", d_head=self.cfg.d_head)

    @property
    def W_V(self) -> Float[torch.Tensor, "kv_head d_model d_head"]:
        return einops.rearrange(self.w_v, "(head d_head) d_model -> head d_model d_head", d_head=self.cfg.d_head)

    @property
    def W_O(self) -> Float[torch.Tensor, "head d_head d_model"]:
        return einops.rearrange(self.w_o, "d_model (head d_head) -> head d_head d_model", d_head=self.cfg.d_head)

    def _project(self, x, weight, bias, norm) -> Float[torch.Tensor, "batch pos head d_head"]:
        out = F.linear(x, weight, bias)
        if norm is not None and not self.cfg.qk_norm_per_head:
            out = norm(out)
        if self.cfg.clip_qkv is not None:
            out = out.clamp(-self.cfg.clip_qkv, self.cfg.clip_qkv)
        out = out.unflatten(-1, (-1, self.cfg.d_head))
        return norm(out) if norm is not None and self.cfg.qk_norm_per_head else out

    def _pattern_is_hooked(self) -> bool:
        """Whether the pattern must be materialised (hooked, or sinks that the fused kernel lacks)."""
        return self.cfg.attn_sinks or self.hook_attn_scores.is_hooked or self.hook_pattern.is_hooked

    def forward(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        key_mask: Bool[torch.Tensor, "batch pos"] | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """`key_mask` marks the real (non-padding) tokens; padding keys get no attention and
        rotary positions count real tokens only. `kv_cache` holds the earlier positions' keys
        and values (and the padding mask); it replaces `key_mask`."""
        if kv_cache is not None:
            positions = kv_cache.positions
        else:
            positions = None if key_mask is None else rotary_positions(key_mask)
        q, k, v = self.project_qkv(x, positions)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
            mask = kv_cache.mask
        else:
            mask = causal_mask(x.shape[1], x.shape[1], key_mask, x.device)
        z = self.attend(q, k, v, self._windowed(mask))
        return F.linear(z.flatten(-2), self.w_o, getattr(self, "b_o", None))

    def project_qkv(
        self, x: Float[torch.Tensor, "batch pos d_model"], positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [batch pos head d_head], keys and values [batch pos kv_head d_head], the
        queries and keys rotated at `positions` [batch pos] (None: 0..pos-1)."""
        q = self.hook_q(self._project(x, self.w_q, getattr(self, "b_q", None), getattr(self, "q_norm", None)))
        k = self.hook_k(self._project(x, self.w_k, getattr(self, "b_k", None), getattr(self, "k_norm", None)))
        v = self.hook_v(self._project(x, self.w_v, getattr(self, "b_v", None), None))
        cos, sin = self._rotary_tables(positions, x)
        q = self.hook_rot_q(apply_rotary(q, cos, sin))
        k = self.hook_rot_k(apply_rotary(k, cos, sin))
        return q, k, v

    def attend(
        self,
        q: Float[torch.Tensor, "batch pos head d_qk"],
        k: Float[torch.Tensor, "batch key_pos kv_head d_qk"],
        v: Float[torch.Tensor, "batch key_pos kv_head d_v"],
        mask: Bool[torch.Tensor, "batch 1 pos key_pos"],
    ) -> Float[torch.Tensor, "batch pos head d_v"]:
        """softmax(q.k * scale) v where `mask` allows, over heads (kv heads repeated), hooked at `hook_z`."""
        n_rep = q.shape[2] // k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch head pos d]
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if self._pattern_is_hooked():
            z = self._explicit_attention(q, k, v, mask)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.hook_z(z.transpose(1, 2))

    def _windowed(self, mask: Bool[torch.Tensor, "batch 1 pos key_pos"]) -> Bool[torch.Tensor, "batch 1 pos key_pos"]:
        """`mask` without the keys further back than `sliding_window` positions (the queries
        are the last positions of the keys; a query always keeps itself)."""
        if self.sliding_window is None:
            return mask
        n_query, n_key = mask.shape[-2:]
        query_at = torch.arange(n_key - n_query, n_key, device=mask.device)[:, None]
        return mask & (torch.arange(n_key, device=mask.device) > query_at - self.sliding_window)

    def _rotary_tables(
        self, positions: torch.Tensor | None, x: torch.Tensor
    ) -> tuple[Float[torch.Tensor, "batch pos 1 d_rot"], Float[torch.Tensor, "batch pos 1 d_rot"]]:
        """cos/sin at `positions` [batch pos] (None: 0..pos-1), broadcastable over heads, in float32
        with `cfg.rope_float32`, else in `x`'s dtype."""
        n_pos = x.shape[1] if positions is None else int(positions.max()) + 1
        cos, sin = self.rotary(n_pos, torch.float32 if self.cfg.rope_float32 else x.dtype, x.device)
        if positions is None:
            return cos[None, :, None, :], sin[None, :, None, :]
        return cos[positions][:, :, None, :], sin[positions][:, :, None, :]

    def _explicit_attention(self, q, k, v, mask) -> Float[torch.Tensor, "batch head pos d_v"]:
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.scale)  # in place: no second copy
        scores = self.hook_attn_scores(scores.masked_fill_(~mask, torch.finfo(scores.dtype).min))
        if self.cfg.attn_sinks:
            sinks = self.hook_sinks(self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1))
            logits = torch.cat((scores, sinks), dim=-1)
            # minus the max, and the softmax's output, in the scores' dtype, as gpt-oss's reference computes them
            logits = logits - logits.amax(dim=-1, keepdim=True)
            probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
        else:
            probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        pattern = self.hook_pattern(probs.to(q.dtype))
        return torch.matmul(pattern, v)
