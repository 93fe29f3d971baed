"""Write a `HookedMoETransformer` as a checkpoint folder in its family's Hugging Face hub layout.

The inverse of loading: each family's `weight_names(cfg)` sends hub keys to our parameters
(and, for stacked experts, an expert index, or a view of a fused tensor); saving walks the same
map backwards, writing each hub tensor through the same views. Loading the folder back gives the same parameters, hence the same logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from moe_hooked.config import MoEConfig
from moe_hooked.loading import family
from moe_hooked.loading.checkpoint import hub_view, param_view
from moe_hooked.loading.llama_like import Target, as_targets

if TYPE_CHECKING:
    from moe_hooked.model import HookedMoETransformer

RUNTIME_FIELDS = ("dtype", "device", "original_config")
"""MoEConfig fields that say where a model runs, not what it computes."""


def check_config_matches(cfg: MoEConfig, hf_config: dict) -> None:
    """Raise a ValueError naming every field where `hf_config`, as its family translates it,
    describes a different model than `cfg`."""
    translated = family(hf_config).config_from_hf(hf_config)
    differing = [
        f"{f.name}: {getattr(cfg, f.name)!r} in the model, {getattr(translated, f.name)!r} in hf_config"
        for f in dataclasses.fields(cfg)
        if f.name not in RUNTIME_FIELDS and getattr(cfg, f.name) != getattr(translated, f.name)
    ]
    if differing:
        raise ValueError(
            "hf_config describes a different model than the one being saved; fix these fields of "
            "hf_config (or of the model's MoEConfig):\n  " + "\n  ".join(differing)
        )


def hub_state_dict(model: HookedMoETransformer, hf_config: dict) -> dict[str, torch.Tensor]:
    """The model's weights under the hub keys of `hf_config`'s family, one tensor per expert.

    Tensors are detached contiguous CPU copies in the model's dtype.
    """
    cfg = model.cfg
    check_config_matches(cfg, hf_config)
    if cfg.tie_word_embeddings and not torch.equal(model.unembed.weight, model.embed.W_E):
        raise ValueError(
            "the config ties the word embeddings, but the model's unembedding weight differs from its "
            "embedding: save it with tie_word_embeddings=false"
        )
    params = dict(model.named_parameters())
    return {key: _hub_tensor(params, as_targets(value)) for key, value in family(hf_config).weight_names(cfg).items()}


def _hub_tensor(params: dict[str, torch.Tensor], targets: tuple[Target, ...]) -> torch.Tensor:
    """One hub tensor assembled from the parameters its targets fill, through the same views as loading."""
    first = param_view(params, targets[0]).detach()
    if len(targets) == 1 and targets[0].interleave is None and not targets[0].transpose:
        return first.to("cpu", copy=True).contiguous()
    shape = list(first.shape[:-2]) + list(first.shape[-2:][:: -1 if targets[0].transpose else 1])
    shape[-1] *= targets[0].interleave[1] if targets[0].interleave else 1
    hub = torch.empty(shape, dtype=first.dtype)
    for target in targets:
        hub_view(target, hub).copy_(param_view(params, target).detach())
    return hub


def save_hub_checkpoint(
    model: HookedMoETransformer, folder: str | Path, hf_config: dict, dtype: torch.dtype | None = None
) -> Path:
    """Save `model` to `folder` as a Hugging Face checkpoint: config.json (`hf_config`),
    model.safetensors with the family's hub keys (stored in `dtype`, default the model's), and
    the tokenizer files if the model has a tokenizer. `HookedMoETransformer.from_pretrained(folder)`
    loads it back with the same logits (when `dtype` holds the weights exactly).

    `hf_config` must describe the model: it is translated with its family's `config_from_hf`
    and compared with `model.cfg` field by field (a mismatch raises a ValueError).
    """
    folder = Path(folder)
    tensors = {key: tensor.to(dtype or tensor.dtype) for key, tensor in hub_state_dict(model, hf_config).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    return folder
