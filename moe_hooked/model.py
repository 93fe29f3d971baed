"""`HookedMoETransformer`: a native, fully hooked re-implementation of MoE decoders."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from moe_hooked import generation
from moe_hooked._malloc import keep_freed_memory
from moe_hooked._tl import HookedRootModule
from moe_hooked.cache import MoEActivationCache
from moe_hooked.components import Embed, MoEBlock, MoEHookPoint, RMSNormPre, TransformerBlock, Unembed
from moe_hooked.components.expert_store import ExpertStore, offload_experts, parse_memory_budget
from moe_hooked.components.kv_cache import KVCache
from moe_hooked.config import MoEConfig
from moe_hooked.hook_names import HookPointNames
from moe_hooked.sae import splice as sae_splice
from moe_hooked.weights import TransformerLensWeights

if TYPE_CHECKING:
    from sae_lens import SAE

ModelInput = str | Sequence[str] | Sequence[int] | Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, " pos"]
ReturnType = Literal["logits", "loss", "both"] | None


class HookedMoETransformer(TransformerLensWeights, HookedRootModule):
    """A decoder-only MoE language model whose every internal step is a hook point.

    TransformerLens's weight API (`W_Q` ... `b_O`, `QK`, `OV`) is documented in `moe_hooked.weights`.

    Build it with `from_pretrained` (a hub id, a local checkpoint folder, or
    "moe-hooked/demo"); see `docs/design.md` for the hook names and shapes.
    """

    def __init__(self, cfg: MoEConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = MoEHookPoint()  # [batch pos d_model]
        self.blocks = nn.ModuleList(TransformerBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = RMSNormPre(cfg.eps, cfg.norm_gain_float32)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)
        self.expert_store: ExpertStore | None = None
        """Where the routed experts live when loaded with `expert_memory` (else None)."""
        self.setup()
        keep_freed_memory()  # caches reuse freed memory instead of faulting it in again (see moe_hooked/_malloc.py)

    def setup(self) -> None:
        """As TransformerLens; an unknown hook name then raises `HookNameError` with suggestions."""
        super().setup()
        self.mod_dict = HookPointNames(self.mod_dict, self.cfg.moe_layers)
        self.hook_dict = HookPointNames(self.hook_dict, self.cfg.moe_layers)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        router_dtype: Literal["float32", "model"] | None = None,
        check_finite: bool = False,
        expert_memory: int | str | None = None,
    ) -> HookedMoETransformer:
        """Load a checkpoint in Hugging Face format (config.json + safetensors).

        `dtype=None` runs in config.json's `dtype` (else the stored tensors'), as transformers'
        `dtype="auto"` does; `device=None` picks CUDA when available (as TransformerLens does),
        else the CPU; an explicit `device` always wins; `router_dtype`
        overrides where the router softmax runs ("float32" or "model"; default: as the architecture
        does); `check_finite=True` refuses a checkpoint with NaN/Inf weights, listing all of them.
        `expert_memory` (bytes, or a size such as "2GiB", "512MiB", "1.5GB"): keep the routed
        experts in the checkpoint files and at most this many bytes of them on `device`,
        read on demand (see `expert_memory_stats`); None loads everything into memory.
        """
        from moe_hooked.loading import load_pretrained

        budget = parse_memory_budget(expert_memory)
        return load_pretrained(
            cls, name_or_path, dtype=dtype, device=device, revision=revision, router_dtype=router_dtype,
            check_finite=check_finite, expert_memory_bytes=budget,
        )

    def offload_experts(self, files: Sequence, weight_map: dict, budget_bytes: int) -> set[str]:
        """Used by `from_pretrained(expert_memory=...)` on the meta-device model: routed experts
        are read from `files` on demand; returns the hub keys of `weight_map` left to the store."""
        self.expert_store, keys = offload_experts(self, files, weight_map, budget_bytes)
        return keys

    def expert_memory_stats(self) -> dict[str, int | float]:
        """Counters of the expert store (see `ExpertStore.stats`): `budget_bytes`,
        `peak_resident_bytes`, `bytes_read`, `hits`, `misses`, `prefetched`, `prefetch_hits`, ..."""
        if self.expert_store is None:
            raise ValueError("this model holds its experts in memory: load it with expert_memory=... to stream them")
        return self.expert_store.stats()

    # ------------------------------------------------------------------ weights
    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        """Unembedding with the final RMSNorm gain folded in: logits = ln_final(x) @ W_U.

        Computed on access ([d_model d_vocab]); `model.unembed(ln_final(x))` gives the
        logits without materialising it."""
        return self.unembed.W_U

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """The sum of the output biases of the attention (and MLP) layers before `layer`, as
        TransformerLens computes it; zero [d_model]: no supported family has output biases."""
        return torch.zeros(self.cfg.d_model, dtype=self.W_E.dtype, device=self.W_E.device)

    @property
    def moe_blocks(self) -> dict[int, MoEBlock]:
        """The MoE blocks by layer index."""
        return {layer: self.blocks[layer].mlp for layer in self.cfg.moe_layers}

    def tokens_to_residual_directions(
        self, tokens: str | int | Int[torch.Tensor, "..."]
    ) -> Float[torch.Tensor, "... d_model"]:
        """The residual direction (column of W_U) whose dot product with ln_final(x) is each token's logit."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return self.unembed.directions(torch.as_tensor(tokens, device=self.unembed.weight.device))

    # ------------------------------------------------------------------ tokens
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (the checkpoint folder had none): pass token ids instead of text")
        return self.tokenizer

    def _prepend_bos(self, prepend_bos: bool | None) -> bool:
        return self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos

    def _tokenize(
        self, text: str | Sequence[str], prepend_bos: bool | None = None
    ) -> tuple[Int[torch.Tensor, "batch pos"], torch.Tensor]:
        """Token ids right-padded to the longest text, and the mask of real tokens."""
        tokenizer = self._require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                "expected a string, a non-empty list of strings, or token ids (a list of ints or an integer "
                f"tensor); got {text!r:.80}"
            )
        bos = [self.bos_token_id()] if self._prepend_bos(prepend_bos) else []
        ids = [bos + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        longest = max(len(x) for x in ids)
        if longest == 0:
            raise ValueError("the text is empty and no BOS token is prepended: there is nothing to run")
        pad = self.pad_token_id()
        tokens = torch.tensor([x + [pad] * (longest - len(x)) for x in ids], dtype=torch.long)
        mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids], dtype=torch.long)
        return tokens.to(self.W_E.device), mask.to(self.W_E.device)

    def bos_token_id(self) -> int:
        bos = self.cfg.bos_token_id
        if bos is None and self.tokenizer is not None:
            bos = self.tokenizer.bos_token_id
        if bos is None:
            raise ValueError("this model defines no BOS token: call with prepend_bos=False")
        return bos

    def pad_token_id(self) -> int:
        for candidate in (self.cfg.pad_token_id, getattr(self.tokenizer, "pad_token_id", None), self.cfg.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def to_tokens(
        self, text: str | Sequence[str], prepend_bos: bool | None = None, return_attention_mask: bool = False
    ) -> Int[torch.Tensor, "batch pos"] | tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
        """Token ids [batch pos] of a string or list of strings, right-padded with the pad token.

        With `return_attention_mask`, returns (tokens, attention_mask [batch pos], 1 on real
        tokens): pass the mask to `forward`/`run_with_cache` so padding is not read as text.
        """
        tokens, mask = self._tokenize(text, prepend_bos)
        return (tokens, mask) if return_attention_mask else tokens

    def to_string(self, tokens: Int[torch.Tensor, "..."] | Sequence[int]) -> str | list[str]:
        """Decode one id or a 1-D sequence of ids to a string, or a 2-D batch to a list of strings."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [self.to_string(row) for row in tokens]
        return self._require_tokenizer().decode(self._decodable(tokens))

    def _decodable(self, tokens: torch.Tensor) -> list[int]:
        """The ids of a 0-D or 1-D tensor, checked to lie in the tokenizer's vocabulary (else a ValueError)."""
        size = len(self._require_tokenizer())
        ids = tokens.flatten().tolist()
        outside = sorted({i for i in ids if not 0 <= i < size})
        if outside:
            raise ValueError(f"token ids {outside[:10]} lie outside the tokenizer's vocabulary [0, {size}): they decode to nothing")
        return ids

    def to_str_tokens(
        self, input: str | Sequence[str] | Int[torch.Tensor, "..."] | Sequence[int], prepend_bos: bool | None = None
    ) -> list[str] | list[list[str]]:
        """One decoded string per token, for a string or a 1-D sequence of ids; a list of
        strings (or a 2-D batch of ids) gives one such list per sequence."""
        if isinstance(input, Sequence) and not isinstance(input, str) and input and isinstance(input[0], str):
            return [self.to_str_tokens(text, prepend_bos) for text in input]
        tokens = self.to_tokens(input, prepend_bos)[0] if isinstance(input, str) else torch.as_tensor(input)
        if tokens.ndim == 2:
            return [self.to_str_tokens(row) for row in tokens] if tokens.shape[0] > 1 else self.to_str_tokens(tokens[0])
        tokenizer = self._require_tokenizer()
        return [tokenizer.decode([t]) for t in self._decodable(tokens)]

    def to_single_token(self, string: str) -> int:
        tokens = self.to_tokens(string, prepend_bos=False)[0]
        if tokens.numel() != 1:
            raise ValueError(f"'{string}' is {tokens.numel()} tokens, not one")
        return int(tokens.item())

    def to_single_str_token(self, token: int) -> str:
        """The string of one token id."""
        if not 0 <= int(token) < self.cfg.d_vocab:
            raise ValueError(f"token id {token} is out of range: the vocabulary has ids 0..{self.cfg.d_vocab - 1}")
        return self.to_str_tokens([int(token)])[0]

    def get_token_position(
        self,
        single_token: str | int,
        input: str | Int[torch.Tensor, " pos"] | Int[torch.Tensor, "1 pos"],
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
    ) -> int:
        """Position of `single_token` (a one-token string or an id) in `input` (text, tokenised
        with `prepend_bos`, or token ids): its first or last occurrence."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got '{mode}'")
        tokens = self.to_tokens(input, prepend_bos) if isinstance(input, str) else torch.as_tensor(input)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError("get_token_position takes a single sequence; index the batch first")
            tokens = tokens[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        found = (tokens == token).nonzero().squeeze(1)
        if found.numel() == 0:
            raise ValueError(f"token {single_token!r} (id {token}) does not occur in the input")
        return int(found[0] if mode == "first" else found[-1])

    def _as_tokens(
        self, input: ModelInput, attention_mask: torch.Tensor | None, prepend_bos: bool | None
    ) -> tuple[Int[torch.Tensor, "batch pos"], torch.Tensor | None]:
        if isinstance(input, Sequence) and input and all(isinstance(t, int) and not isinstance(t, bool) for t in input):
            input = torch.tensor(input)  # a list of ints: one sequence of token ids
        if isinstance(input, str) or (isinstance(input, Sequence) and not isinstance(input, torch.Tensor)):
            return self._tokenize(input, prepend_bos)
        if input.ndim not in (1, 2) or input.numel() == 0:
            raise ValueError(f"token ids must be a non-empty tensor [batch pos] or [pos], got shape {tuple(input.shape)}")
        tokens = input if input.ndim == 2 else input[None]
        if tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"token ids must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab):
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.d_vocab}) (the vocabulary size), "
                f"got min {int(tokens.min())} and max {int(tokens.max())}"
            )
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from tokens {tuple(tokens.shape)}")
        if attention_mask is None:
            self._warn_if_right_padded(tokens)
        return tokens.to(self.W_E.device).long(), attention_mask

    def _warn_if_right_padded(self, tokens: Int[torch.Tensor, "batch pos"]) -> None:
        """Token rows of which some, not all, end in the pad id look like a padded batch without its mask."""
        ends_in_pad = tokens[:, -1] == self.pad_token_id()
        if tokens.shape[0] > 1 and bool(ends_in_pad.any()) and not bool(ends_in_pad.all()):
            warnings.warn(
                f"some token rows end in the pad token (id {self.pad_token_id()}) and some do not: if this is a "
                "padded batch, pass its attention_mask (tokens, mask = model.to_tokens(texts, "
                "return_attention_mask=True)), or the pad positions count as text in the loss and the lenses",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: ModelInput,
        return_type: ReturnType = "logits",
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        prepend_bos: bool | None = None,
        loss_per_token: bool = False,
        stop_at_layer: int | None = None,
        past_kv_cache: KVCache | None = None,
    ):
        """Run the model.

        `input`: a string, a list of strings (right-padded, masked), token ids [batch pos] or
        [pos], or a list of ints (one sequence of token ids).
        `attention_mask` [batch pos]: 1 for real tokens (only with token-id input).
        `return_type`: "logits" [batch pos d_vocab], "loss" (mean next-token loss over real
        tokens; [batch pos-1] with `loss_per_token`), "both" (logits, loss) or None.
        `stop_at_layer`: return the residual stream entering that block instead.
        `past_kv_cache` (see `generate`): the tokens continue the cached ones; the cache
        receives their keys and values, `attention_mask` covers the new tokens only, and
        hooks see the new positions only (attention patterns: [batch head new_pos all_pos]).
        """
        tokens, mask = self._as_tokens(input, attention_mask, prepend_bos)
        key_mask = None if mask is None or bool(mask.all()) else mask.bool()
        if past_kv_cache is not None:
            past_kv_cache.extend(torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask)
        resid = self.hook_embed(self.embed(tokens)).to(self.W_E.dtype)
        for layer, block in enumerate(self.blocks[:stop_at_layer]):
            resid = block(resid, key_mask, None if past_kv_cache is None else past_kv_cache[layer])
        if stop_at_layer is not None:
            return resid
        if return_type is None:
            return None
        logits = self.unembed(self.ln_final(resid))
        if return_type == "logits":
            return logits
        loss = self.loss(logits, tokens, mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    @staticmethod
    def loss(
        logits: Float[torch.Tensor, "batch pos d_vocab"],
        tokens: Int[torch.Tensor, "batch pos"],
        mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """Next-token cross-entropy (natural log), averaged over real targets."""
        if logits.shape[1] < 2:
            raise ValueError(
                f"the loss needs sequences of at least 2 tokens (a token and the next one to predict), "
                f"got {logits.shape[1]}"
            )
        log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        target_mask = torch.ones_like(nll) if mask is None else mask[:, 1:].to(nll.dtype)
        if per_token:
            return nll * target_mask
        return (nll * target_mask).sum() / target_mask.sum().clamp(min=1)

    def run_with_cache(self, *model_args, **kwargs) -> tuple[torch.Tensor, MoEActivationCache]:
        """As TransformerLens: returns (output, cache); the cache is an `ActivationCache`
        whose `attention_mask` [batch pos] is the mask of the run (None: every token real)."""
        names = kwargs.get("names_filter")
        for name in [names] if isinstance(names, str) else names if isinstance(names, (list, tuple)) else []:
            self.hook_dict[name]  # an unknown name raises HookNameError
        args = list(model_args) or [kwargs.pop("input")]
        args[0], mask = self._as_tokens(args[0], kwargs.pop("attention_mask", None), kwargs.pop("prepend_bos", None))
        out, cache_dict = super().run_with_cache(*args, attention_mask=mask, **kwargs)
        has_batch_dim = not kwargs.get("remove_batch_dim", False)
        return out, MoEActivationCache(cache_dict, self, has_batch_dim=has_batch_dim, attention_mask=mask)

    def generate(self, input: ModelInput, max_new_tokens: int = 10, **kwargs):
        """Sample a continuation, as TransformerLens's `HookedTransformer.generate`: see
        `moe_hooked.generation.generate` for the arguments."""
        return generation.generate(self, input, max_new_tokens, **kwargs)

    @contextlib.contextmanager
    def all_experts(self) -> Iterator[HookedMoETransformer]:
        """Within this context every MoE layer also runs every expert on every token and
        exposes `blocks.{l}.mlp.hook_all_expert_out` [batch pos n_experts d_model].

        Costs n_experts / k times the routed-expert compute and
        batch * pos * n_experts * d_model values per layer while the hook is cached.
        """
        blocks = list(self.moe_blocks.values())
        for block in blocks:
            block.compute_all_experts = True
        try:
            yield self
        finally:
            for block in blocks:
                block.compute_all_experts = False

    # ------------------------------------------------------------------ SAEs (moe_hooked.sae)
    def add_sae(self, sae: SAE, use_error_term: bool | None = None) -> str:
        """Splice a SAELens SAE in at its hook (`sae.cfg.metadata.hook_name`) until `reset_saes`;
        its features appear as `<hook>.hook_sae_acts_post` [batch pos d_sae]. See `moe_hooked.sae.add_sae`."""
        return sae_splice.add_sae(self, sae, use_error_term)

    def reset_saes(self, hook_names: Sequence[str] | None = None) -> None:
        """Remove the SAEs spliced at `hook_names` (default: all)."""
        sae_splice.reset_saes(self, hook_names)

    def saes(self, saes: Sequence[SAE], use_error_term: bool | None = None) -> contextlib.AbstractContextManager:
        """`with model.saes([sae, ...]):` splices the SAEs in for the block's duration."""
        return sae_splice.saes(self, saes, use_error_term)
