"""bfloat16 parity with transformers, for every family that transformers implements.

Our bfloat16 model follows the reference's dtypes op by op (where each cast happens, which
softmax runs in float32, in which order the experts' outputs are added), so that it agrees
with HF's eager bfloat16 model exactly, not merely as well as bfloat16 allows.

The reference is HF's model loaded from the bfloat16 checkpoint as a user loads it
(`from_pretrained(dtype=bfloat16)`, eager attention, eager experts): its rotary inverse
frequencies stay float32, which a `.to(bfloat16)` of the float32 model would round.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from families import FAMILIES, build_and_save, parity_configs
from hf_models import save_hf
from transformers import AutoModelForCausalLM

from moe_hooked import HookedMoETransformer

CONFIGS = parity_configs(*(name for name, family in FAMILIES.items() if family.hf_parity))
TOKENS = torch.randint(3, 97, (8, 64), generator=torch.Generator().manual_seed(1))
MASK = (torch.arange(64)[None] < torch.tensor([64, 64, 50, 33, 64, 20, 64, 9])[:, None]).long()
"""A right-padded batch: rows of 9 to 64 real tokens."""


@dataclass
class Models:
    float32: torch.nn.Module
    """HF's float32 model (the checkpoint before the cast)."""
    eager: torch.nn.Module
    """HF's bfloat16 model with eager attention and eager experts."""
    ours: HookedMoETransformer


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory) -> Models:
    folder = tmp_path_factory.mktemp(request.param)
    float32, _ = build_and_save(request.param, folder / "float32", seed=len(request.param))
    bfloat16 = save_hf(copy.deepcopy(float32).to(torch.bfloat16), folder / "bfloat16")
    eager = AutoModelForCausalLM.from_pretrained(
        bfloat16, dtype=torch.bfloat16, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    ours = HookedMoETransformer.from_pretrained(bfloat16)
    assert ours.cfg.dtype == torch.bfloat16
    return Models(float32, eager, ours)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def test_bfloat16_logits_are_hfs_eager_logits_bit_for_bit(models):
    """With the attention pattern materialised (as HF's eager attention does; always with
    gpt-oss's sinks), every op runs in HF's dtype and order, so the logits at the real tokens
    of a padded batch are HF's to the last bit. A failure means one op diverged: compare the
    activations (`run_with_cache` against forward hooks on the HF modules) to find the first."""
    real = MASK.bool()
    with torch.no_grad():
        expected = models.eager(TOKENS, attention_mask=MASK).logits
        pattern = lambda name: name.endswith("hook_pattern")  # noqa: E731
        logits, _ = models.ours.run_with_cache(TOKENS, attention_mask=MASK, names_filter=pattern)
    assert torch.equal(logits[real], expected[real])


def hf_kernel_baseline(models: Models, eager_top1: torch.Tensor) -> float:
    """How often HF's eager bfloat16 top-1 agrees with HF's other bfloat16 attention kernel (sdpa).

    gpt-oss has none on the CPU: transformers declares no sdpa support for it, and its flex
    attention refuses sinks on the CPU ("Attention sinks cannot be run on CPU with flex
    attention"). Its baseline is then HF's bfloat16 agreement with its own float32 model; our
    gpt-oss always runs the eager path, whose logits the test above holds to HF's bit for bit.
    """
    with torch.no_grad():
        if models.ours.cfg.attn_sinks:
            return agreement(models.float32(TOKENS).logits.argmax(-1), eager_top1)
        models.eager.set_attn_implementation("sdpa")
        try:
            return agreement(models.eager(TOKENS).logits.argmax(-1), eager_top1)
        finally:
            models.eager.set_attn_implementation("eager")


def test_bfloat16_top1_agrees_at_least_as_well_as_hfs_own_kernels(models):
    """Our plain forward (PyTorch's fused attention where the pattern need not be materialised)
    agrees with HF's eager bfloat16 model on the top-1 token at least as often as HF's own sdpa
    kernel does, with no slack."""
    with torch.no_grad():
        eager_top1 = models.eager(TOKENS).logits.argmax(-1)
        ours_top1 = models.ours(TOKENS).argmax(-1)
    assert agreement(ours_top1, eager_top1) >= hf_kernel_baseline(models, eager_top1)
