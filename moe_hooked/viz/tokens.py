"""Token labels for display: byte-level BPE pieces of one character shown readably.

Byte-level BPE splits a character it has no token for (many CJK characters, emoji) into
several tokens, each holding some of its UTF-8 bytes; decoded alone, each piece is U+FFFD.
:func:`readable_str_tokens` keeps one label per token (so each piece keeps its own column in a
routing view) but labels such a run by the text it spells: the first piece shows the
character(s) once, with its place in the run, the following pieces only their place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int

if TYPE_CHECKING:
    from moe_hooked.model import HookedMoETransformer

REPLACEMENT = "\ufffd"
MAX_PIECES = 8
"""Longest run of tokens searched for a clean decoding (a UTF-8 character has at most 4 bytes,
but a run may start or end inside one)."""


def readable_str_tokens(model: HookedMoETransformer, tokens: Int[torch.Tensor, " pos"] | Sequence[int]) -> list[str]:
    """One label per token of a 1-D sequence: `model.to_str_tokens`, except that a run of
    tokens that only decodes together (pieces of a character) is labelled "中 1/3", "2/3", "3/3"."""
    ids = torch.as_tensor(tokens).tolist()
    labels = model.to_str_tokens(ids)
    i = 0
    while i < len(ids):
        end = _clean_run_end(model, ids, labels, i)
        if end is None:
            i += 1
            continue
        text, n = model.to_string(ids[i:end]), end - i
        labels[i:end] = [f"{text} 1/{n}"] + [f"{j}/{n}" for j in range(2, n + 1)]
        i = end
    return labels


def _clean_run_end(model: HookedMoETransformer, ids: list[int], labels: list[str], start: int) -> int | None:
    """The end of the shortest run from `start` of two or more tokens that decodes without
    U+FFFD, when the token at `start` alone does not; else None."""
    if REPLACEMENT not in labels[start]:
        return None
    for end in range(start + 2, min(start + MAX_PIECES, len(ids)) + 1):
        text = model.to_string(ids[start:end])
        if text and REPLACEMENT not in text:
            return end
    return None
