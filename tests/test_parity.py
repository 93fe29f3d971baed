"""Parity with the reference `transformers` models: the definition of correct."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from families import parity_configs
from hf_models import build_hf, save_hf
from transformers import AutoModelForCausalLM

from moe_hooked import HookedMoETransformer

CONFIGS = parity_configs("olmoe", "qwen2_moe")


def router_logit_hooks(hf_model) -> tuple[dict[int, torch.Tensor], list]:
    """Capture each HF router's logits, keyed by layer index."""
    captured, handles = {}, []
    for layer, decoder_layer in enumerate(hf_model.model.layers):
        gate = getattr(decoder_layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            handles.append(gate.register_forward_hook(lambda m, i, out, layer=layer: captured.__setitem__(layer, out[0])))
    return captured, handles


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = build_hf(CONFIGS[request.param](), seed=len(request.param))
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, HookedMoETransformer.from_pretrained(folder)


def test_float32_logits_router_and_hidden_states_match(pair):
    hf, ours = pair
    tokens = torch.randint(0, hf.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(0))
    captured, handles = router_logit_hooks(hf)
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        logits, cache = ours.run_with_cache(tokens)
    for handle in handles:
        handle.remove()
    assert (ref.logits - logits).abs().max() <= 1e-4
    # hidden_states[0] is the embedding, [l + 1] is the output of block l (the last one after the final norm)
    assert torch.allclose(ref.hidden_states[0], cache["hook_embed"], atol=1e-6)
    for layer in range(ours.cfg.n_layers - 1):
        assert torch.allclose(ref.hidden_states[layer + 1], cache["resid_post", layer], atol=1e-5), layer
    assert set(captured) == set(ours.cfg.moe_layers)
    for layer, hf_logits in captured.items():
        ours_logits = cache["router_logits", layer].flatten(0, 1)
        assert torch.allclose(hf_logits, ours_logits, atol=1e-5), layer


def test_dtype_argument_overrides_checkpoint_dtype(pair, tmp_path):
    hf, _ = pair
    folder = save_hf(hf, tmp_path / "f32")
    ours = HookedMoETransformer.from_pretrained(folder, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())


@pytest.mark.parametrize(
    ("stored", "declared"),
    [(torch.float32, "bfloat16"), (torch.bfloat16, "float32"), (torch.bfloat16, None), (torch.float32, None)],
)
def test_default_dtype_is_the_one_transformers_auto_picks(pair, tmp_path, stored, declared):
    """Without `dtype=`, the model runs in config.json's declared dtype, else in the stored
    tensors' dtype: whatever `transformers` loads with `dtype="auto"`."""
    hf, _ = pair
    folder = save_hf(copy.deepcopy(hf).to(stored), tmp_path / "model")
    config_path = folder / "config.json"
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in ("dtype", "torch_dtype")}
    config_path.write_text(json.dumps(config | ({"dtype": declared} if declared else {})))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").dtype
    ours = HookedMoETransformer.from_pretrained(folder)
    assert reference == (getattr(torch, declared) if declared else stored)
    assert {p.dtype for p in ours.parameters()} == {reference}


def test_padded_batch_matches_unpadded_rows(pair):
    """A right-padded row gives the same logits on its real tokens as the row alone."""
    _, ours = pair
    tokens = torch.randint(3, ours.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0
    with torch.no_grad():
        batched = ours(tokens, attention_mask=mask)
        alone = ours(tokens[1:, :6])
    assert torch.allclose(batched[1, :6], alone[0], atol=1e-5)
