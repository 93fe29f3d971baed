"""Stream corpora through a model: domain -> texts -> padded token batches, with progress bars;
and the data parallelism of every corpus analysis across processes (``torch.distributed``).

The corpus analyses (routing statistics, top-1 vs top-k cosine, ...) all walk
``{domain: [text, ...]}`` batch by batch with the model's own BOS and padding conventions;
:func:`corpus_batches` is that walk, with the checks on bad input done before any compute.

When a ``torch.distributed`` process group is initialised (e.g. under ``torchrun``), the same
code runs data-parallel, and this module is the only place that knows it:

- :func:`corpus_batches` deals the global sequence of batches by size: a few batches per rank
  at a time, each to the rank with the fewest padded tokens so far (:func:`deal`), so no rank
  has more than one batch's worth of work beyond another's; the union over ranks is exactly the
  single-process sequence, and a rank may get none. Before dealing, the ranks compare a
  fingerprint of the corpora, the options and the model (:func:`check_same_inputs`).
- :func:`all_reduce_sums` is each analysis's final accumulation: sums over ranks, in float64 for
  floats and exact for integers, so every rank returns the single-process result.
- :func:`gather_by_batch` collects per-batch values that are not sums (e.g. per-sequence losses
  for a bootstrap) from every rank, in the single-process order.
- :func:`deal` splits any other list of work items (e.g. one run per expert) the same way;
  :func:`map_over_ranks` deals items, computes each rank's share and gathers the results (e.g.
  one figure each).
- :func:`shared_failures` (a decorator on every analysis) makes a rank that raises tell the
  others at their next synchronisation point, so the whole job fails with one clear error
  instead of hanging. All synchronisation goes through one exchange, :func:`_exchange`, so a
  failure report always meets whatever synchronisation the other ranks are waiting in.

Without a process group nothing is exchanged and every function is the identity.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moe_hooked.data import TokenBatch, iter_token_batches

if TYPE_CHECKING:
    from moe_hooked.model import HookedMoETransformer

T = TypeVar("T")
R = TypeVar("R")


def check_corpora(model: HookedMoETransformer, corpora: Mapping[str, Sequence[str]], what: str) -> None:
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
    model: HookedMoETransformer,
    corpora: Mapping[str, Sequence[str]],
    max_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
    what: str = "analysis",
    split: bool = True,
) -> Iterator[tuple[int, TokenBatch]]:
    """Yield `(domain_index, batch)` for every domain in order; `batch.tokens` and
    `batch.attention_mask` [batch pos] are on the model's device.

    Texts longer than `max_length` tokens (default: the model's context `cfg.n_ctx`) are cut
    into chunks, each with its own BOS where the model prepends one. `max_tokens` caps the
    tokens read per domain (BOS included). `what` names the caller in error messages and
    progress bars.

    `batch.index` is the batch's position in the whole stream (all domains, all ranks).
    In a process group (and with `split`), this rank gets only its share of the batches, dealt by
    their padded size (`deal(..., cost=batch.tokens.numel())`), after checking that every rank
    has the same corpora, options and model; only rank 0 shows progress.
    `split=False` yields every batch on every rank and exchanges nothing (for work split by
    item with :func:`deal`, where each rank reads the whole corpus).
    """
    check_corpora(model, corpora, what)
    max_length = model.cfg.n_ctx if max_length is None else max_length
    if max_length > model.cfg.n_ctx:
        raise ValueError(f"max_length={max_length} exceeds the model's context length n_ctx={model.cfg.n_ctx}")
    if split and rank_and_world()[1] > 1:
        check_same_inputs(model, what, corpora={d: list(t) for d, t in corpora.items()}, options=(max_length, batch_size, max_tokens))
    progress = progress and is_main_process()
    batches = enumerate(_all_batches(model, corpora, max_length, batch_size, max_tokens, progress, what))
    device = model.W_E.device
    for index, (d, batch) in deal(batches, _padded_tokens) if split else batches:
        yield d, TokenBatch(batch.tokens.to(device), batch.attention_mask.to(device), batch.domain, index)


def _padded_tokens(numbered_batch: tuple[int, tuple[int, TokenBatch]]) -> int:
    """The cost of a batch for :func:`deal`: its tokens, padding included (the forward runs on all)."""
    _, (_, batch) = numbered_batch
    return batch.tokens.numel()


def _all_batches(
    model, corpora: Mapping[str, Sequence[str]], max_length: int, batch_size: int, max_tokens: int | None,
    progress: bool, what: str,
) -> Iterator[tuple[int, TokenBatch]]:
    """Every `(domain_index, batch)` of `corpus_batches`, on the CPU, whatever the rank."""
    prepend_bos = model.cfg.default_prepend_bos
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
            yield d, batch
        if not n_batches:
            raise ValueError(f"domain {domain!r} produced no tokens (is max_tokens={max_tokens} too small?)")


# ---------------------------------------------------------------------------
# Across processes (torch.distributed)
# ---------------------------------------------------------------------------


class RankFailedError(RuntimeError):
    """Another rank of the process group failed, was lost, or was given different inputs."""


def rank_and_world() -> tuple[int, int]:
    """`(rank, world_size)` of this process; `(0, 1)` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0, and without a process group (the process that shows progress and writes files)."""
    return rank_and_world()[0] == 0


DEAL_ROUNDS = 4
"""`deal` balances `DEAL_ROUNDS * world_size` items at a time (the items it holds in memory)."""


def deal(items: Iterable[T], cost: Callable[[T], float] | None = None) -> Iterator[T]:
    """This rank's share of `items` (every item without a process group); every rank computes the
    same split. Items are taken `DEAL_ROUNDS * world_size` at a time; within each such window, the
    costliest first, each item goes to the rank whose share so far costs least (the lowest rank on
    a tie), and this rank's items are yielded in their original order. So no rank's total cost
    exceeds another's by more than the costliest item. `cost(item)` defaults to 1, which deals
    item `i` to rank `i % world_size`. The shares are disjoint and their union is `items`; a rank
    may get none.

    For work that is expensive per item rather than per token (one run per (layer, expert)):
    compute this rank's items, write each result into a zero-filled table, and sum the tables
    with :func:`all_reduce_sums` (each entry then holds the one rank's value); read the corpus
    inside with `corpus_batches(..., split=False)`, which exchanges nothing, after one
    :func:`check_same_inputs` of the corpora and options.
    """
    rank, world = rank_and_world()
    items = iter(items)
    loads = [0.0] * world
    while window := list(itertools.islice(items, DEAL_ROUNDS * world)):
        costs = [1.0 if cost is None else float(cost(item)) for item in window]
        owners = _least_loaded_owners(costs, loads)
        yield from (item for item, owner in zip(window, owners) if owner == rank)


def _least_loaded_owners(costs: Sequence[float], loads: list[float]) -> list[int]:
    """The rank of each item: costliest first (ties in order), each to the rank with the least
    load (the lowest on a tie), whose load grows by the item's cost. Updates `loads` in place."""
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owners[i] = min(range(len(loads)), key=loads.__getitem__)
        loads[owners[i]] += costs[i]
    return owners


def all_reduce_sums(tensors: Sequence[torch.Tensor], what: str = "analysis") -> list[torch.Tensor]:
    """Every tensor summed over the ranks; each rank gets the totals (on the tensors' devices).

    Floating-point tensors come back as float64 and are summed in float64; integer and bool
    tensors as int64, summed exactly. Shapes must be the same on every rank. Without a process
    group the tensors are only converted (copies), nothing is exchanged. In a group, the ranks
    first check that none of them failed (a :class:`RankFailedError` names the one that did).
    `what` names the analysis in error messages.
    """
    totals = [t.detach().to(torch.float64 if t.is_floating_point() else torch.int64).clone() for t in tensors]
    if rank_and_world()[1] == 1:
        return totals
    layouts = _exchange(what, [(tuple(t.shape), t.dtype) for t in totals])
    if any(layout != layouts[0] for layout in layouts):
        raise _known_to_all(RankFailedError(f"{what}: the ranks hold sums of different shapes ({layouts}): they "
                                            "did not run the same analysis"))
    device = _collective_device()
    for dtype in (torch.float64, torch.int64):
        group = [t for t in totals if t.dtype == dtype]
        if not group:
            continue
        flat = torch.cat([t.reshape(-1).to(device) for t in group])  # one collective per dtype
        try:
            dist.all_reduce(flat)
        except Exception as err:  # a peer died or the group timed out
            raise _lost_contact(what, err) from err
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view(t.shape))
    return totals


def gather_by_batch(per_batch: Mapping[int, T], what: str = "analysis") -> list[T]:
    """Per-batch results of every rank, in the single-process order: `per_batch` maps
    `batch.index` (from :func:`corpus_batches`) to anything picklable, e.g. a tensor of
    per-sequence values for a bootstrap over sequences. Every rank gets the full list
    (`[per_batch[i] for i in sorted indices]`); without a process group, this rank's values.
    The values travel pickled: move tensors to the CPU first.
    """
    merged = dict(per_batch)
    if rank_and_world()[1] > 1:
        for share in _exchange(what, dict(per_batch)):
            merged.update(share)
    return [merged[i] for i in sorted(merged)]


def map_over_ranks(function: Callable[[T], R], items: Sequence[T], what: str = "analysis") -> list[R]:
    """`[function(item) for item in items]` on every rank, each rank computing only its share
    (item `i` on rank `i % world_size`: :func:`deal` without costs), for work that is costly per
    item and not a sum: e.g. drawing one figure each. Every rank gets every result, in item
    order; the results travel pickled (move tensors to the CPU). Without a process group: the
    plain list. Every rank must call it with the same items.
    """
    return gather_by_batch({i: function(item) for i, item in deal(enumerate(items))}, what)


@contextmanager
def shared_failures(what: str) -> Iterator[None]:
    """Context manager and decorator: if the body raises in a process group, tell the other
    ranks (they raise a :class:`RankFailedError` at their next synchronisation point, e.g. in
    :func:`all_reduce_sums` or the input check of :func:`corpus_batches`), then re-raise.

    Every corpus analysis is decorated with it; wrap a whole multi-analysis job in it too (the
    CLI does) so that a failure between analyses also reaches the others. Nested uses announce
    a failure once. Without a process group it does nothing.
    """
    try:
        yield
    except Exception as err:
        if rank_and_world()[1] > 1 and not getattr(err, "_moe_hooked_shared", False):
            _known_to_all(err)
            try:
                _exchange(what, failure=f"{what}: {type(err).__name__}: {err}")
            except RankFailedError:
                pass  # the others are gone: our own error is the one to show
        raise


def barrier(what: str) -> None:
    """Wait until every rank gets here; raise :class:`RankFailedError` if one of them failed
    instead (see :func:`shared_failures`). Without a process group: nothing."""
    if rank_and_world()[1] > 1:
        _exchange(what)


def check_same_inputs(model: HookedMoETransformer, what: str, **inputs: Any) -> None:
    """Raise :class:`RankFailedError` on every rank if the ranks were not given the same inputs.

    Compares across ranks a SHA-256 digest of each keyword value (pickled: corpora, options,
    ...), of the model's config (its device aside) and of a sample of its weights (64 evenly
    spaced values of every parameter). Called by :func:`corpus_batches` before any work.
    """
    digests = {name: _digest(value) for name, value in inputs.items()}
    digests["model config"] = _digest({k: v for k, v in model.cfg.to_dict().items() if k != "device"})
    digests["model weights"] = _weights_digest(model)
    everyone = _exchange(what, digests)
    for name, digest in digests.items():
        seen = [ranks[name] for ranks in everyone]
        if len(set(seen)) > 1:
            per_rank = ", ".join(f"rank {r}: {value[:10]}" for r, value in enumerate(seen))
            raise _known_to_all(RankFailedError(  # every rank sees the same difference: nothing to announce
                f"{what}: the ranks were given different {name} ({per_rank}); every rank must run the same "
                "analysis with the same model and options on the same corpora: give every rank the same files"
            ))


def _digest(value: Any) -> str:
    return hashlib.sha256(pickle.dumps(value, protocol=4)).hexdigest()


def _weights_digest(model: HookedMoETransformer, samples: int = 64) -> str:
    """SHA-256 of `samples` evenly spaced values of every (non-meta) parameter, in float64."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.is_meta:
            continue
        flat = param.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples]
        digest.update(name.encode())
        digest.update(picked.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


def _collective_device() -> torch.device:
    """Where tensors must be for the group's backend: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _lost_contact(what: str, err: Exception) -> RankFailedError:
    rank = rank_and_world()[0]
    return _known_to_all(RankFailedError(
        f"{what}: rank {rank} lost contact with the other ranks ({type(err).__name__}: {err}); "
        "another rank probably died or hangs: look at its output for the cause"
    ))


def _known_to_all(err: Exception) -> Exception:
    """Mark `err` as already known to the other ranks, so that :func:`shared_failures` does not
    announce it again (the ranks that detect it together, or hear of it, or lost contact)."""
    err._moe_hooked_shared = True
    return err


def _exchange(what: str, payload: Any = None, failure: str | None = None) -> list[Any]:
    """The one synchronisation point: every rank sends `(failure, payload)` and gets all ranks'
    payloads. Raises :class:`RankFailedError` naming the failed ranks if any rank sent a
    failure (unless this rank is itself reporting one)."""
    rank, world = rank_and_world()
    entries: list[Any] = [None] * world
    try:
        dist.all_gather_object(entries, (failure, payload))
    except Exception as err:  # a peer died or the group timed out
        raise _lost_contact(what, err) from err
    failed = [f"rank {r}: {f}" for r, (f, _) in enumerate(entries) if f is not None and r != rank]
    if failed and failure is None:
        raise _known_to_all(RankFailedError(f"{what} stopped on rank {rank} because another rank failed: "
                                            + "; ".join(failed)))
    return [p for _, p in entries]
