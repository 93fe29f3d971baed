"""`MoEConfig`: the one architecture description every component reads.

Each loading module (``moe_hooked.loading.<family>``) translates a Hugging Face
``config.json`` into this dataclass; nothing below the loading layer knows which
checkpoint family it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

RouterDtype = Literal["float32", "model"]


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
    d_shared_expert: int | None = None
    """Width of the shared expert (None: no shared expert)."""
    shared_expert_gated: bool = False
    """Multiply the shared expert's output by sigmoid(x W_g) (Qwen1.5-MoE)."""

    # attention details
    qkv_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over the full projected q and k widths before the head split (OLMoE)."""
    clip_qkv: float | None = None
    rope_theta: float = 10000.0

    # norms and embeddings
    eps: float = 1e-6
    tie_word_embeddings: bool = False
    act_fn: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    default_prepend_bos: bool = True
    """Whether tokenising a string prepends BOS: set by each family module to what its tokenizer
    does (DeepSeekMoE: yes; OLMoE and Qwen2-MoE: no)."""

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
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self.moe_layers = tuple(sorted(self.moe_layers))

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

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
        """Return ``expert`` if it is a valid routed-expert id, else raise a ValueError."""
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert id {expert} is out of range: valid ids are 0..{self.n_experts - 1}")
        return expert

    def to_dict(self) -> dict:
        """A JSON-ready summary (no dtype objects, no original config)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "original_config"}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        out["device"] = str(self.device)
        out["moe_layers"] = list(self.moe_layers)
        return out
