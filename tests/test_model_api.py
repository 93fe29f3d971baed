"""TransformerLens's model API on HookedMoETransformer: stacked attention weights checked
against the transformers model's projections and against the forward pass, MLP and expert
weights in TransformerLens's layout, the QK/OV circuits, token helpers, the default device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import build_hf, qwen2_moe_config, save_hf
from tiny import tiny_model

from moe_hooked import HookedMoETransformer
from moe_hooked.loading import default_device


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Qwen1.5-MoE: grouped-query heads (4 query, 2 key/value), q/k/v biases, a dense layer 1."""
    hf = build_hf(qwen2_moe_config(), seed=6)
    return hf, tiny_model(qwen2_moe_config(), tmp_path_factory.mktemp("q"), seed=6)


@pytest.fixture(scope="module")
def run(pair):
    _, model = pair
    tokens = torch.randint(4, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    return model.run_with_cache(tokens)[1]


def test_attention_weights_are_the_projections_per_head(pair):
    hf, model = pair
    cfg = model.cfg
    n_rep = cfg.n_heads // cfg.n_key_value_heads
    assert model.W_Q.shape == model.W_K.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    assert model.b_O.shape == (cfg.n_layers, cfg.d_model) and not model.b_O.any()
    for layer in range(cfg.n_layers):
        attn = hf.model.layers[layer].self_attn
        for h in range(cfg.n_heads):
            rows, kv_rows = slice(h * cfg.d_head, (h + 1) * cfg.d_head), slice((h // n_rep) * cfg.d_head, (h // n_rep + 1) * cfg.d_head)
            assert torch.equal(model.W_Q[layer, h], attn.q_proj.weight[rows].T)
            assert torch.equal(model.W_K[layer, h], attn.k_proj.weight[kv_rows].T)
            assert torch.equal(model.W_V[layer, h], attn.v_proj.weight[kv_rows].T)
            assert torch.equal(model.W_O[layer, h], attn.o_proj.weight[:, rows].T)
            assert torch.equal(model.b_Q[layer, h], attn.q_proj.bias[rows])
            assert torch.equal(model.b_K[layer, h], attn.k_proj.bias[kv_rows])
            assert torch.equal(model.b_V[layer, h], attn.v_proj.bias[kv_rows])


def test_weights_reproduce_the_forward_pass(pair, run):
    _, model = pair
    layer = 0
    x = run[f"blocks.{layer}.ln1.hook_normalized"] * model.blocks[layer].ln1.w
    v = torch.einsum("bpd,hde->bphe", x, model.W_V[layer]) + model.b_V[layer]
    n_rep = model.cfg.n_heads // model.cfg.n_key_value_heads
    assert torch.allclose(v, run["v", layer].repeat_interleave(n_rep, dim=2), atol=1e-5)
    head_results = torch.einsum("bphe,hed->bpd", run["z", layer], model.W_O[layer]) + model.b_O[layer]
    assert torch.allclose(head_results, run["attn_out", layer], atol=1e-5)
    ov = model.OV[layer, 0].AB
    assert torch.allclose(ov, model.W_V[layer, 0] @ model.W_O[layer, 0])
    assert model.QK.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
    assert torch.allclose(model.QK[layer, 1].AB, model.W_Q[layer, 1] @ model.W_K[layer, 1].T)


def test_mlp_and_expert_weights_in_transformer_lens_layout(pair, run):
    _, model = pair
    dense = next(l for l in range(model.cfg.n_layers) if not model.cfg.is_moe_layer(l))
    mlp = model.blocks[dense].mlp
    x = run[f"blocks.{dense}.ln2.hook_normalized"] * model.blocks[dense].ln2.w
    assert mlp.W_in.shape == (model.cfg.d_model, model.cfg.d_mlp) and mlp.W_out.shape == (model.cfg.d_mlp, model.cfg.d_model)
    assert torch.allclose((F.silu(x @ mlp.W_gate) * (x @ mlp.W_in)) @ mlp.W_out, run["mlp_out", dense], atol=1e-5)
    layer = model.cfg.moe_layers[0]
    experts = model.blocks[layer].mlp.experts
    assert experts.W_in.shape == (model.cfg.n_experts, model.cfg.d_model, model.cfg.d_expert)
    x = run[f"blocks.{layer}.ln2.hook_normalized"][1, 2] * model.blocks[layer].ln2.w
    e = int(run["topk_indices", layer][1, 2, 0])
    by_hand = (F.silu(x @ experts.W_gate_in[e]) * (x @ experts.W_in[e])) @ experts.W_out[e]
    assert torch.allclose(by_hand, run["expert_out", layer][1, 2, 0], atol=1e-5)


def test_token_helpers(pair):
    _, model = pair
    text = "The cat sat on the mat and the cat"
    str_tokens = model.to_str_tokens(text)
    cat = model.to_tokens(text)[0][str_tokens.index(str_tokens[2])]
    assert model.to_single_str_token(int(cat)) == str_tokens[2]
    first, last = (model.get_token_position(int(cat), text, mode=m) for m in ("first", "last"))
    occurrences = (model.to_tokens(text)[0] == cat).nonzero().squeeze(1).tolist()
    assert (first, last) == (occurrences[0], occurrences[-1])
    assert model.get_token_position(str_tokens[2], model.to_tokens(text)) == first
    assert model.to_str_tokens([text, "2 + 3"]) == [str_tokens, model.to_str_tokens("2 + 3")]
    with pytest.raises(ValueError, match="does not occur in the input"):
        model.get_token_position(int(cat), "2 + 3")
    with pytest.raises(ValueError, match="mode must be 'first' or 'last'"):
        model.get_token_position(int(cat), text, mode="middle")
    with pytest.raises(ValueError, match="token id 500 is out of range"):
        model.to_single_str_token(500)


def test_device_defaults_to_cuda_when_available_and_an_explicit_device_wins(pair, tmp_path, monkeypatch):
    hf, _ = pair
    folder = save_hf(hf, tmp_path / "m")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    model = HookedMoETransformer.from_pretrained(folder, device="cpu")
    assert model.cfg.device == torch.device("cpu") and model.W_E.device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"
    assert HookedMoETransformer.from_pretrained(folder).cfg.device == torch.device("cpu")
