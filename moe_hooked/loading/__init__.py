"""Loading Hugging Face checkpoints: one module per architecture family.

A family module defines `MODEL_TYPE`, `config_from_hf(raw_config) -> MoEConfig` and
`weight_names(cfg) -> {hub key: Target}`; registering it in `ARCHITECTURES` is all
it takes to support a new family.
"""

from __future__ import annotations

import dataclasses
import warnings
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

from moe_hooked.loading import deepseek, deepseek_v2, deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from moe_hooked.loading.checkpoint import (
    checkpoint_dtype,
    read_config,
    resolve_checkpoint_dir,
    safetensors_files,
    stream_weights,
)
from moe_hooked.loading.errors import CheckpointError, UnsupportedArchitectureError

ARCHITECTURES: dict[str, ModuleType] = {
    module.MODEL_TYPE: module
    for module in (deepseek, deepseek_v2, deepseek_v3, olmoe, qwen2_moe, qwen3_moe, mixtral, gpt_oss)
}

BUILTIN_MODELS = {"moe-hooked/demo": "demo_model"}
"""Reserved names of checkpoints shipped inside the package (under `moe_hooked/assets/`)."""


def family(raw_config: dict) -> ModuleType:
    model_type = raw_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' is not supported; supported are {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def checkpoint_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    if str(name_or_path) in BUILTIN_MODELS:
        return Path(str(resources.files("moe_hooked") / "assets" / BUILTIN_MODELS[str(name_or_path)]))
    return resolve_checkpoint_dir(name_or_path, revision)


MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The dtypes a model can be loaded in."""


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype '{dtype}': use e.g. 'float32', 'bfloat16' or 'float16'")
    if resolved not in MODEL_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in MODEL_DTYPES)
        raise ValueError(f"dtype {resolved} is not supported for a model; supported are {supported}")
    return resolved


def _declared_dtype(raw_config: dict) -> torch.dtype | None:
    """config.json's `dtype` (or older `torch_dtype`) when it names a dtype a model runs in."""
    declared = raw_config.get("dtype") or raw_config.get("torch_dtype")
    resolved = getattr(torch, declared, None) if isinstance(declared, str) else None
    return resolved if resolved in MODEL_DTYPES else None


def load_tokenizer(folder: Path):
    """The folder's tokenizer via `AutoTokenizer`, or None when the folder has none."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json too, and warns about what transformers itself would not
    # load (a model type it lacks, DeepSeekMoE's `rope_scaling: null`): irrelevant to a tokenizer.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(verbosity)


def default_device() -> str:
    """"cuda" when a GPU is available, else "cpu" (as TransformerLens chooses)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give every (meta) parameter and buffer of `model` uninitialised storage on `device`, as
    `Module.to_empty` does, but with `torch.empty`: `to_empty`'s `empty_like` of a meta tensor
    imports sympy on first use, a second of CPU time per process (a tenth of a small report)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            empty = torch.empty(param.shape, dtype=param.dtype, device=device)
            setattr(module, name, torch.nn.Parameter(empty, requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False, remove_duplicate=False)):
            setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device=device))


def load_pretrained(
    model_cls, name_or_path, dtype=None, device=None, revision=None, router_dtype=None, check_finite=False,
    expert_memory_bytes=None,
):
    """Build `model_cls` on the meta device and stream the checkpoint's tensors into it.

    With `check_finite`, every loaded tensor is checked for NaN/Inf (one error lists all).
    With `expert_memory_bytes`, the routed experts stay in the checkpoint files behind an
    expert store (`model.offload_experts`) and only the other weights are read now.
    """
    folder = checkpoint_dir(name_or_path, revision)
    raw = read_config(folder)
    arch = family(raw)
    files = safetensors_files(folder)
    # no dtype given: as transformers' dtype="auto", the declared one, else the stored tensors'
    run_dtype = _as_dtype(dtype) or _declared_dtype(raw) or checkpoint_dtype(files)
    overrides = {"dtype": run_dtype, "device": torch.device(device or default_device())}
    if router_dtype is not None:
        overrides["router_dtype"] = router_dtype
    cfg = dataclasses.replace(arch.config_from_hf(raw), **overrides)
    with torch.device("meta"):
        model = model_cls(cfg, tokenizer=None)
    names = arch.weight_names(cfg)
    offloaded = model.offload_experts(files, names, expert_memory_bytes) if expert_memory_bytes else set()
    model = model.to(cfg.dtype)
    _materialize(model, cfg.device)
    stream_weights(model, files, names, offloaded, check_finite=check_finite)
    if cfg.tie_word_embeddings:
        with torch.no_grad():
            model.unembed.weight.copy_(model.embed.W_E)
    model.tokenizer = load_tokenizer(folder)
    return model.eval()


__all__ = ["ARCHITECTURES", "BUILTIN_MODELS", "CheckpointError", "UnsupportedArchitectureError", "load_pretrained"]
