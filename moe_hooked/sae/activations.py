"""Activations of any hook over corpora, as the flat, shuffled batches an SAE trains on.

:class:`HookActivationSource` is an iterator of ``[batch_size d]`` tensors, so it serves as the
``data_provider`` of SAELens's ``SAETrainer`` (which calls ``next`` on it once per step). It
streams corpora with :func:`moe_hooked.corpus.corpus_batches`, runs the model only up to the
hook's block, keeps the real tokens (no padding, and no BOS unless asked) and shuffles rows
across batches in a mixing buffer, so that one batch mixes many texts and domains.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float

from moe_hooked.corpus import corpus_batches

if TYPE_CHECKING:
    from moe_hooked.model import HookedMoETransformer

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def check_hook_name(model: HookedMoETransformer, hook_name: str) -> None:
    """Raise a ValueError naming the closest hook names if `hook_name` is not a hook of `model`."""
    if hook_name not in model.hook_dict:
        close = difflib.get_close_matches(hook_name, list(model.hook_dict), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"'{hook_name}' is not a hook point of this model{hint}: see model.hook_dict for the names")


def hook_layer(hook_name: str) -> int | None:
    """The block index of a `blocks.{l}.` hook name, None for hooks outside the blocks."""
    match = _BLOCK.match(hook_name)
    return int(match.group(1)) if match else None


def _run_until(model: HookedMoETransformer, hook_names: Sequence[str]) -> int | None:
    """`stop_at_layer` that still runs every block holding one of `hook_names` (None: all)."""
    layers = [hook_layer(name) for name in hook_names]
    return None if None in layers else max(layers) + 1


@torch.no_grad()
def cache_hooks(
    model: HookedMoETransformer,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    hook_names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Activations of `hook_names` on `tokens` [batch pos], running only as many blocks as needed.

    Runs inside `model.all_experts()` when a name is `hook_all_expert_out`, which fires only there.
    """
    fires_in_all_experts = any(name.endswith("hook_all_expert_out") for name in hook_names)
    with model.all_experts() if fires_in_all_experts else contextlib.nullcontext():
        _, cache = model.run_with_cache(
            tokens,
            attention_mask=attention_mask,
            names_filter=list(hook_names),
            stop_at_layer=_run_until(model, hook_names),
        )
    return dict(cache.cache_dict)


def hook_width(model: HookedMoETransformer, hook_name: str) -> int:
    """Size of the last dimension of `hook_name`'s activation (an SAE's `d_in` there), read from a
    one-token forward pass."""
    check_hook_name(model, hook_name)
    token = torch.full((1, 1), model.pad_token_id(), dtype=torch.long, device=model.W_E.device)
    cached = cache_hooks(model, token, None, [hook_name])
    if hook_name not in cached:
        raise ValueError(f"'{hook_name}' did not fire on a forward pass: it carries no activation to read")
    return cached[hook_name].shape[-1]


def token_mask(
    model: HookedMoETransformer, tokens: torch.Tensor, attention_mask: torch.Tensor, include_bos: bool
) -> Bool[torch.Tensor, "batch pos"]:
    """True on the tokens whose activations count: real tokens, without BOS unless `include_bos`."""
    mask = attention_mask.bool()
    if not include_bos and model.cfg.default_prepend_bos:
        mask = mask & (tokens != model.bos_token_id())
    return mask


def flat_rows(
    acts: Float[torch.Tensor, "batch pos ..."], mask: Bool[torch.Tensor, "batch pos"]
) -> Float[torch.Tensor, "rows d"]:
    """The activations of the masked tokens as rows [rows d]: one row per token, or per token and
    slot / head when the hook has more dimensions (e.g. `hook_expert_out` [batch pos k d])."""
    if acts.ndim < 3 or acts.shape[:2] != mask.shape:
        raise ValueError(
            f"a hook of shape {tuple(acts.shape)} is not laid out as [batch pos ... d] for tokens "
            f"{tuple(mask.shape)}: choose a per-token hook (not attention patterns or scores)"
        )
    return acts[mask].reshape(-1, acts.shape[-1])


def expert_rows(
    cached: Mapping[str, torch.Tensor], layer: int, expert: int, mask: Bool[torch.Tensor, "batch pos"]
) -> Float[torch.Tensor, "rows d_model"]:
    """Rows of `hook_expert_out` [batch pos k d_model] from the slots that hold `expert` (with a
    non-zero weight) on the masked tokens."""
    mlp = f"blocks.{layer}.mlp."
    chosen = (cached[mlp + "hook_topk_indices"] == expert) & (cached[mlp + "hook_topk_weights"] != 0)
    return cached[mlp + "hook_expert_out"][chosen & mask[..., None]]


class HookActivationSource:
    """Shuffled batches [batch_size d] of one hook's activations over corpora, for ever (or for
    `epochs` passes); an iterator, so it is SAELens's `SAETrainer` data provider as it is.

    Args:
        model: the hooked model.
        hook_name: a full hook name, e.g. "blocks.2.hook_resid_mid" (the router's input),
            "blocks.2.mlp.hook_router_logits", or "blocks.2.mlp.hook_expert_out" with `expert`.
        corpora: {domain: [text, ...]}, e.g. `moe_hooked.data.builtin_corpora()`.
        batch_size: rows per yielded batch.
        buffer_batches: the mixing buffer holds this many batches; when full, half of it
            (shuffled) is yielded and the rest stays to mix with the next activations.
        expert: with `hook_expert_out`, keep only the slots that hold this expert id (rows are
            that expert's outputs [rows d_model]); without it, every slot is a row.
        include_bos: keep the BOS token's activation (off by default: its norm is an outlier).
        epochs: passes over the corpora (None: cycle for ever, as a trainer expects).
        model_batch_size, max_length, max_tokens: as in `corpus_batches` (texts per forward
            pass, chunk length, token budget per domain and pass).
        seed: seed of the shuffling.
        device: where the batches go (default: the model's device).

    The last rows of a finite run that do not fill a batch are dropped, so every batch has
    exactly `batch_size` rows.
    """

    def __init__(
        self,
        model: HookedMoETransformer,
        hook_name: str,
        corpora: Mapping[str, Sequence[str]],
        batch_size: int = 4096,
        buffer_batches: int = 8,
        expert: int | None = None,
        include_bos: bool = False,
        epochs: int | None = None,
        model_batch_size: int = 8,
        max_length: int | None = None,
        max_tokens: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        check_hook_name(model, hook_name)
        if batch_size < 1 or buffer_batches < 2:
            raise ValueError(f"need batch_size >= 1 and buffer_batches >= 2, got {batch_size} and {buffer_batches}")
        self.model, self.hook_name, self.corpora = model, hook_name, corpora
        self.batch_size, self.buffer_size = batch_size, batch_size * buffer_batches
        self.expert, self.include_bos, self.epochs = expert, include_bos, epochs
        self.corpus_kwargs = dict(max_length=max_length, batch_size=model_batch_size, max_tokens=max_tokens)
        self.device = model.W_E.device if device is None else torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.layer = self._check_expert()
        self._batches = self._shuffled_batches()

    def _check_expert(self) -> int | None:
        if self.expert is None:
            return None
        layer = hook_layer(self.hook_name)
        if not self.hook_name.endswith(".mlp.hook_expert_out") or layer not in self.model.cfg.moe_layers:
            raise ValueError(
                f"expert= selects slots of a MoE layer's hook_expert_out, not of '{self.hook_name}': "
                "use blocks.{l}.mlp.hook_expert_out of a MoE layer, or drop expert="
            )
        if not 0 <= self.expert < self.model.cfg.n_experts:
            raise ValueError(f"expert {self.expert} is out of range: this model has experts 0..{self.model.cfg.n_experts - 1}")
        return layer

    @property
    def d_in(self) -> int:
        """Width of the rows (the `d_in` of an SAE trained on them)."""
        return hook_width(self.model, self.hook_name)

    def __iter__(self) -> HookActivationSource:
        return self

    def __next__(self) -> Float[torch.Tensor, "batch_size d"]:
        return next(self._batches)

    def _pass_rows(self) -> Iterator[Float[torch.Tensor, "rows d"]]:
        """The rows of one pass over the corpora, batch of texts by batch of texts."""
        names = [self.hook_name]
        if self.layer is not None:
            names += [f"blocks.{self.layer}.mlp.hook_topk_indices", f"blocks.{self.layer}.mlp.hook_topk_weights"]
        for _, batch in corpus_batches(self.model, self.corpora, progress=False, what="SAE activations", **self.corpus_kwargs):
            cached = cache_hooks(self.model, batch.tokens, batch.attention_mask, names)
            mask = token_mask(self.model, batch.tokens, batch.attention_mask, self.include_bos)
            if self.layer is None:
                yield flat_rows(cached[self.hook_name], mask)
            else:
                yield expert_rows(cached, self.layer, self.expert, mask)

    def _rows(self) -> Iterator[Float[torch.Tensor, "rows d"]]:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            n_rows = 0
            for rows in self._pass_rows():
                n_rows += len(rows)
                yield rows
            if not n_rows:
                what = f"expert {self.expert} was never selected" if self.layer is not None else "no token was kept"
                raise ValueError(f"a pass over the corpora gave no activation of '{self.hook_name}': {what}")
            epoch += 1

    def _shuffled_batches(self) -> Iterator[Float[torch.Tensor, "batch_size d"]]:
        buffer: torch.Tensor | None = None
        for rows in self._rows():
            buffer = rows if buffer is None else torch.cat([buffer, rows])
            if len(buffer) >= self.buffer_size:
                buffer = self._shuffle(buffer)
                n_out = (len(buffer) - self.buffer_size // 2) // self.batch_size * self.batch_size
                yield from buffer[:n_out].to(self.device).split(self.batch_size)
                buffer = buffer[n_out:]
        if buffer is not None:  # a finite run ends: yield what fills whole batches
            buffer = self._shuffle(buffer)
            yield from buffer[: len(buffer) // self.batch_size * self.batch_size].to(self.device).split(self.batch_size)

    def _shuffle(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[torch.randperm(len(rows), generator=self.generator).to(rows.device)]
