"""Find a checkpoint, read its config, and stream its safetensors into a model."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import struct
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from moe_hooked.loading import mxfp4
from moe_hooked.loading.errors import CheckpointError
from moe_hooked.loading.llama_like import Target, as_targets

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.*"]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
FORMAT_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8,
}
"""Bytes per element of every dtype the safetensors format defines (whether or not moe_hooked loads it)."""
LOADABLE_DTYPES = ("F32", "F16", "BF16", "F64")
"""Checkpoint dtypes a floating-point parameter is read from."""
MAX_HEADER_BYTES = 100 * 2**20


def resolve_checkpoint_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the cache) with huggingface_hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"revision='{revision}' applies to hub ids only; '{name_or_path}' is a local folder")
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"'{name_or_path}' is not a checkpoint folder")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=HUB_FILE_PATTERNS))
    except RevisionNotFoundError as err:
        raise CheckpointError(f"revision '{revision}' does not exist in the hub repository '{name_or_path}'") from err
    except Exception as err:  # offline, unknown repo, gated repo: all end here
        cached = Path(constants.HF_HUB_CACHE) / ("models--" + str(name_or_path).replace("/", "--"))
        if revision is not None and cached.is_dir():
            raise CheckpointError(
                f"revision '{revision}' of '{name_or_path}' is neither in the local cache (which holds other "
                f"revisions of it) nor could the hub provide it: {type(err).__name__}: {err}"
            ) from err
        raise CheckpointError(
            f"'{name_or_path}' is neither a local checkpoint folder nor a model the Hugging Face hub "
            f"(or its local cache) could provide: {type(err).__name__}: {err}"
        ) from err


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {folder}: a Hugging Face checkpoint folder needs one")
    return read_json_object(config_path)


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; a `CheckpointError` naming the file if it is not one."""
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the file is damaged; download it again") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object: the file is damaged")
    return value


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: those of `model.safetensors.index.json`, else all of them."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index} has no 'weight_map' object of tensor name -> file name: the file is damaged")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (folder / f).is_file()]
        if absent:
            raise CheckpointError(f"{index.name} names shard files that are missing from {folder}: {absent}")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickled:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); moe_hooked reads safetensors only "
            "and never unpickles. Convert them once with transformers (model.save_pretrained(dir, "
            "safe_serialization=True)) and load that folder."
        )
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors or a sharded index")


class TensorEntry(NamedTuple):
    """Where one tensor lies in a safetensors file (`start`, `end`: absolute byte offsets).

    `dtype` is None for a format dtype torch cannot hold as is (e.g. "F8_E4M3"); `name`
    and `format_dtype` are the hub key and the header's dtype string, for error messages.
    """

    dtype: torch.dtype | None
    shape: tuple[int, ...]
    start: int
    end: int
    name: str = ""
    format_dtype: str = ""


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor table of a safetensors file (8-byte little-endian header size, JSON header, data).

    The header is checked against the file's size before any tensor is read: a JSON
    object, known dtypes, byte ranges that match dtype x shape and tile the data section
    exactly, in order. Any problem raises a `CheckpointError` naming the file (and tensor).
    """
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _damaged(path, f"it is {file_size} bytes long, too short to hold the 8-byte header size")
        size = struct.unpack("<Q", prefix)[0]
        if size > min(file_size - 8, MAX_HEADER_BYTES):
            raise _damaged(path, f"its header claims {size} bytes but {file_size - 8} follow the size field")
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"its header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _damaged(path, f"its header is a JSON {type(header).__name__}, not an object")
    entries = {key: _entry(path, key, info, 8 + size) for key, info in header.items() if key != "__metadata__"}
    _check_layout(path, entries, 8 + size, file_size)
    return entries


def _damaged(path: Path, problem: str, tensor: str | None = None) -> CheckpointError:
    where = f"{path}" + (f", tensor '{tensor}'" if tensor is not None else "")
    return CheckpointError(
        f"{where}: not a valid safetensors file: {problem}. The file is damaged or incomplete "
        "(an interrupted download, a full disk?): download it again"
    )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, key: str, info, data_start: int) -> TensorEntry:
    """One header entry, checked on its own: dtype, shape and a byte range of dtype x shape bytes."""
    if not isinstance(info, dict):
        raise _damaged(path, "its header entry is not an object", key)
    format_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if format_dtype not in FORMAT_DTYPE_BYTES:
        raise _damaged(path, f"unknown dtype {format_dtype!r}", key)
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _damaged(path, f"shape {shape!r} is not a list of non-negative integers", key)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise _damaged(path, f"data_offsets {offsets!r} is not a pair of non-negative integers", key)
    expected = math.prod(shape) * FORMAT_DTYPE_BYTES[format_dtype]
    if offsets[1] - offsets[0] != expected:
        raise _damaged(path, f"it spans bytes {offsets}, but {format_dtype} x {shape} needs {expected} bytes", key)
    return TensorEntry(
        SAFETENSORS_DTYPES.get(format_dtype), tuple(shape), data_start + offsets[0], data_start + offsets[1], key, format_dtype
    )


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_start: int, file_size: int) -> None:
    """The tensors' byte ranges follow each other without gap or overlap and end where the file ends."""
    position = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            gap = "overlaps the tensor before it" if entry.start < position else "leaves a gap before it"
            raise _damaged(path, f"its byte range {gap}", entry.name)
        position = entry.end
    if position != file_size:
        if position > file_size:
            raise _damaged(path, f"its tensors need {position} bytes but the file has only {file_size} (cut short)")
        raise _damaged(path, f"{file_size - position} bytes follow the last tensor")


def checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor."""
    for entry in read_header(files[0]).values():
        if entry.format_dtype in LOADABLE_DTYPES:
            return entry.dtype
    raise CheckpointError(
        f"{files[0]} holds no tensor of a dtype moe_hooked loads ({', '.join(LOADABLE_DTYPES)}): convert the checkpoint"
    )


def unsupported_dtype(path: str | Path, entry: TensorEntry) -> CheckpointError:
    return CheckpointError(
        f"{path}, tensor '{entry.name}': dtype {entry.format_dtype} is not supported for a floating-point "
        f"parameter; moe_hooked loads {', '.join(LOADABLE_DTYPES)} checkpoints (convert it, e.g. with transformers)"
    )


def read_into(f: BinaryIO, entry: TensorEntry, dest: torch.Tensor) -> None:
    """Read one tensor from an open file into `dest` (same shape as `entry`).

    A contiguous CPU destination of the same dtype is filled in place by `readinto`,
    so no intermediate copy exists; otherwise one tensor-sized buffer is read and cast.
    A dtype that cannot be cast to `dest`'s (float8, complex, integers for a
    floating-point parameter) and a read that comes back short raise `CheckpointError`.
    """
    if entry.dtype is None or (dest.is_floating_point() and entry.format_dtype not in LOADABLE_DTYPES):
        raise unsupported_dtype(f.name, entry)
    f.seek(entry.start)
    if dest.device.type == "cpu" and dest.dtype == entry.dtype and dest.is_contiguous():
        _read_exactly(f, entry, dest.view(-1).view(torch.uint8))
        return
    dest.copy_(read_tensor(f, entry))


def read_tensor(f: BinaryIO, entry: TensorEntry, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of an open file, as stored: a view of `buffer` (uint8 [entry.end - entry.start],
    e.g. from `ReadBuffers.take`) when given, else of a buffer of its own."""
    f.seek(entry.start)
    if buffer is None:
        buffer = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    _read_exactly(f, entry, buffer)
    return buffer.view(entry.dtype).view(entry.shape)


class ReadBuffers:
    """Byte buffers reused from read to read, one per role (e.g. "blocks", "scales"), grown on
    demand: a reader that reads tensors of the same sizes over and over (the expert store)
    allocates them once. Not thread-safe: one per reading thread."""

    def __init__(self, pin_memory: bool = False):
        self.pin_memory = pin_memory
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, nbytes: int) -> torch.Tensor:
        """The first `nbytes` bytes of the buffer of `role` (uint8 [nbytes]); its previous content is dead."""
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[role] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        return buffer[:nbytes]


def _buffer(buffers: ReadBuffers | None, role: str, entry: TensorEntry) -> torch.Tensor | None:
    return None if buffers is None else buffers.take(role, entry.end - entry.start)


class HubTensor(NamedTuple):
    """One logical tensor of a checkpoint: its file and entry. An MXFP4 tensor `X`, stored as
    `X_blocks` and `X_scales`, has `entry` = the blocks and `scales` = (file, entry) of the scales."""

    path: Path
    entry: TensorEntry
    scales: tuple[Path, TensorEntry] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape if self.scales is None else mxfp4.dequantized_shape(self.entry.shape)

    @property
    def paths(self) -> set[Path]:
        """The files it is read from (blocks and scales may lie in different shards)."""
        return {self.path} if self.scales is None else {self.path, self.scales[0]}

    @property
    def nbytes(self) -> int:
        """Bytes read to load it (blocks and scales for MXFP4)."""
        scales = 0 if self.scales is None else self.scales[1].end - self.scales[1].start
        return self.entry.end - self.entry.start + scales

    def check_loadable(self) -> None:
        """Raise a `CheckpointError` unless it can fill a floating-point parameter: a dtype of
        `LOADABLE_DTYPES`, or MXFP4 blocks and scales in U8 whose shapes match."""
        if self.scales is None:
            if self.entry.format_dtype not in LOADABLE_DTYPES:
                raise unsupported_dtype(self.path, self.entry)
            return
        scales = self.scales[1]
        if (self.entry.format_dtype, scales.format_dtype) != ("U8", "U8") or scales.shape != self.entry.shape[:-1]:
            raise CheckpointError(
                f"{self.path}, tensor '{self.entry.name}' with '{scales.name}': MXFP4 blocks {self.entry.format_dtype} "
                f"{list(self.entry.shape)} and scales {scales.format_dtype} {list(scales.shape)} do not fit together; "
                "expected U8 blocks [..., groups, 16] and U8 scales [..., groups]: the checkpoint is damaged"
            )


def index_tensors(files: list[Path]) -> dict[str, HubTensor]:
    """Every logical tensor of the checkpoint by hub key, in file order; MXFP4 pairs
    `X_blocks` + `X_scales` appear once, as `X`."""
    entries = {key: (path, entry) for path in files for key, entry in read_header(path).items()}
    index = {}
    for key, (path, entry) in entries.items():
        base = key.removesuffix(mxfp4.BLOCKS_SUFFIX).removesuffix(mxfp4.SCALES_SUFFIX)
        scales = entries.get(base + mxfp4.SCALES_SUFFIX)
        if key == base + mxfp4.BLOCKS_SUFFIX and scales is not None:
            index[base] = HubTensor(path, entry, scales)
        elif key != base + mxfp4.SCALES_SUFFIX or base + mxfp4.BLOCKS_SUFFIX not in entries:
            index[key] = HubTensor(path, entry)
    return index


def hub_view(target: Target, hub: torch.Tensor) -> torch.Tensor:
    """The part of hub tensor `hub` that `target` fills, in our layout (a view)."""
    if target.interleave is not None:
        offset, step = target.interleave
        hub = hub[..., offset::step]
    return hub.transpose(-1, -2) if target.transpose else hub


def target_shape(target: Target, hub_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(hub_view(target, torch.empty(hub_shape, device="meta")).shape)


Fill = tuple[Target, torch.Tensor]
"""A target and its destination (our parameter, or one expert of it)."""


def read_targets(
    tensor: HubTensor, fills: Sequence[Fill], file: Callable[[Path], BinaryIO], buffers: ReadBuffers | None = None
) -> None:
    """Fill every destination of `fills` from one hub tensor, read (and MXFP4-dequantized) once:
    the one per-tensor read path of loading and of the expert store (see `fill_from`).

    `file(path)` gives an open handle of `path`; with `buffers` the stored bytes (MXFP4 blocks
    and scales, or a tensor copied through views) are read into its reused buffers.
    """
    if tensor.scales is None:
        fill_from(file(tensor.path), tensor.entry, fills, buffers)
        return
    blocks = read_tensor(file(tensor.path), tensor.entry, _buffer(buffers, "blocks", tensor.entry))
    scales = read_tensor(file(tensor.scales[0]), tensor.scales[1], _buffer(buffers, "scales", tensor.scales[1]))
    _copy_views(mxfp4.dequantize(blocks, scales), fills)


def fill_from(f: BinaryIO, entry: TensorEntry, fills: Sequence[Fill], buffers: ReadBuffers | None = None) -> None:
    """Fill every destination of `fills` from tensor `entry` of the open file `f`, read once: a
    single plain target is read straight into its destination, otherwise the tensor is read
    whole (into `buffers` when given) and copied through each target's view (de-interleaved, transposed)."""
    if len(fills) == 1 and is_plain(fills[0][0]):
        read_into(f, entry, fills[0][1])
        return
    _copy_views(read_tensor(f, entry, _buffer(buffers, "tensor", entry)), fills)


def is_plain(target: Target) -> bool:
    """Whether `target` takes the hub tensor as it is (no de-interleaving, no transpose)."""
    return target.interleave is None and not target.transpose


def _copy_views(hub: torch.Tensor, fills: Sequence[Fill]) -> None:
    for target, dest in fills:
        dest.copy_(hub_view(target, hub))


def param_view(params: dict[str, torch.Tensor], target: Target) -> torch.Tensor:
    """The parameter (or its expert) that `target` names."""
    return params[target.param] if target.expert is None else params[target.param][target.expert]


def _read_exactly(f: BinaryIO, entry: TensorEntry, dest: torch.Tensor) -> None:
    """Fill the byte tensor `dest` [entry.end - entry.start] from `f`'s current position."""
    filled = f.readinto(memoryview(dest.numpy())) if dest.numel() else 0
    if filled != dest.numel():
        raise CheckpointError(
            f"{f.name}, tensor '{entry.name}': read {filled} of its {dest.numel()} bytes; "
            "the file changed or was cut short while loading: download it again"
        )


def stream_weights(
    model: torch.nn.Module,
    files: list[Path],
    names: dict[str, Target | tuple[Target, ...]],
    offloaded: Collection[str] = frozenset(),
    check_finite: bool = False,
) -> None:
    """Read every tensor of `files` straight into `model`'s parameters, one at a time.

    Files are read with plain reads (no memory map), so the peak host memory is the
    model's own parameters plus at most one tensor. Keys in `offloaded` (routed experts
    an expert store reads on demand) are checked present but not read. Raises one
    `CheckpointError` listing every missing, unexpected and misshapen tensor; with
    `check_finite`, one listing every tensor that holds NaN or Inf.
    """
    params = dict(model.named_parameters())
    seen, unexpected, misshapen, nonfinite = set(), [], [], []
    with torch.no_grad(), contextlib.ExitStack() as open_files:
        file = functools.cache(lambda path: open_files.enter_context(open(path, "rb")))
        for key, tensor in index_tensors(files).items():
            if key not in names:
                if not key.endswith(IGNORED_SUFFIXES):
                    unexpected.append(f"{key} (in {tensor.path.name})")
                continue
            seen.add(key)
            if key in offloaded:
                continue
            fills = [(target, param_view(params, target)) for target in as_targets(names[key])]
            wrong = [(t, d) for t, d in fills if tuple(d.shape) != target_shape(t, tensor.shape)]
            misshapen += [f"{key}: {tensor.shape}, expected {tuple(d.shape)} for {t.param}" for t, d in wrong]
            if wrong:
                continue
            tensor.check_loadable()
            read_targets(tensor, fills, file)
            if check_finite and not all(bool(torch.isfinite(dest).all()) for _, dest in fills):
                nonfinite.append(f"{key} (in {tensor.path.name})")
    _raise_problems(files[0].parent, sorted(names.keys() - seen), unexpected, misshapen)
    if nonfinite:
        raise CheckpointError(
            f"{len(nonfinite)} tensor(s) hold NaN or Inf values (check_finite=True):\n  " + "\n  ".join(nonfinite)
        )


def _raise_problems(folder: Path, missing: list[str], unexpected: list[str], misshapen: list[str]) -> None:
    sections = [(title, keys) for title, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if not sections:
        return
    lines = [f"{len(keys)} {title} tensor(s):\n  " + "\n  ".join(keys[:20]) + ("\n  ..." if len(keys) > 20 else "") for title, keys in sections]
    raise CheckpointError(
        f"the checkpoint in {folder} does not match the architecture its config.json describes\n" + "\n".join(lines)
    )
