"""Find a checkpoint, read its config, and stream its safetensors into a model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from moe_hooked.loading.errors import CheckpointError
from moe_hooked.loading.llama_like import Target

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.*"]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


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


def checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor."""
    with safe_open(files[0], framework="pt") as f:
        for key in f.keys():
            dtype = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    raise CheckpointError(f"{files[0]} holds no floating-point tensors")


def stream_weights(model: torch.nn.Module, files: list[Path], names: dict[str, Target]) -> None:
    """Copy every tensor of `files` into `model`'s parameters, one tensor at a time.

    Raises one `CheckpointError` listing every missing, unexpected and misshapen tensor.
    """
    params = dict(model.named_parameters())
    seen, unexpected, misshapen = set(), [], []
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                target = names.get(key)
                if target is None:
                    if not key.endswith(IGNORED_SUFFIXES):
                        unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                seen.add(key)
                dest = params[target.param] if target.expert is None else params[target.param][target.expert]
                if dest.shape != tensor.shape:
                    misshapen.append(f"{key}: {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
                    continue
                with torch.no_grad():
                    dest.copy_(tensor)
    _raise_problems(sorted(names.keys() - seen), unexpected, misshapen)


def _raise_problems(missing: list[str], unexpected: list[str], misshapen: list[str]) -> None:
    sections = [(title, keys) for title, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if not sections:
        return
    lines = [f"{len(keys)} {title} tensor(s):\n  " + "\n  ".join(keys[:20]) + ("\n  ..." if len(keys) > 20 else "") for title, keys in sections]
    raise CheckpointError(
        "the checkpoint does not match the architecture its config.json describes\n" + "\n".join(lines)
    )
