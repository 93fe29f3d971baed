"""Find a checkpoint, read its config, and stream its safetensors into a model."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from collections.abc import Collection
from typing import BinaryIO, NamedTuple

import torch
from moe_hooked.loading.errors import CheckpointError
from moe_hooked.loading.llama_like import Target

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
    buffer = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    f.readinto(memoryview(buffer.numpy()))
    dest.copy_(buffer.view(entry.dtype).view(entry.shape))


def stream_weights(
    model: torch.nn.Module, files: list[Path], names: dict[str, Target], offloaded: Collection[str] = frozenset()
) -> None:
    """Read every tensor of `files` straight into `model`'s parameters, one at a time.

    Files are read with plain reads (no memory map), so the peak host memory is the
    model's own parameters plus at most one tensor. Keys in `offloaded` (routed experts
    an expert store reads on demand) are checked present but not read. Raises one
    `CheckpointError` listing every missing, unexpected and misshapen tensor.
    """
    params = dict(model.named_parameters())
    seen, unexpected, misshapen = set(), [], []
    for path in files:
        entries = read_header(path)
        with open(path, "rb") as f, torch.no_grad():
            for key, entry in entries.items():
                target = names.get(key)
                if target is None:
                    if not key.endswith(IGNORED_SUFFIXES):
                        unexpected.append(key)
                    continue
                seen.add(key)
                if key in offloaded:
                    continue
                dest = params[target.param] if target.expert is None else params[target.param][target.expert]
                if dest.shape != entry.shape or entry.dtype is None:
                    misshapen.append(f"{key}: {entry.shape}, expected {tuple(dest.shape)}")
                    continue
                read_into(f, entry, dest)
    _raise_problems(sorted(names.keys() - seen), unexpected, misshapen)


def _raise_problems(missing: list[str], unexpected: list[str], misshapen: list[str]) -> None:
    sections = [(title, keys) for title, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if not sections:
        return
    lines = [f"{len(keys)} {title} tensor(s):\n  " + "\n  ".join(keys[:20]) + ("\n  ..." if len(keys) > 20 else "") for title, keys in sections]
    raise CheckpointError(
        "the checkpoint does not match the architecture its config.json describes\n" + "\n".join(lines)
    )
