"""Corpora for the analyses: text files, JSONL, HF datasets; chunking, BOS, padding.

Loading returns plain ``list[str]`` (one sample per element) or ``dict[domain, list[str]]``.
Tokenisation streams: :func:`iter_token_batches` walks the texts one at a time, cuts each into
chunks of at most ``max_length`` tokens (BOS included), and yields right-padded
:class:`TokenBatch` es of ``batch_size`` chunks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
BUILTIN_CORPORA_DIR = ("assets", "corpora")

__all__ = [
    "TokenBatch",
    "builtin_corpora",
    "count_tokens",
    "iter_token_batches",
    "iter_token_chunks",
    "load_corpora",
    "load_hf_dataset",
    "load_texts",
]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_txt(path: Path) -> list[str]:
    """One sample per line, stripped, empty lines skipped. Text is otherwise untouched (a
    literal backslash-r-backslash-n sequence inside a line stays as those four characters)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return [line.strip() for line in lines if line.strip()]


def _read_jsonl(path: Path, field: str) -> list[str]:
    """The string ``field`` of every JSON object, one per line (blank lines and empty strings
    skipped)."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
            if not isinstance(record, dict) or field not in record:
                raise KeyError(f"{path}:{lineno}: no field {field!r} in JSONL record")
            text = record[field]
            if not isinstance(text, str):
                kind = type(text).__name__
                raise TypeError(f"{path}:{lineno}: field {field!r} is {kind}, not str")
            if text.strip():
                texts.append(text)
    return texts


def _require_nonempty(texts: list[str], what: str) -> list[str]:
    if not texts:
        raise ValueError(f"{what} contains no text samples")
    return texts


def load_texts(path: str | Path, field: str = "text") -> list[str]:
    """Load a corpus file as a list of samples.

    - ``.txt``: one sample per line, stripped, empty lines skipped.
    - ``.jsonl``: one JSON object per line, the sample is its ``field`` (default ``"text"``).

    Raises ``FileNotFoundError`` (naming the file), ``ValueError`` for an unknown extension or a
    corpus with no samples.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if not path.is_file():
        raise IsADirectoryError(f"corpus path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        texts = _read_txt(path)
    elif suffix in JSONL_SUFFIXES:
        texts = _read_jsonl(path, field)
    else:
        known = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES)
        raise ValueError(
            f"unknown corpus file extension {path.suffix!r} for {path} (expected {known})"
        )
    return _require_nonempty(texts, str(path))


def load_hf_dataset(
    name: str,
    split: str = "train",
    field: str = "text",
    max_samples: int | None = None,
    **kwargs: Any,
) -> list[str]:
    """Load column ``field`` of the first ``max_samples`` rows of
    ``datasets.load_dataset(name, split=split, **kwargs)``, e.g.
    ``load_hf_dataset("json", data_files="x.jsonl")``. Empty strings are skipped."""
    import datasets  # lazy: optional dependency, slow import

    ds = datasets.load_dataset(name, split=split, **kwargs)
    if field not in ds.column_names:
        raise KeyError(f"dataset {name!r} has no column {field!r} (columns: {ds.column_names})")
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    texts = [t for t in ds[field] if isinstance(t, str) and t.strip()]
    return _require_nonempty(texts, f"dataset {name!r} split {split!r}")


def load_corpora(spec: Mapping[str, str | Path | Iterable[str]]) -> dict[str, list[str]]:
    """``{domain: path or list of texts}`` -> ``{domain: list of texts}``. Paths go through
    :func:`load_texts`; every domain must end up non-empty (the error names the domain)."""
    corpora = {}
    for domain, source in spec.items():
        if isinstance(source, (str, Path)):
            try:
                texts = load_texts(source)
            except (OSError, ValueError) as e:
                raise type(e)(f"domain {domain!r}: {e}") from e
        else:
            texts = [t for t in source if t.strip()]
        corpora[domain] = _require_nonempty(texts, f"domain {domain!r}")
    return corpora


def builtin_corpora(domains: Iterable[str] | None = None) -> dict[str, list[str]]:
    """The package's sample corpora (``moe_hooked/assets/corpora/<domain>.txt``), all or the named
    ``domains``: english, french, code, math, chinese."""
    root = resources.files("moe_hooked").joinpath(*BUILTIN_CORPORA_DIR)
    available = {p.name[: -len(".txt")]: p for p in root.iterdir() if p.name.endswith(".txt")}
    wanted = sorted(available) if domains is None else list(domains)
    missing = [d for d in wanted if d not in available]
    if missing:
        raise KeyError(f"no built-in corpus {missing} (available: {sorted(available)})")
    corpora = {}
    for domain in wanted:
        with resources.as_file(available[domain]) as path:
            corpora[domain] = load_texts(path)
    return corpora


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """A right-padded batch of token chunks.

    tokens: ``[batch pos]`` long; attention_mask: ``[batch pos]`` long, 1 on real tokens
    (BOS included), 0 on padding (use ``.bool()`` to index); domain: the corpus's name, if given;
    index: the batch's position in the whole stream over all domains (set by ``corpus_batches``).
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    domain: str | None = None
    index: int | None = None

    @property
    def n_tokens(self) -> int:
        """Number of real (non-pad) tokens in the batch."""
        return int(self.attention_mask.sum())


def _resolve_bos(tokenizer: Any, prepend_bos: bool, bos_token_id: int | None) -> int | None:
    if not prepend_bos:
        return None
    bos = bos_token_id if bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError(
            "prepend_bos=True but the tokenizer has no bos_token_id; pass bos_token_id= "
            "or prepend_bos=False"
        )
    return bos


def _resolve_pad(tokenizer: Any, pad_token_id: int | None) -> int:
    for candidate in (pad_token_id, getattr(tokenizer, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return candidate
    return 0


def iter_token_chunks(
    tokenizer: Any,
    texts: Iterable[str],
    max_length: int,
    prepend_bos: bool = True,
    bos_token_id: int | None = None,
    max_tokens: int | None = None,
) -> Iterator[list[int]]:
    """Yield token-id chunks of at most ``max_length`` ids (BOS included), text by text.

    Each text is tokenised without special tokens and cut into consecutive pieces of
    ``max_length - 1`` ids (``max_length`` without BOS); every piece gets its own BOS. All ids of
    a text appear, in order, across its chunks. Texts with no tokens are skipped.
    ``max_tokens`` is a budget on the total ids yielded (BOS included): the last chunk is cut to
    fit and iteration stops once it is spent.
    """
    bos = _resolve_bos(tokenizer, prepend_bos, bos_token_id)
    prefix = [] if bos is None else [bos]
    body = max_length - len(prefix)
    if body < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text tokens")
    remaining = max_tokens
    for text in texts:
        if remaining is not None and remaining <= len(prefix):
            return
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids), body):
            take = body if remaining is None else min(body, remaining - len(prefix))
            if take < 1:
                return
            chunk = prefix + ids[start : start + take]
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def _pad_batch(chunks: list[list[int]], pad_id: int, domain: str | None) -> TokenBatch:
    """Right-pad ``chunks`` to the longest one: tokens and mask ``[len(chunks) max_len]``."""
    width = max(len(c) for c in chunks)
    tokens = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        tokens[row, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        mask[row, : len(chunk)] = 1
    return TokenBatch(tokens=tokens, attention_mask=mask, domain=domain)


def iter_token_batches(
    tokenizer: Any,
    texts: Iterable[str],
    max_length: int,
    batch_size: int,
    prepend_bos: bool = True,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    max_tokens: int | None = None,
    domain: str | None = None,
) -> Iterator[TokenBatch]:
    """Stream ``texts`` as :class:`TokenBatch` es: ``[batch pos]`` with ``batch <= batch_size``
    and ``pos <= max_length``.

    Chunking, BOS and the ``max_tokens`` budget as in :func:`iter_token_chunks` (BOS id from the
    tokenizer unless ``bos_token_id`` is given; ``ValueError`` if none is known). Padding is on the
    right with ``pad_token_id``, else the tokenizer's pad id, else its EOS id, else 0. Chunks keep
    corpus order; the last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = _resolve_pad(tokenizer, pad_token_id)
    chunks: list[list[int]] = []
    chunk_iter = iter_token_chunks(
        tokenizer, texts, max_length, prepend_bos, bos_token_id, max_tokens
    )
    for chunk in chunk_iter:
        chunks.append(chunk)
        if len(chunks) == batch_size:
            yield _pad_batch(chunks, pad_id, domain)
            chunks = []
    if chunks:
        yield _pad_batch(chunks, pad_id, domain)


def count_tokens(
    tokenizer: Any,
    texts: Iterable[str],
    max_length: int | None = None,
    prepend_bos: bool = True,
    bos_token_id: int | None = None,
) -> int:
    """Number of ids :func:`iter_token_chunks` would yield (BOS per chunk included). Without
    ``max_length`` each text is one chunk."""
    if max_length is not None:
        chunks = iter_token_chunks(tokenizer, texts, max_length, prepend_bos, bos_token_id)
        return sum(len(c) for c in chunks)
    n_bos = int(_resolve_bos(tokenizer, prepend_bos, bos_token_id) is not None)
    lengths = (len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    return sum(n + n_bos for n in lengths if n)
