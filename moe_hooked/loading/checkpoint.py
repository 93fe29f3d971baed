"""Find a checkpoint, read its config, and stream its safetensors into a model."""

from __future__ import annotations

import json
import struct
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


def resolve_checkpoint_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the cache) with huggingface_hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"'{name_or_path}' is not a checkpoint folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated repo: all end here
        raise CheckpointError(
            f"'{name_or_path}' is neither a local checkpoint folder nor a model the Hugging Face hub "
            f"(or its local cache) could provide: {type(err).__name__}: {err}"
        ) from err


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {folder}: a Hugging Face checkpoint folder needs one")
    return json.loads(config_path.read_text())


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: those of `model.safetensors.index.json`, else all of them."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
    """Where one tensor lies in a safetensors file."""

    dtype: torch.dtype | None
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor table of a safetensors file (8-byte little-endian header size, JSON header, data)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    data_start = 8 + size
    return {
        key: TensorEntry(
            SAFETENSORS_DTYPES.get(info["dtype"]),
            tuple(info["shape"]),
            data_start + info["data_offsets"][0],
            data_start + info["data_offsets"][1],
        )
        for key, info in header.items()
        if key != "__metadata__"
    }


def checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor."""
    for entry in read_header(files[0]).values():
        if entry.dtype is not None and entry.dtype.is_floating_point:
            return entry.dtype
    raise CheckpointError(f"{files[0]} holds no floating-point tensors")


def read_into(f: BinaryIO, entry: TensorEntry, dest: torch.Tensor) -> None:
    """Read one tensor from an open file into `dest`.

    A contiguous CPU destination of the same dtype is filled in place by `readinto`,
    so no intermediate copy exists; otherwise one tensor-sized buffer is read and cast.
    """
    f.seek(entry.start)
    if dest.device.type == "cpu" and dest.dtype == entry.dtype and dest.is_contiguous():
        f.readinto(memoryview(dest.view(-1).view(torch.uint8).numpy()))
        return
    dest.copy_(read_tensor(f, entry))


def read_tensor(f: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """One tensor of an open file, as stored (its own buffer)."""
    f.seek(entry.start)
    buffer = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    f.readinto(memoryview(buffer.numpy()))
    return buffer.view(entry.dtype).view(entry.shape)


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
    def readable(self) -> bool:
        return self.entry.dtype is not None and (self.scales is None or self.scales[1].dtype is not None)


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


def read_target(tensor: HubTensor, target: Target, dest: torch.Tensor) -> None:
    """Fill `dest` (our parameter, or one expert of it) from a hub tensor through `target`'s
    view: the one per-tensor read path (plain, de-interleaved/transposed, MXFP4-dequantized)."""
    with open(tensor.path, "rb") as f:
        if tensor.scales is None and target.interleave is None and not target.transpose:
            read_into(f, tensor.entry, dest)
            return
        hub = read_tensor(f, tensor.entry)
    if tensor.scales is not None:
        with open(tensor.scales[0], "rb") as f:
            hub = mxfp4.dequantize(hub, read_tensor(f, tensor.scales[1]))
    dest.copy_(hub_view(target, hub))


def param_view(params: dict[str, torch.Tensor], target: Target) -> torch.Tensor:
    """The parameter (or its expert) that `target` names."""
    return params[target.param] if target.expert is None else params[target.param][target.expert]


def stream_weights(model: torch.nn.Module, files: list[Path], names: dict[str, Target | tuple[Target, ...]]) -> None:
    """Read every tensor of `files` straight into `model`'s parameters, one at a time.

    Files are read with plain reads (no memory map), so the peak host memory is the
    model's own parameters plus at most one tensor. Raises one `CheckpointError`
    listing every missing, unexpected and misshapen tensor.
    """
    params = dict(model.named_parameters())
    seen, unexpected, misshapen = set(), [], []
    with torch.no_grad():
        for key, tensor in index_tensors(files).items():
            if key not in names:
                if not key.endswith(IGNORED_SUFFIXES):
                    unexpected.append(key)
                continue
            seen.add(key)
            for target in as_targets(names[key]):
                dest = param_view(params, target)
                if tuple(dest.shape) != target_shape(target, tensor.shape) or not tensor.readable:
                    misshapen.append(f"{key}: {tensor.shape}, expected {tuple(dest.shape)} for {target.param}")
                    continue
                read_target(tensor, target, dest)
    _raise_problems(sorted(names.keys() - seen), unexpected, misshapen)


def _raise_problems(missing: list[str], unexpected: list[str], misshapen: list[str]) -> None:
    sections = [(title, keys) for title, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if not sections:
        return
    lines = [f"{len(keys)} {title} tensor(s):\n  " + "\n  ".join(keys[:20]) + ("\n  ..." if len(keys) > 20 else "") for title, keys in sections]
    raise CheckpointError(
        "the checkpoint does not match the architecture its config.json describes\n" + "\n".join(lines)
    )
