"""Multi-head latent attention (MLA) of DeepSeek-V2/V3: queries, keys and values from low-rank latents."""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from moe_hooked.components.attention import Attention
from moe_hooked.components.hook_point import MoEHookPoint
from moe_hooked.components.norms import RMSNorm
from moe_hooked.components.rotary import RotaryEmbedding, apply_rotary
from moe_hooked.config import MoEConfig

LATENT_NORM_EPS = 1e-6
"""The latents' RMSNorms use this eps, not `rms_norm_eps` (as the reference code builds them)."""


class MLAttention(Attention):
    """Causal attention whose keys and values are expanded from a shared latent.

    With `nope` = `cfg.qk_nope_head_dim`, `rope` = `cfg.qk_rope_head_dim`, `d_qk` = nope + rope
    (`cfg.d_head`), `d_v` = `cfg.v_head_dim`, `r_kv` = `cfg.kv_lora_rank`, `r_q` = `cfg.q_lora_rank`:

    - queries: `w_q` [head*d_qk, d_model], or (with `r_q`) `w_q_a` [r_q, d_model] -> RMSNorm
      `q_a_norm` -> `w_q_b` [head*d_qk, r_q];
    - `w_kv_a` [r_kv + rope, d_model] gives the key-value latent (-> RMSNorm `kv_a_norm`) and one
      rotary key part shared by all heads; `w_kv_b` [head*(nope + d_v), r_kv] expands the latent
      into each head's non-rotary key part and value; `w_o` [d_model, head*d_v].
    - the last `rope` dims of queries and keys are rotated (pairs (x0, x1), (x2, x3), ... when
      `cfg.rope_interleaved`; the rotated part is then stored as rotate-half halves, evens then
      odds); the softmax scale is `cfg.attn_scale` (YaRN's correction included).

    Hook points (besides those of `Attention`, all with head = n_heads):
    `hook_q_latent` [batch pos r_q] (normalised; only with `q_lora_rank`),
    `hook_kv_latent` [batch pos r_kv] (normalised), `hook_k_rope` [batch pos rope] (the shared
    rotary key part, before rotation); `hook_q`, `hook_k`, `hook_rot_q`, `hook_rot_k`
    [batch pos head d_qk] (`hook_k`'s last rope dims repeat `hook_k_rope` for every head);
    `hook_v`, `hook_z` [batch pos head d_v]; `hook_attn_scores`, `hook_pattern`
    [batch head query_pos key_pos]. The latents' norms have their own `hook_scale` [batch pos 1]
    and `hook_normalized` (`kv_a_norm.`, `q_a_norm.`; before the gain, which `hook_*_latent` includes).
    """

    def _init_projections(self, cfg: MoEConfig) -> None:
        heads, d_rope = cfg.n_heads, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.w_q = nn.Parameter(torch.empty(heads * cfg.d_head, cfg.d_model))
        else:
            self.w_q_a = nn.Parameter(torch.empty(cfg.q_lora_rank, cfg.d_model))
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.w_q_b = nn.Parameter(torch.empty(heads * cfg.d_head, cfg.q_lora_rank))
            self.hook_q_latent = MoEHookPoint()
        self.w_kv_a = nn.Parameter(torch.empty(cfg.kv_lora_rank + d_rope, cfg.d_model))
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.w_kv_b = nn.Parameter(torch.empty(heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank))
        self.w_o = nn.Parameter(torch.empty(cfg.d_model, heads * cfg.v_head_dim))
        self.rotary = RotaryEmbedding(d_rope, cfg.rope_theta, cfg.rope_yarn)
        self.hook_kv_latent = MoEHookPoint()
        self.hook_k_rope = MoEHookPoint()

    @property
    def W_O(self) -> Float[torch.Tensor, "head d_v d_model"]:
        return einops.rearrange(self.w_o, "d_model (head d_v) -> head d_v d_model", d_v=self.cfg.v_head_dim)

    @property
    def W_Q(self):
        raise NotImplementedError("MLAttention has no per-head W_Q: queries may go through a latent (w_q_a, w_q_b)")

    @property
    def W_K(self):
        raise NotImplementedError("MLAttention has no W_K: keys are expanded from the latent (w_kv_a, w_kv_b)")

    @property
    def W_V(self):
        raise NotImplementedError("MLAttention has no W_V: values are expanded from the latent (w_kv_a, w_kv_b)")

    def project_qkv(
        self, x: Float[torch.Tensor, "batch pos d_model"], positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys [batch pos head d_qk] rotated at `positions` [batch pos] (None:
        0..pos-1), values [batch pos head d_v]."""
        cfg = self.cfg
        q = self.hook_q(self._queries(x))
        latent, k_rope = F.linear(x, self.w_kv_a).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = self.hook_kv_latent(self.kv_a_norm(latent))
        k_rope = self.hook_k_rope(k_rope)
        k_nope, v = F.linear(latent, self.w_kv_b).unflatten(-1, (cfg.n_heads, -1)).split(
            [cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1
        )
        k = self.hook_k(torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, cfg.n_heads, -1)], dim=-1))
        v = self.hook_v(v)
        cos, sin = self._rotary_tables(positions, x)
        return self.hook_rot_q(self._rotate(q, cos, sin)), self.hook_rot_k(self._rotate(k, cos, sin)), v

    def _queries(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos head d_qk"]:
        if self.cfg.q_lora_rank is None:
            q = F.linear(x, self.w_q)
        else:
            q = F.linear(self.hook_q_latent(self.q_a_norm(F.linear(x, self.w_q_a))), self.w_q_b)
        return q.unflatten(-1, (self.cfg.n_heads, -1))

    def _rotate(
        self, t: Float[torch.Tensor, "batch pos head d_qk"], cos: torch.Tensor, sin: torch.Tensor
    ) -> Float[torch.Tensor, "batch pos head d_qk"]:
        """Rotate the last `qk_rope_head_dim` dims of each head; the others pass through."""
        nope, rope = t.split([self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim], dim=-1)
        if self.cfg.rope_interleaved:  # (x0, x1), (x2, x3), ... -> (x0, x2, ..., x1, x3, ...)
            rope = rope.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        return torch.cat([nope, apply_rotary(rope, cos, sin)], dim=-1)
