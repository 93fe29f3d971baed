"""Tests of moe_hooked.lens against hand computations from cache tensors and checkpoint weights.

The hand decoder reads the final norm gain and `lm_head.weight` straight from the saved
safetensors file, so it is independent of how the model folds the gain into W_U.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_models import olmoe_config, qwen2_moe_config
from safetensors import safe_open
from tiny import tiny_model

from moe_hooked.lens import (
    expert_lens,
    expert_resid_stack,
    logit_lens,
    token_topk_cosine,
    topk_cosine,
    topk_cosine_from_cache,
)

TEXTS = ["The cat sat on the mat and looked at the moon.", "def add(a, b): return a + b", "2 + 3 = 5"]
TOP = 4


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("olmoe")
    return tiny_model(olmoe_config(), folder, seed=1), folder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Shared gated expert; layer 1 is dense."""
    folder = tmp_path_factory.mktemp("qwen")
    return tiny_model(qwen2_moe_config(), folder, seed=2), folder


def run(model, texts=TEXTS):
    return model.run_with_cache(list(texts))


def hand_probs(folder, x: torch.Tensor) -> torch.Tensor:
    """softmax(RMSNorm(x) * gain @ lm_head^T) with the checkpoint's own tensors; x [n d_model]."""
    eps = json.loads((folder / "config.json").read_text())["rms_norm_eps"]
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        gain, lm_head = f.get_tensor("model.norm.weight"), f.get_tensor("lm_head.weight")
    x = x.double()
    normalized = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return torch.softmax((normalized * gain.double()) @ lm_head.double().T, dim=-1)


def assert_decodes(table, probs: torch.Tensor, top: int = TOP) -> None:
    """`table` holds, block by block of `top` rows, the top tokens of each row of `probs`."""
    expected_probs, expected_ids = probs.detach().topk(top, dim=-1)
    assert table["rank"].tolist() == list(range(top)) * len(probs)
    assert table["token_id"].tolist() == expected_ids.flatten().tolist()
    np.testing.assert_allclose(table["prob"].to_numpy(), expected_probs.flatten().numpy(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# logit_lens
# ---------------------------------------------------------------------------


def test_logit_lens_matches_hand_decoding_and_model_logits(olmoe):
    model, folder = olmoe
    logits, cache = run(model)
    batch, pos = 1, 5
    table = logit_lens(model, cache, pos=pos, top=TOP, batch=batch)
    n = model.cfg.n_layers
    assert table["layer"].unique().tolist() == list(range(n + 1))
    assert table["label"].unique().tolist() == [f"{i}_pre" for i in range(n)] + ["final_post"]
    resid_pre = torch.stack([cache[f"blocks.{i}.hook_resid_pre"][batch, pos] for i in range(n)])
    assert_decodes(table[table["layer"] < n], hand_probs(folder, resid_pre))
    assert_decodes(table[table["layer"] == n], logits[batch, pos][None].softmax(-1))
    assert table["token"].iloc[0] == model.tokenizer.decode([int(table["token_id"].iloc[0])])


def test_logit_lens_default_is_last_position(olmoe):
    model, _ = olmoe
    logits, cache = model.run_with_cache(TEXTS[0])
    table = logit_lens(model, cache, top=TOP)
    assert_decodes(table[table["label"] == "final_post"], logits[0, -1][None].softmax(-1))


# ---------------------------------------------------------------------------
# expert_lens
# ---------------------------------------------------------------------------


def hand_expert_lens_vectors(cache, layer: int, batch: int, pos: int, shared: bool):
    """(variant, k, vector) in expert_lens's order, rebuilt from the cache by hand."""
    def get(name):
        return cache[f"blocks.{layer}.{name}"][batch, pos].double()

    u, w, out = get("hook_resid_mid"), get("mlp.hook_topk_weights"), get("mlp.hook_expert_out")
    s = get("mlp.hook_shared_out") if shared else torch.zeros_like(u)
    k = len(w)
    rows = [("resid_mid", 0, u)]
    rows += [(f"top{j}", j, u + s + sum(w[i] * out[i] for i in range(j))) for j in range(1, k + 1)]
    rows += [("expert", j + 1, u + s + w[j] * out[j]) for j in range(k)]
    if shared:
        rows.append(("shared", 0, u + s))
    rows.append(("resid_post", k, get("hook_resid_post")))
    return rows


@pytest.mark.parametrize("name, shared", [("olmoe", False), ("qwen", False), ("qwen", True)])
def test_expert_lens_matches_hand_computation(name, shared, request):
    model, folder = request.getfixturevalue(name)
    _, cache = run(model)
    batch, pos = 2, 3
    table = expert_lens(model, cache, pos=pos, batch=batch, top=TOP, include_shared=shared)
    assert list(table.columns) == ["layer", "variant", "k", "expert", "weight", "rank", "token_id", "token", "prob"]
    assert table["layer"].unique().tolist() == list(model.cfg.moe_layers)
    for layer in model.cfg.moe_layers:
        rows = hand_expert_lens_vectors(cache, layer, batch, pos, shared)
        block = table[table["layer"] == layer]
        assert block["variant"].tolist()[::TOP] == [v for v, _, _ in rows]
        assert block["k"].tolist()[::TOP] == [k for _, k, _ in rows]
        assert_decodes(block, hand_probs(folder, torch.stack([x for _, _, x in rows])))
        experts = block[block["variant"] == "expert"][::TOP]
        mlp = f"blocks.{layer}.mlp"
        assert experts["expert"].tolist() == cache[f"{mlp}.hook_topk_indices"][batch, pos].tolist()
        np.testing.assert_allclose(experts["weight"], cache[f"{mlp}.hook_topk_weights"][batch, pos].numpy())
        assert block[block["variant"] != "expert"]["expert"].isna().all()


def test_expert_lens_options(qwen):
    model, _ = qwen
    _, cache = run(model)
    table = expert_lens(model, cache, layers=[2], experts_alone=False, top=2)
    assert table["layer"].unique().tolist() == [2]
    assert table["variant"].tolist()[::2] == ["resid_mid", "top1", "top2", "resid_post"]


def test_shared_included_full_stack_is_resid_post(qwen):
    model, _ = qwen
    _, cache = run(model)
    for layer in model.cfg.moe_layers:
        with_shared = expert_resid_stack(model, cache, layer, include_shared=True)
        torch.testing.assert_close(with_shared[..., -1, :], cache[f"blocks.{layer}.hook_resid_post"])
        routed_only = expert_resid_stack(model, cache, layer)
        resid_mid = cache[f"blocks.{layer}.hook_resid_mid"]
        torch.testing.assert_close(routed_only[..., -1, :], resid_mid + cache[f"blocks.{layer}.mlp.hook_routed_out"])
    table = expert_lens(model, cache, top=TOP, include_shared=True)
    top_k = table[table["variant"] == f"top{model.cfg.top_k}"]
    post = table[table["variant"] == "resid_post"]
    assert top_k["token_id"].tolist() == post["token_id"].tolist()
    np.testing.assert_allclose(top_k["prob"], post["prob"], rtol=1e-5)


def test_expert_lens_orders_slots_by_weight(olmoe):
    """Reversing the slot order with a hook changes nothing the lens reports."""
    model, _ = olmoe
    _, cache = run(model)

    def reverse(x, hook):
        return x.flip(-1)

    hooks = [(f"blocks.{layer}.mlp.hook_{name}", reverse)
             for layer in model.cfg.moe_layers for name in ("topk_indices", "topk_weights")]
    with model.hooks(fwd_hooks=hooks):
        _, flipped = run(model)
    assert not torch.equal(flipped["blocks.0.mlp.hook_topk_indices"], cache["blocks.0.mlp.hook_topk_indices"])
    expected = expert_lens(model, cache, top=TOP)
    got = expert_lens(model, flipped, top=TOP)
    assert got["token_id"].tolist() == expected["token_id"].tolist()
    assert got["expert"].tolist() == expected["expert"].tolist()
    np.testing.assert_allclose(got["prob"], expected["prob"], rtol=1e-5)


def test_lens_errors(olmoe, qwen):
    model, _ = qwen
    _, cache = run(model)
    with pytest.raises(ValueError, match="not a MoE layer"):
        expert_lens(model, cache, layers=[1])
    with pytest.raises(IndexError, match="pos=40"):
        expert_lens(model, cache, pos=40)
    with pytest.raises(IndexError, match="batch=3"):
        logit_lens(model, cache, batch=3)
    with pytest.raises(ValueError, match="top must be"):
        logit_lens(model, cache, top=0)
    _, partial = model.run_with_cache(TEXTS, names_filter=lambda name: name.endswith("resid_mid"))
    with pytest.raises(KeyError, match="the cache has no .blocks.0.mlp.hook_topk_weights"):
        expert_lens(model, partial)
    olmoe_model, _ = olmoe
    _, olmoe_cache = run(olmoe_model)
    with pytest.raises(ValueError, match="no shared expert"):
        expert_lens(olmoe_model, olmoe_cache, include_shared=True)


# ---------------------------------------------------------------------------
# top-1 vs top-k cosine
# ---------------------------------------------------------------------------


def hand_cosine(cache, layer: int, shared: bool = False, variant: str = "top1") -> torch.Tensor:
    """[batch pos] cos(u + w_0 E_0, u + routed_out) (+ shared in u), from the cache; variant
    "u_only": cos(u, u + routed_out); "update": cos(w_0 E_0, routed_out)."""
    mlp = f"blocks.{layer}.mlp"
    u = cache[f"blocks.{layer}.hook_resid_mid"].double()
    if shared:
        u = u + cache[f"{mlp}.hook_shared_out"].double()
    w0 = cache[f"{mlp}.hook_topk_weights"][..., 0, None].double()
    update1 = w0 * cache[f"{mlp}.hook_expert_out"][..., 0, :].double()
    routed = cache[f"{mlp}.hook_routed_out"].double()
    a, b = {"top1": (u + update1, u + routed), "u_only": (u, u + routed), "update": (update1, routed)}[variant]
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("name, shared", [("olmoe", False), ("qwen", True)])
def test_token_topk_cosine_matches_hand(name, shared, request):
    model, _ = request.getfixturevalue(name)
    _, cache = run(model)
    for layer in model.cfg.moe_layers:
        got = token_topk_cosine(model, cache, layer, include_shared=shared)
        torch.testing.assert_close(got.double(), hand_cosine(cache, layer, shared), atol=1e-6, rtol=0)
        same = token_topk_cosine(model, cache, layer, k=model.cfg.top_k, include_shared=shared)
        torch.testing.assert_close(same, torch.ones_like(same), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="k must be"):
        token_topk_cosine(model, cache, model.cfg.moe_layers[0], k=model.cfg.top_k + 1)


def test_topk_cosine_from_cache_masks_padding(olmoe):
    model, _ = olmoe
    _, cache = run(model)
    lengths = [len(model.to_tokens(t)[0]) for t in TEXTS]
    mask = torch.zeros(len(TEXTS), max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    table = topk_cosine_from_cache(model, cache, attention_mask=mask)
    assert list(table.columns) == ["layer", "variant", "cosine", "ci_low", "ci_high", "n_tokens"]
    for layer in model.cfg.moe_layers:
        cos = hand_cosine(cache, layer)
        real = torch.cat([cos[row, :n] for row, n in enumerate(lengths)])
        last = torch.stack([cos[row, n - 1] for row, n in enumerate(lengths)])
        rows = table[table["layer"] == layer].set_index("variant")
        assert rows.loc["all_tokens", "n_tokens"] == rows.loc["u_only", "n_tokens"] == sum(lengths)
        assert rows.loc["last_token", "n_tokens"] == len(TEXTS)
        assert rows.loc["all_tokens", "cosine"] == pytest.approx(real.mean().item(), abs=1e-6)
        assert rows.loc["last_token", "cosine"] == pytest.approx(last.mean().item(), abs=1e-6)
        for variant in ("u_only", "update"):
            baseline = hand_cosine(cache, layer, variant=variant)
            real = torch.cat([baseline[row, :n] for row, n in enumerate(lengths)])
            assert rows.loc[variant, "cosine"] == pytest.approx(real.mean().item(), abs=1e-6)
        # the interval is the range of sequence-resampled means: it holds the mean and lies within
        # the per-sequence means' range
        per_text = [cos[row, :n].sum().item() / n for row, n in enumerate(lengths)]
        low, high = rows.loc["all_tokens", ["ci_low", "ci_high"]]
        assert min(per_text) - 1e-6 <= low <= rows.loc["all_tokens", "cosine"] <= high <= max(per_text) + 1e-6


def test_topk_cosine_streams_corpora_like_unpadded_runs(qwen):
    """Streaming with padded batches of 2 equals running each text alone, by hand."""
    model, _ = qwen
    corpora = {"prose": TEXTS[:1] * 2 + TEXTS[2:], "code": TEXTS[1:2]}
    table = topk_cosine(model, corpora, batch_size=2, include_shared=True, progress=False)
    assert list(table.columns) == ["domain", "layer", "variant", "cosine", "ci_low", "ci_high", "n_tokens"]
    assert table["domain"].unique().tolist() == ["prose", "code"]
    for domain, texts in corpora.items():
        caches = [model.run_with_cache(text)[1] for text in texts]
        for layer in model.cfg.moe_layers:
            per_text = [hand_cosine(c, layer, shared=True)[0] for c in caches]
            rows = table[(table["domain"] == domain) & (table["layer"] == layer)].set_index("variant")
            all_tokens = torch.cat(per_text)
            assert rows.loc["all_tokens", "n_tokens"] == len(all_tokens)
            assert rows.loc["all_tokens", "cosine"] == pytest.approx(all_tokens.mean().item(), abs=1e-5)
            last = torch.stack([c[-1] for c in per_text])
            assert rows.loc["last_token", "cosine"] == pytest.approx(last.mean().item(), abs=1e-5)
            update = torch.cat([hand_cosine(c, layer, shared=True, variant="update")[0] for c in caches])
            assert rows.loc["update", "cosine"] == pytest.approx(update.mean().item(), abs=1e-5)
