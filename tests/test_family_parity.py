"""Parity of Qwen3-MoE, Mixtral and gpt-oss with transformers (eager attention, eager experts).

Tiny random configs saved with `save_pretrained` (each family's hub layout) cover grouped-query
and full heads, k = 1, 2 and 3, norm_topk_prob on and off, dense layers mixed in, sliding
windows shorter than the input, and right-padded batches. bfloat16 parity is in
`test_bfloat16_parity.py`.
"""

from __future__ import annotations

import pytest
import torch
from families import build_and_save, parity_configs

from moe_hooked import HookedMoETransformer

CONFIGS = parity_configs("qwen3_moe", "mixtral", "gpt_oss")
LENGTHS = (21, 15, 9)
"""Real tokens of each row of the padded batch: longer than every sliding window tested."""


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf, folder = build_and_save(request.param, tmp_path_factory.mktemp(request.param), seed=len(request.param))
    return hf, HookedMoETransformer.from_pretrained(folder)


def padded_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(3, vocab, (len(LENGTHS), max(LENGTHS)), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).long()
    return tokens, mask


def test_float32_logits_router_logits_and_hidden_states_match(pair):
    hf, ours = pair
    tokens, mask = padded_batch(hf.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, output_hidden_states=True, output_router_logits=True)
        logits, cache = ours.run_with_cache(tokens, attention_mask=mask)
    assert (ref.logits - logits)[real].abs().max() <= 1e-4
    for layer in range(ours.cfg.n_layers - 1):  # hidden_states[l + 1] is block l's output
        assert torch.allclose(ref.hidden_states[layer + 1][real], cache["resid_post", layer][real], atol=1e-5), layer
    assert len(ref.router_logits) == len(ours.cfg.moe_layers)
    for layer, hf_logits in zip(ours.cfg.moe_layers, ref.router_logits):
        ours_logits = cache["router_logits", layer]
        assert torch.allclose(hf_logits.view_as(ours_logits)[real], ours_logits[real], atol=1e-5), layer
