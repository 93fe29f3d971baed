"""An expert store: routed-expert weights that stay in their safetensors files and are read on demand.

`Experts` components attached to a store hold no stacked weights. Each forward pass asks the
store for the experts its routing selected; the store keeps at most `budget_bytes` of expert
weights resident on the model's device in fixed-size slots (allocated once, reused), evicts
the least recently used expert when it needs a slot, and reads a missing expert with positioned
reads of exactly its tensors' byte ranges (the per-tensor reader of `stream_weights`; no
memory map). A background thread prefetches the experts the next MoE layer will probably need.

The budget counts the slots: each holds one expert's weights in the model's dtype, as used
(MXFP4 experts dequantized). It does not count the transient buffers of a read in progress, one
set per reading thread (the forward pass and the read-ahead): an expert tensor's stored bytes
(MXFP4 blocks and scales, reused from read to read), and, for MXFP4 or fused tensors, its
float32 values and the dequantization's temporaries while they are copied into the slot.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from moe_hooked.components.experts import Experts
from moe_hooked.loading.checkpoint import (
    Fill,
    HubTensor,
    ReadBuffers,
    TensorEntry,
    as_targets,
    index_tensors,
    is_plain,
    read_into,
    read_targets,
    target_shape,
)
from moe_hooked.loading.errors import CheckpointError
from moe_hooked.loading.llama_like import Target

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)


def parse_memory_budget(value: int | str | None) -> int | None:
    """Bytes of an `expert_memory` budget: None, an int of bytes, or "2GiB", "512MiB", "1.5GB", "800MB"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expert_memory must be None, a number of bytes or a string like '2GiB', got {value!r}")
    if isinstance(value, int):
        budget = value
    else:
        match = _BUDGET.match(value)
        if match is None:
            raise ValueError(
                f"cannot read expert_memory={value!r}: write a number of bytes or a size with a unit, "
                "e.g. '2GiB', '512MiB', '1.5GB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        budget = int(float(match[1]) * _UNITS[(match[2] or "").lower()])
    if budget <= 0:
        raise ValueError(f"expert_memory must be positive, got {value!r}")
    return budget


def format_bytes(n: int) -> str:
    """`n` bytes in KiB, MiB or GiB, for messages."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


class ExpertTensor(NamedTuple):
    """One routed-expert tensor in the checkpoint (its file and byte range; for MXFP4 those of
    its blocks and scales) and the weight-map target it fills."""

    hub: HubTensor
    target: Target


Key = tuple[str, int]
"""(name of the `Experts` module, expert id)."""


class ExpertStore:
    """LRU residency of routed experts under a byte budget, read from safetensors files.

    Args:
        tensors: for each (experts module name, expert id), its tensors by parameter name
            (e.g. "W_gate") with their place in the checkpoint.
        shapes: per-expert shape of each parameter, e.g. {"W_gate": (d_expert, d_model), ...}.
        budget_bytes: the most bytes of expert weights resident at any time.
        dtype, device: of the resident weights (the model's).
    """

    def __init__(
        self,
        tensors: dict[Key, dict[str, ExpertTensor]],
        shapes: dict[str, tuple[int, ...]],
        budget_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.tensors, self.shapes, self.dtype, self.device = tensors, shapes, dtype, torch.device(device)
        self.slot_bytes = sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize
        if budget_bytes < self.slot_bytes:
            raise ValueError(
                f"expert_memory of {budget_bytes} bytes is smaller than one expert ({self.slot_bytes} bytes, "
                f"{format_bytes(self.slot_bytes)} in {str(dtype).removeprefix('torch.')}): "
                f"give at least expert_memory={self.slot_bytes}"
            )
        self.budget_bytes, self.n_slots = budget_bytes, budget_bytes // self.slot_bytes
        self.prefetch_enabled = True
        self._check_tensors()
        self._file_state = {path: _file_state(path) for ts in tensors.values() for t in ts.values() for path in t.hub.paths}
        self._slots: list[dict[str, torch.Tensor]] = []
        self._slot_of: OrderedDict[Key, int] = OrderedDict()  # resident experts, least recently used first
        self._free: list[int] = []  # allocated slots that hold no expert (a read failed)
        self._pins = [0] * self.n_slots
        self._loading: dict[Key, int] = {}
        self._prefetched_unused: set[Key] = set()
        self._next: dict[str, tuple[str, torch.nn.Module]] = {}
        self._cond = threading.Condition()
        self._local = threading.local()
        self._open_files: list = []
        self._jobs: queue.Queue = queue.Queue()
        self._generation = 0
        self._worker: threading.Thread | None = None
        self._stats = dict(hits=0, misses=0, prefetch_hits=0, prefetched=0, bytes_read=0, peak_resident_bytes=0)

    # ------------------------------------------------------------------ public
    def stats(self) -> dict[str, int | float]:
        """Counters since loading: `hits`/`misses` (experts found resident / read on demand),
        `prefetched` (experts read ahead), `prefetch_hits` (of those, later used),
        `prefetch_hit_rate`, `bytes_read`, `resident_bytes`, `peak_resident_bytes`, `budget_bytes`.
        Waits for reads ahead in flight, so that the counters agree with each other."""
        self._jobs.join()
        with self._cond:
            stats = dict(self._stats)
            stats |= dict(budget_bytes=self.budget_bytes, slot_bytes=self.slot_bytes, n_slots=self.n_slots,
                          resident_bytes=len(self._slots) * self.slot_bytes, resident_experts=len(self._slot_of))
        stats["prefetch_hit_rate"] = stats["prefetch_hits"] / stats["prefetched"] if stats["prefetched"] else 0.0
        return stats

    def reset_stats(self) -> None:
        """Zero the counters (residency is kept; `peak_resident_bytes` restarts at the current value)."""
        with self._cond:
            self._stats = dict.fromkeys(self._stats, 0)
            self._stats["peak_resident_bytes"] = len(self._slots) * self.slot_bytes

    def chain(self, layers: Sequence[tuple[str, torch.nn.Module]]) -> None:
        """Set the prefetch order: after each experts module, its successor's (name, router)."""
        self._next = {name: layers[i + 1] for i, (name, _) in enumerate(layers[:-1])}

    def groups(self, name: str, experts: Sequence[int]) -> list[list[int]]:
        """`experts` of module `name` split into groups that fit in the budget together, those
        already resident first (so that loading the others does not evict them before use)."""
        experts = sorted(experts, key=lambda e: (name, e) not in self._slot_of)
        return [experts[i : i + self.n_slots] for i in range(0, len(experts), self.n_slots)]

    @contextlib.contextmanager
    def resident(self, name: str, experts: Sequence[int]) -> Iterator[None]:
        """Within the context, the weights of `experts` of module `name` are resident and stay so."""
        keys = [(name, e) for e in experts]
        if len(keys) > self.n_slots:
            raise ValueError(f"{len(keys)} experts do not fit in {self.n_slots} slots: split them with groups()")
        acquired = []
        try:
            for key in sorted(keys, key=lambda k: k not in self._slot_of):  # pin resident ones before evicting
                self._acquire(key)
                acquired.append(key)
            yield
        finally:
            with self._cond:
                for key in acquired:
                    self._pins[self._slot_of[key]] -= 1
                self._cond.notify_all()

    def weights(self, name: str, expert: int) -> dict[str, torch.Tensor]:
        """The resident weights of an expert (call inside `resident`)."""
        return self._slots[self._slot_of[(name, expert)]]

    def prefetch_next(self, name: str, x: torch.Tensor) -> None:
        """Start reading, in the background, the experts the MoE layer after `name` will probably
        select: its router applied to `x` [n d_model] (this layer's input), most-chosen first."""
        if not self.prefetch_enabled or name not in self._next:
            return
        next_name, router = self._next[name]
        with torch.no_grad():
            indices, _ = router.route(x)
            counts = torch.bincount(indices.flatten(), minlength=router.weight.shape[0])
        order = [int(e) for e in torch.argsort(counts, descending=True, stable=True) if counts[e] > 0]
        with self._cond:
            self._generation += 1
            self._jobs.put((self._generation, [(next_name, e) for e in order[: self.n_slots]]))
        if self._worker is None:
            self._worker = threading.Thread(target=self._prefetch_loop, name="moe-hooked-prefetch", daemon=True)
            self._worker.start()

    def close(self) -> None:
        """Close the checkpoint files this store opened."""
        for f in self._open_files:
            f.close()
        self._open_files.clear()

    # ------------------------------------------------------------------ residency
    def _acquire(self, key: Key) -> None:
        with self._cond:
            while key in self._loading:
                self._cond.wait()
            if key in self._slot_of:
                self._stats["hits"] += 1
                if key in self._prefetched_unused:
                    self._prefetched_unused.discard(key)
                    self._stats["prefetch_hits"] += 1
                self._slot_of.move_to_end(key)
                self._pins[self._slot_of[key]] += 1
                return
            self._stats["misses"] += 1
            slot = self._take_slot(wait=True)
            self._loading[key] = slot
        self._load(key, slot, pin=True)

    def _take_slot(self, wait: bool) -> int | None:
        """A free slot (holding the lock): a new one while under budget, else the least recently
        used unpinned expert's. Waits for one when `wait`, else returns None."""
        while True:
            if self._free:
                return self._free.pop()
            if len(self._slots) < self.n_slots:
                with torch.inference_mode(False):  # a slot made during inference must still serve autograd later
                    self._slots.append({n: torch.empty(s, dtype=self.dtype, device=self.device) for n, s in self.shapes.items()})
                resident = len(self._slots) * self.slot_bytes
                self._stats["peak_resident_bytes"] = max(self._stats["peak_resident_bytes"], resident)
                return len(self._slots) - 1
            busy = set(self._loading.values())
            for key, slot in self._slot_of.items():
                if self._pins[slot] == 0 and slot not in busy:
                    del self._slot_of[key]
                    self._prefetched_unused.discard(key)
                    return slot
            if not wait:
                return None
            self._cond.wait()

    def _load(self, key: Key, slot: int, pin: bool) -> None:
        """Read `key` into `slot` (outside the lock), then make it resident; on failure free the slot."""
        try:
            self._read(key, self._slots[slot])
        except BaseException:
            with self._cond:
                del self._loading[key]
                self._free.append(slot)
                self._cond.notify_all()
            raise
        with self._cond:
            del self._loading[key]
            self._slot_of[key] = slot
            if pin:
                self._pins[slot] += 1
            else:
                self._prefetched_unused.add(key)
                self._stats["prefetched"] += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ reading
    def _read(self, key: Key, dest: dict[str, torch.Tensor]) -> None:
        """Read expert `key` into the slot `dest`, each byte range once (gpt-oss's fused gate_up
        fills two parameters from one range) and MXFP4 dequantized into the slot."""
        fills: dict[HubTensor, list[Fill]] = {}
        for param, tensor in self.tensors[key].items():
            fills.setdefault(tensor.hub, []).append((tensor.target, dest[param]))
        for hub, hub_fills in fills.items():
            for path in hub.paths:
                self._check_unchanged(path)
            if self.device.type == "cuda" and hub.scales is None and len(hub_fills) == 1 and is_plain(hub_fills[0][0]):
                self._read_via_staging(self._file(hub.path), hub.entry, hub_fills[0][1])
            else:
                read_targets(hub, hub_fills, self._file, self._buffers(pinned=False))
            with self._cond:
                self._stats["bytes_read"] += hub.nbytes

    def _buffers(self, pinned: bool) -> ReadBuffers:
        """This thread's reused read buffers (pinned host memory for the GPU's staging copies)."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        if pinned not in buffers:
            buffers[pinned] = ReadBuffers(pin_memory=pinned)
        return buffers[pinned]

    def _read_via_staging(self, f, entry: TensorEntry, dest: torch.Tensor) -> None:
        """GPU: read into this thread's pinned host buffer, copy on this thread's CUDA stream.

        Not exercised by the test suite (no GPU there); `benchmarks/gpu_check.py` runs it.
        """
        staging = self._buffers(pinned=True).take("staging", entry.end - entry.start)
        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(self.device)
        view = staging.view(entry.dtype).view(entry.shape)
        read_into(f, entry, view)
        # kernels queued on the default stream may still read the evicted expert that `dest` held
        self._local.stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self._local.stream):
            dest.copy_(view, non_blocking=True)
        self._local.stream.synchronize()  # the copy is done before the staging buffer is reused or dest is used

    def _file(self, path: Path):
        """This thread's open handle of `path` (reads seek, so threads do not share handles)."""
        files = self._local.__dict__.setdefault("files", {})
        if path not in files:
            files[path] = open(path, "rb")
            self._open_files.append(files[path])
        return files[path]

    def _check_unchanged(self, path: Path) -> None:
        if _file_state(path) != self._file_state[path]:
            raise CheckpointError(
                f"{path} changed on disk after the model was loaded (its size or modification time differs), "
                "so its routed experts can no longer be read from it: load the model again with from_pretrained"
            )

    def _check_tensors(self) -> None:
        """Every expert tensor has its parameter's shape and a dtype the store can read (checked
        now, so that a checkpoint that cannot be streamed is refused at loading, not mid-forward)."""
        for ts in self.tensors.values():
            for t in ts.values():
                t.hub.check_loadable()
        bad = [
            f"{t.target.param}[{key[1]}] ({t.hub.path.name}): {t.hub.shape}, expected {self.shapes[param]}"
            for key, ts in self.tensors.items()
            for param, t in ts.items()
            if target_shape(t.target, t.hub.shape) != tuple(self.shapes[param])
        ]
        if bad:
            raise CheckpointError("misshapen routed-expert tensors:\n  " + "\n  ".join(bad[:20]))

    # ------------------------------------------------------------------ prefetch
    def _prefetch_loop(self) -> None:
        while True:
            generation, keys = self._jobs.get()
            for key in keys:
                if generation != self._generation or not self._prefetch_one(key):
                    break
            self._jobs.task_done()

    def _prefetch_one(self, key: Key) -> bool:
        """Read `key` ahead unless resident or loading; False when no slot is free."""
        with self._cond:
            if key in self._slot_of:
                self._slot_of.move_to_end(key)
                return True
            if key in self._loading:
                return True
            slot = self._take_slot(wait=False)
            if slot is None:
                return False
            self._loading[key] = slot
        try:
            self._load(key, slot, pin=False)
        except Exception:  # noqa: BLE001 - a failed read ahead is retried (and reported) by the forward pass
            return False
        return True


def _file_state(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def offload_experts(
    model: torch.nn.Module, files: Sequence[Path], weight_map: dict[str, Target | tuple[Target, ...]], budget_bytes: int
) -> tuple[ExpertStore, set[str]]:
    """Attach one `ExpertStore` to every `Experts` module of `model` (still on the meta device)
    and drop their stacked weights; returns the store and the hub keys it reads (not to be loaded now).

    A hub tensor may hold one expert (a `Target` with an expert index) or all of them stacked
    along its first dim (gpt-oss's fused `gate_up_proj`, `down_proj` and biases): each expert's
    slice is then a contiguous byte range, read alone and viewed through the target (de-interleaved,
    transposed). An MXFP4 tensor (gpt-oss's official checkpoints) is sliced likewise in its blocks
    and its scales, and each expert is dequantized as it is read.
    """
    modules = {name: m for name, m in model.named_modules() if isinstance(m, Experts)}
    by_key: dict[str, list[tuple[str, str, Target]]] = {}
    for key, targets in weight_map.items():
        for target in as_targets(targets):
            module, _, param = target.param.rpartition(".")
            if module in modules:
                by_key.setdefault(key, []).append((module, param, target))
    tensors: dict[Key, dict[str, ExpertTensor]] = {}
    for key, hub in index_tensors(list(files)).items():
        for module, param, target in by_key.get(key, ()):
            for expert, part in _expert_slices(hub, target, modules[module].cfg.n_experts):
                tensors.setdefault((module, expert), {})[param] = ExpertTensor(part, target)
    first = next(iter(modules.values()))
    store = ExpertStore(tensors, first.expert_shapes(), budget_bytes, first.cfg.dtype, torch.device(first.cfg.device))
    for name, module in modules.items():
        module.offload(store, name)
    store.chain([(name, model.get_submodule(name.rpartition(".")[0]).router) for name in modules])
    return store, set(by_key)


def _expert_slices(tensor: HubTensor, target: Target, n_experts: int) -> Iterator[tuple[int, HubTensor]]:
    """(expert id, where its tensor lies) for a hub tensor of one expert or of all of them stacked
    (MXFP4: blocks and scales both stacked)."""
    if target.expert is not None:
        yield target.expert, tensor
        return
    entries = [tensor.entry] + ([tensor.scales[1]] if tensor.scales is not None else [])
    if any(not entry.shape or entry.shape[0] != n_experts for entry in entries):
        raise CheckpointError(
            f"'{tensor.entry.name}' has shape {tensor.shape}: a tensor of all routed experts must be stacked along "
            f"its first dim ({n_experts} experts)"
        )
    for expert in range(n_experts):
        scales = None if tensor.scales is None else (tensor.scales[0], _expert_entry(tensor.scales[1], expert, n_experts))
        yield expert, tensor._replace(entry=_expert_entry(tensor.entry, expert, n_experts), scales=scales)


def _expert_entry(entry: TensorEntry, expert: int, n_experts: int) -> TensorEntry:
    """Expert `expert`'s slice of `entry`, stacked along its first dim: a contiguous byte range."""
    size = (entry.end - entry.start) // n_experts
    start = entry.start + expert * size
    return entry._replace(shape=entry.shape[1:], start=start, end=start + size, name=f"{entry.name}[{expert}]")
