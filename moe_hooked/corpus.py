"""Stream corpora through a model: domain -> texts -> padded token batches, with progress bars.

The corpus analyses (routing statistics, top-1 vs top-k cosine, ...) all walk
``{domain: [text, ...]}`` batch by batch with the model's own BOS and padding conventions;
:func:`corpus_batches` is that walk, with the checks on bad input done before any compute.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from tqdm.auto import tqdm

from moe_hooked.data import TokenBatch, iter_token_batches


def check_corpora(model, corpora: Mapping[str, Sequence[str]], what: str) -> None:
    """Raise a ValueError naming the problem if `model` cannot tokenize or a domain is empty."""
    if model.tokenizer is None:
        raise ValueError(
            f"{what} tokenizes text, but this model has no tokenizer (its checkpoint folder had none): "
            "load a folder that contains the tokenizer files, or set model.tokenizer"
        )
    if not isinstance(corpora, Mapping) or not corpora:
        raise ValueError(f"{what} needs a non-empty dict of domain -> list of texts, got {corpora!r:.80}")
    for domain, texts in corpora.items():
        if isinstance(texts, str):
            raise ValueError(f"domain {domain!r}: expected a list of texts, got a single string")
        if not any(text.strip() for text in texts):
            raise ValueError(f"domain {domain!r} is empty: it has no non-blank text")


def corpus_batches(
    model,
    corpora: Mapping[str, Sequence[str]],
    max_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
    what: str = "analysis",
) -> Iterator[tuple[int, TokenBatch]]:
    """Yield `(domain_index, batch)` for every domain in order; `batch.tokens` and
    `batch.attention_mask` [batch pos] are on the model's device.

    Texts longer than `max_length` tokens (default: the model's context `cfg.n_ctx`) are cut
    into chunks, each with its own BOS where the model prepends one. `max_tokens` caps the
    tokens read per domain (BOS included). `what` names the caller in error messages and
    progress bars.
    """
    check_corpora(model, corpora, what)
    max_length = model.cfg.n_ctx if max_length is None else max_length
    if max_length > model.cfg.n_ctx:
        raise ValueError(f"max_length={max_length} exceeds the model's context length n_ctx={model.cfg.n_ctx}")
    prepend_bos = model.cfg.default_prepend_bos
    device = model.W_E.device
    for d, (domain, texts) in enumerate(corpora.items()):
        batches = iter_token_batches(
            model.tokenizer,
            texts,
            max_length,
            batch_size,
            prepend_bos=prepend_bos,
            bos_token_id=model.bos_token_id() if prepend_bos else None,
            pad_token_id=model.pad_token_id(),
            max_tokens=max_tokens,
            domain=domain,
        )
        n_batches = 0
        for batch in tqdm(batches, desc=f"{what}: {domain}", unit="batch", disable=not progress, leave=False):
            n_batches += 1
            yield d, TokenBatch(batch.tokens.to(device), batch.attention_mask.to(device), domain)
        if not n_batches:
            raise ValueError(f"domain {domain!r} produced no tokens (is max_tokens={max_tokens} too small?)")
