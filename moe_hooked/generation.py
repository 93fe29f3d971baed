"""Text generation with hooks, following TransformerLens's `HookedTransformer.generate`.

`model.generate(prompt)` samples a continuation token by token. Hooks added with
`model.hooks(...)` (or any intervention) act at every step::

    with model.hooks(fwd_hooks=ablate_experts(model, {1: [3]})):
        text = model.generate("The cat", max_new_tokens=20, do_sample=False)

With `use_past_kv_cache=True` (the default) the first step runs the prompt and every later
step runs only the one new token, reading the earlier keys and values from a `KVCache`;
the tokens are the same as without the cache. During such a cached step, hooks see
`pos` = the new tokens only (1 after the prompt): activations are [batch 1 ...] and
attention scores/patterns [batch head 1 all_pos]. Position-targeted hooks (e.g.
`ablate_experts(..., positions=[5])`) index the current forward pass, so for them use
`use_past_kv_cache=False`: every step reruns the whole sequence and positions keep their
meaning (with the cache, position 5 would not exist in the one-token steps).

A list of prompts of different lengths is padded on the left; padding gets no attention and
rotary positions count real tokens only, so each row generates what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from moe_hooked.components.kv_cache import KVCache

if TYPE_CHECKING:
    from moe_hooked.model import HookedMoETransformer, ModelInput

GenerateReturnType = Literal["input", "str", "tokens"]


def generate(
    model: HookedMoETransformer,
    input: ModelInput,
    max_new_tokens: int = 10,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    freq_penalty: float = 0.0,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    use_past_kv_cache: bool = True,
    return_type: GenerateReturnType = "input",
    prepend_bos: bool | None = None,
    padding_side: Literal["left"] = "left",
    verbose: bool = True,
) -> str | list[str] | Int[torch.Tensor, "batch pos"]:
    """Generate up to `max_new_tokens` tokens after `input`.

    Args:
        input: a prompt, a list of prompts (left-padded) or token ids [batch pos] / [pos]
            (taken as they are: no BOS added, no padding).
        do_sample: sample from the (filtered) distribution; False: greedy (argmax).
        temperature: logits are divided by it before sampling (0: greedy).
        top_k, top_p: sample among the `top_k` most likely tokens / the smallest set whose
            probability reaches `top_p` (in (0, 1]); None: no filter.
        freq_penalty: subtracted from each token's logit once per occurrence in the row so far.
        stop_at_eos: stop a row at `eos_token_id` (default: the model's); after it the row is
            filled with that EOS token, and generation stops when every row has ended.
        use_past_kv_cache: reuse keys and values (see the module docstring for hook shapes).
        return_type: "str" (a string per prompt, BOS and padding removed), "tokens"
            ([batch prompt_pos + new_pos], padding and BOS included) or "input" (strings for
            text input, tokens for token input).
        prepend_bos: for text input (default: `cfg.default_prepend_bos`).
        padding_side: only "left": every row then continues from its last column.
        verbose: show a progress bar.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got '{return_type}'")
    if padding_side != "left":
        raise ValueError(
            f"padding_side='{padding_side}' is not supported: generate pads prompts on the left so that every "
            "row continues from its last column"
        )
    tokens, mask = _prompt(model, input, prepend_bos)
    _check_length(model, tokens.shape[1], max_new_tokens)
    eos_ids = _eos_ids(model, eos_token_id) if stop_at_eos else None
    cache = KVCache(model.cfg.n_layers) if use_past_kv_cache else None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    new_tokens, new_mask = tokens, mask
    with torch.no_grad():
        for _ in tqdm(range(max_new_tokens), disable=not verbose):
            if cache is None:
                new_tokens, new_mask = tokens, mask
            logits = model(new_tokens, attention_mask=new_mask, past_kv_cache=cache)[:, -1]
            logits = _penalise(logits, tokens, mask, freq_penalty)
            next_tokens = sample_logits(logits, do_sample, temperature, top_k, top_p)
            if eos_ids is not None:
                next_tokens = torch.where(finished, eos_ids[0], next_tokens)
                finished |= torch.isin(next_tokens, eos_ids)
            new_tokens, new_mask = next_tokens[:, None], torch.ones_like(next_tokens[:, None])
            tokens, mask = torch.cat([tokens, new_tokens], dim=1), torch.cat([mask, new_mask], dim=1)
            if eos_ids is not None and bool(finished.all()):
                break
    return _output(model, input, tokens, mask, return_type, prepend_bos)


def sample_logits(
    logits: Float[torch.Tensor, "batch d_vocab"],
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Int[torch.Tensor, " batch"]:
    """One token per row: the argmax, or a sample after temperature, top-k and top-p filtering."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # probability of better tokens
        remove = (before >= top_p).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(remove, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


# ----------------------------------------------------------------------------- checks and inputs
def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (or be None for no filter), got {top_p}")


def _check_length(model: HookedMoETransformer, n_prompt: int, max_new_tokens: int) -> None:
    n_ctx = model.cfg.n_ctx
    if n_prompt > n_ctx:
        raise ValueError(f"the prompt has {n_prompt} tokens, longer than the model's context of {n_ctx}: shorten it")
    if n_prompt + max_new_tokens > n_ctx:
        raise ValueError(
            f"{n_prompt} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's context of {n_ctx}: "
            f"ask for at most {n_ctx - n_prompt} new tokens"
        )


def _prompt(
    model: HookedMoETransformer, input: ModelInput, prepend_bos: bool | None
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """Prompt token ids left-padded, and the mask of real tokens."""
    if isinstance(input, torch.Tensor):
        tokens, _ = model._as_tokens(input, None, prepend_bos)
        return tokens, torch.ones_like(tokens)
    tokens, mask = model._tokenize(input, prepend_bos)  # right-padded
    n_pad = (mask.shape[1] - mask.sum(-1)).tolist()
    left = [(row.roll(pad), row_mask.roll(pad)) for row, row_mask, pad in zip(tokens, mask, n_pad)]
    return torch.stack([row for row, _ in left]), torch.stack([row_mask for _, row_mask in left])


def _eos_ids(model: HookedMoETransformer, eos_token_id: int | Sequence[int] | None) -> Int[torch.Tensor, " n"]:
    if eos_token_id is None:
        eos_token_id = model.cfg.eos_token_id
        if eos_token_id is None and model.tokenizer is not None:
            eos_token_id = model.tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("this model defines no EOS token: pass eos_token_id=..., or stop_at_eos=False")
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        raise ValueError("eos_token_id is an empty list: give at least one id, or stop_at_eos=False")
    return torch.tensor(ids, device=model.W_E.device)


def _penalise(
    logits: Float[torch.Tensor, "batch d_vocab"], tokens: torch.Tensor, mask: torch.Tensor, freq_penalty: float
) -> Float[torch.Tensor, "batch d_vocab"]:
    """Subtract `freq_penalty` times each token's count among the row's real tokens."""
    if not freq_penalty:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(-1, tokens, mask.to(logits.dtype))
    return logits - freq_penalty * counts


def _output(
    model: HookedMoETransformer,
    input: ModelInput,
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Bool[torch.Tensor, "batch pos"],
    return_type: GenerateReturnType,
    prepend_bos: bool | None,
):
    is_text = not isinstance(input, torch.Tensor)
    if return_type == "tokens" or (return_type == "input" and not is_text):
        return tokens[0] if isinstance(input, torch.Tensor) and input.ndim == 1 else tokens
    skip_bos = int(is_text and model._prepend_bos(prepend_bos))
    texts = [model.to_string(row[row_mask.bool()][skip_bos:]) for row, row_mask in zip(tokens, mask)]
    return texts[0] if isinstance(input, str) or (not is_text and input.ndim == 1) else texts


__all__ = ["generate", "sample_logits"]
