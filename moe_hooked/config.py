"""`MoEConfig`: the one architecture description every component reads.

Each loading module (``moe_hooked.loading.<family>``) translates a Hugging Face
``config.json`` into this dataclass; nothing below the loading layer knows which
checkpoint family it runs.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

RouterDtype = Literal["float32", "model"]
RouterScoring = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]
AttentionType = Literal["standard", "mla"]


@dataclass
class MoEConfig:
    """Architecture of a decoder-only Mixture-of-Experts transformer.

    Attention is Llama-style (rotary, optional grouped-query heads, optional q/k/v
    bias, optional RMSNorm on the projected queries/keys). Each layer's MLP is either
    a dense SwiGLU MLP or a MoE block (router + routed SwiGLU experts + optional
    shared expert, optionally gated).
    """

    architecture: str
    """Checkpoint family, the ``model_type`` of its config.json (e.g. "olmoe")."""
    d_model: int
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    """Context length the checkpoint was trained for (``max_position_embeddings``)."""

    # MoE routing
    n_experts: int
    top_k: int
    d_expert: int
    """Width of one routed expert (``moe_intermediate_size`` / ``intermediate_size``)."""
    moe_layers: tuple[int, ...]
    """Indices of the layers whose MLP is a MoE block; the others are dense."""
    d_mlp: int | None = None
    """Width of the dense MLP of non-MoE layers (None when every layer is MoE)."""
    norm_topk_prob: bool = False
    """Renormalise the top-k weights to sum to one."""
    norm_topk_eps: float = 0.0
    """Added to the denominator of the renormalisation (DeepSeekMoE uses 1e-20)."""
    router_dtype: RouterDtype = "float32"
    """Where the router softmax runs: "float32" (OLMoE, Qwen) or "model" (the
    parameter dtype, as the original DeepSeekMoE code does)."""
    router_topk_softmax: bool = False
    """The weights are the softmax of the chosen experts' logits, in the logits' dtype (gpt-oss:
    top-k first, softmax second), instead of their probabilities renormalised: the same numbers in
    exact arithmetic, rounded differently in low precision. Editing `hook_router_probs` then changes
    which experts are chosen, not their weights."""
    topk_weights_float32: bool = False
    """The top-k weights stay in float32 and scale the expert outputs in float32 before the cast
    to the model dtype (Mixtral, DeepSeek-V2/V3), instead of being cast to the model dtype first
    (OLMoE, Qwen, gpt-oss, DeepSeekMoE): this changes low-precision results only."""
    d_shared_expert: int | None = None
    """Width of the shared expert (None: no shared expert)."""
    shared_expert_gated: bool = False
    """Multiply the shared expert's output by sigmoid(x W_g) (Qwen1.5-MoE)."""

    # DeepSeek-V2/V3 routing: sigmoid scores, a selection-only bias, grouped top-k, scaled weights
    router_scoring: RouterScoring = "softmax"
    """How the router turns logits into scores: "softmax" over experts or an elementwise "sigmoid" (V3)."""
    router_logits_float32: bool = False
    """Compute the router logits in float32 (input and weight upcast), as DeepSeek-V2/V3 do."""
    router_selection_bias: bool = False
    """A per-expert bias `Router.selection_bias` (the hub's `e_score_correction_bias`) is added to the
    scores to choose the experts only; the weights come from the unbiased scores (V3)."""
    n_expert_groups: int = 1
    """Experts form this many equal groups (`n_group`); only `topk_groups` of them are eligible per token."""
    topk_groups: int = 1
    """How many expert groups each token may use (`topk_group`)."""
    group_score: GroupScore = "max"
    """How a group is ranked: its best expert's score ("max", V2) or the sum of its two best ("top2_sum", V3)."""
    routed_scaling_factor: float = 1.0
    """The top-k weights are multiplied by this after any renormalisation."""

    # multi-head latent attention (DeepSeek-V2/V3); d_head is then qk_nope_head_dim + qk_rope_head_dim
    attention_type: AttentionType = "standard"
    """"standard" (`Attention`: q/k/v projections) or "mla" (`MLAttention`: low-rank latents)."""
    q_lora_rank: int | None = None
    """Width of the query latent (None: queries are one projection of the residual stream)."""
    kv_lora_rank: int = 0
    """Width of the key-value latent that `kv_b_proj` expands into per-head keys and values."""
    qk_nope_head_dim: int = 0
    """Per-head query/key width without rotary position."""
    qk_rope_head_dim: int = 0
    """Per-head query/key width that is rotated; the key part is shared by all heads."""
    v_head_dim: int = 0
    """Per-head value width."""
    rope_interleaved: bool = False
    """The rotated dims pair up as (x0, x1), (x2, x3), ... instead of the two halves (DeepSeek)."""
    rope_float32: bool = False
    """Rotate queries and keys in float32 with float32 cos/sin, then cast back (DeepSeek-V2's
    complex-number rotation), instead of in the model dtype with cos/sin cast to it: this changes
    low-precision results only."""
    attn_scale: float | None = None
    """Multiplier of q.k in the attention softmax (None: d_head ** -0.5)."""

    # attention details
    qkv_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over the full projected q and k widths before the head split (OLMoE)."""
    clip_qkv: float | None = None

    # attention variants (Qwen3-MoE, Mixtral, gpt-oss)
    qk_norm_per_head: bool = False
    """With `qk_norm`: RMSNorm over each head's d_head after the head split (Qwen3-MoE)
    instead of over the full projected width."""
    o_bias: bool = False
    """The output projection has a bias (`attention_bias` of Qwen3-MoE and gpt-oss)."""
    sliding_window: int | None = None
    """Query i attends to keys j with i - sliding_window < j <= i in `sliding_window_layers`."""
    sliding_window_layers: tuple[int, ...] = ()
    """Layers whose attention uses `sliding_window` (gpt-oss: its "sliding_attention" layer_types)."""
    attn_sinks: bool = False
    """Each head has a learned sink logit (`attn.sinks` [n_heads]) that joins the softmax over the
    keys and takes its share of the attention without contributing a value (gpt-oss)."""

    # router and expert variants (gpt-oss)
    router_bias: bool = False
    """The router linear has a bias: `hook_router_logits` are the biased logits."""
    expert_bias: bool = False
    """Each routed expert's gate, up and down projections have biases."""
    swiglu_limit: float | None = None
    """gpt-oss's clamped SwiGLU: with gate clamped to <= limit and up to [-limit, limit], the
    expert hidden state is (up + 1) * gate * sigmoid(swiglu_alpha * gate). None: act(gate) * up."""
    swiglu_alpha: float = 1.0
    """The sigmoid's slope in the clamped SwiGLU (only with `swiglu_limit`)."""
    rope_theta: float = 10000.0
    rope_yarn: dict | None = None
    """YaRN RoPE scaling: transformers' `rope_parameters` (factor, original_max_position_embeddings,
    beta_fast, beta_slow, mscale, mscale_all_dim, truncate, attention_factor); None for plain RoPE."""

    # norms and embeddings
    eps: float = 1e-6
    norm_gain_float32: bool = False
    """RMSNorm gains multiply the float32 normalized value before the cast back to the model dtype
    (gpt-oss), instead of the cast value (Llama and the other families): this changes bfloat16 results only."""
    tie_word_embeddings: bool = False
    act_fn: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    default_prepend_bos: bool = True
    """Whether tokenising a string prepends BOS: set by each family module (its `PREPENDS_BOS`) to
    what that family's tokenizer does."""

    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    original_config: dict = field(default_factory=dict, repr=False)
    """The config.json this was translated from, kept for reports and checks."""

    # TransformerLens's ActivationCache reads these.
    normalization_type: str = "RMS"
    attn_only: bool = False
    final_rms: bool = True
    positional_embedding_type: str = "rotary"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads ({self.n_key_value_heads})"
            )
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if not set(self.moe_layers) <= set(range(self.n_layers)):
            raise ValueError(f"moe_layers {self.moe_layers} must lie in [0, {self.n_layers})")
        if len(self.moe_layers) < self.n_layers and self.d_mlp is None:
            raise ValueError("d_mlp is required when some layers are dense")
        if self.router_dtype not in ("float32", "model"):
            raise ValueError(f"router_dtype must be 'float32' or 'model', got '{self.router_dtype}'")
        self._check_expert_groups()
        if self.attention_type not in ("standard", "mla"):
            raise ValueError(f"attention_type must be 'standard' or 'mla', got '{self.attention_type}'")
        if self.router_scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router_scoring must be 'softmax' or 'sigmoid', got '{self.router_scoring}'")
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self.moe_layers = tuple(sorted(self.moe_layers))
        self.sliding_window_layers = tuple(sorted(self.sliding_window_layers))
        if self.sliding_window_layers and not self.sliding_window:
            raise ValueError("sliding_window_layers needs a positive sliding_window")

    def _check_expert_groups(self) -> None:
        groups, per_group = self.n_expert_groups, self.n_experts // max(self.n_expert_groups, 1)
        if groups < 1 or self.n_experts % groups:
            raise ValueError(f"n_expert_groups ({groups}) must divide n_experts ({self.n_experts})")
        if not 1 <= self.topk_groups <= groups:
            raise ValueError(f"topk_groups must be in [1, n_expert_groups={groups}], got {self.topk_groups}")
        if self.top_k > self.topk_groups * per_group:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds the {self.topk_groups} x {per_group} experts of the groups a token "
                "may use: raise topk_groups"
            )
        if self.group_score == "top2_sum" and per_group < 2:
            raise ValueError(f"group_score 'top2_sum' needs at least 2 experts per group, got {per_group}")

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def attention_window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention, None for full causal attention."""
        return self.sliding_window if layer in self.sliding_window_layers else None

    def check_moe_layer(self, layer: int) -> int:
        """Return ``layer`` if it is a MoE layer, else raise a ValueError naming the valid ones."""
        if layer not in self.moe_layers:
            raise ValueError(
                f"layer {layer} is not a MoE layer of this {self.architecture} model; "
                f"MoE layers are {list(self.moe_layers)}"
            )
        return layer

    def check_top_k(self, k: int) -> int:
        """Return `k` if 1 <= k <= top_k, else raise a ValueError naming the range."""
        if not 1 <= k <= self.top_k:
            raise ValueError(f"k must be in 1..{self.top_k} (the model's top-k), got {k}")
        return k

    def resolve_moe_layers(self, layers: int | Iterable[int] | None) -> list[int]:
        """MoE layer ids: all of them for None, else the given ones, each checked."""
        if layers is None:
            return list(self.moe_layers)
        layers = [layers] if isinstance(layers, int) else list(layers)
        if not layers:
            raise ValueError(f"no layer given: pick MoE layers among {list(self.moe_layers)}")
        return [self.check_moe_layer(layer) for layer in layers]

    def check_expert(self, expert: int) -> int:
        """``expert`` as an int if it is a valid routed-expert id: a whole number (int, numpy or
        0-d torch integer; not a bool) in 0..n_experts-1. Anything else raises a ValueError."""
        try:
            if isinstance(expert, bool):
                raise TypeError
            expert = operator.index(expert)
        except TypeError:
            raise ValueError(
                f"expert ids must be whole numbers, got {expert!r}: valid ids are 0..{self.n_experts - 1}"
            ) from None
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert id {expert} is out of range: valid ids are 0..{self.n_experts - 1}")
        return expert

    def resolve_experts(self, experts: int | Iterable[int] | None) -> list[int]:
        """Routed-expert ids: all of them for None, else the one or many given, each checked
        (`check_expert`) and distinct. An empty iterable gives an empty list."""
        if experts is None:
            return list(range(self.n_experts))
        many = isinstance(experts, Iterable) and not (isinstance(experts, torch.Tensor) and experts.ndim == 0)
        ids = [self.check_expert(e) for e in experts] if many else [self.check_expert(experts)]
        if len(set(ids)) != len(ids):
            raise ValueError(f"expert ids {ids} contain duplicates: give each expert once")
        return ids

    def to_dict(self) -> dict:
        """A JSON-ready summary (no dtype objects, no original config)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "original_config"}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        out["device"] = str(self.device)
        out["moe_layers"] = list(self.moe_layers)
        return out
