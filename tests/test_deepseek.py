"""DeepSeekMoE v1 (`model_type` "deepseek"): parity with a reference composed of
transformers' own modules (see `deepseek_reference.py`), loading of the real hub
layout (single file and sharded), hooks, router precision and unsupported variants."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from deepseek_reference import build_reference, deepseek_config, moe_layers, write_checkpoint, write_word_tokenizer

from moe_hooked import HookedMoETransformer, UnsupportedArchitectureError
from moe_hooked.loading import deepseek

# deepseek-ai/deepseek-moe-16b-base's config.json (the fields the translation reads)
DEEPSEEK_MOE_16B = dict(
    model_type="deepseek",
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    norm_topk_prob=False,
    scoring_func="softmax",
    aux_loss_alpha=0.001,
    seq_aux=True,
    hidden_act="silu",
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=10000,
    rope_scaling=None,
    attention_bias=False,
    tie_word_embeddings=False,
    bos_token_id=100000,
    eos_token_id=100001,
)


def tokens(config: dict, batch: int = 3, pos: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config["vocab_size"], (batch, pos), generator=torch.Generator().manual_seed(seed))


def capture_outputs(modules: dict[int, torch.nn.Module]) -> tuple[dict[int, object], list]:
    """Record each module's forward output, keyed like `modules`; returns (records, hook handles)."""
    captured, handles = {}, []
    for layer, module in modules.items():
        handles.append(module.register_forward_hook(lambda m, i, out, layer=layer: captured.__setitem__(layer, out)))
    return captured, handles


def run_both(reference, ours, ids: torch.Tensor):
    """Reference outputs (with its gates' outputs per MoE layer) and our logits and cache."""
    gates = {layer: reference.model.layers[layer].mlp.gate for layer in ours.cfg.moe_layers}
    captured, handles = capture_outputs(gates)
    with torch.no_grad():
        ref = reference(ids, output_hidden_states=True)
        logits, cache = ours.run_with_cache(ids)
    for handle in handles:
        handle.remove()
    return ref, captured, logits, cache


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "norm_topk_prob"])
def pair(request, tmp_path_factory):
    config = deepseek_config(norm_topk_prob=request.param)
    reference = build_reference(config, seed=3)
    folder = write_checkpoint(reference, config, tmp_path_factory.mktemp("deepseek"))
    return config, reference, HookedMoETransformer.from_pretrained(folder)


def assert_parity(reference, ours, ids: torch.Tensor) -> None:
    ref, gates, logits, cache = run_both(reference, ours, ids)
    assert (ref.logits - logits).abs().max() <= 1e-4
    # hidden_states[l + 1] is the output of block l; the last one comes after the final norm
    for layer in range(ours.cfg.n_layers - 1):
        assert torch.allclose(ref.hidden_states[layer + 1], cache["resid_post", layer], atol=1e-5), layer
    last = reference.model.norm(cache["resid_post", -1])
    assert torch.allclose(ref.hidden_states[-1], last, atol=1e-5)
    assert set(gates) == set(moe_layers(ours.cfg.original_config))
    for layer, (router_logits, weights, indices) in gates.items():
        assert torch.allclose(router_logits, cache["router_logits", layer].flatten(0, 1), atol=1e-5), layer
        # the reference's top-k is unsorted; ours puts the highest weight in slot 0
        order = weights.argsort(dim=-1, descending=True)
        assert torch.equal(indices.gather(-1, order), cache["topk_indices", layer].flatten(0, 1)), layer
        assert torch.allclose(weights.gather(-1, order), cache["topk_weights", layer].flatten(0, 1), atol=1e-6), layer


def test_config_of_deepseek_moe_16b():
    cfg = deepseek.config_from_hf(DEEPSEEK_MOE_16B)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (28, 2048, 16, 16, 128)
    assert cfg.moe_layers == tuple(range(1, 28)) and cfg.d_mlp == 10944
    assert (cfg.n_experts, cfg.top_k, cfg.d_expert, cfg.d_shared_expert) == (64, 6, 1408, 2 * 1408)
    assert not cfg.shared_expert_gated and not cfg.norm_topk_prob and cfg.norm_topk_eps == 1e-20
    assert cfg.router_dtype == "model"
    assert (cfg.rope_theta, cfg.eps, cfg.d_vocab, cfg.tie_word_embeddings) == (10000.0, 1e-6, 102400, False)
    assert cfg.default_prepend_bos and cfg.bos_token_id == 100000


def test_absent_keys_take_the_deepseek_defaults():
    absent = ("num_key_value_heads", "first_k_dense_replace", "moe_layer_freq", "norm_topk_prob", "scoring_func",
              "rms_norm_eps", "rope_theta", "n_shared_experts", "bos_token_id", "eos_token_id")
    cfg = deepseek.config_from_hf({k: v for k, v in DEEPSEEK_MOE_16B.items() if k not in absent})
    assert cfg.n_key_value_heads == 16 and cfg.moe_layers == tuple(range(28))
    assert cfg.d_shared_expert is None and not cfg.norm_topk_prob
    assert (cfg.eps, cfg.rope_theta, cfg.bos_token_id, cfg.eos_token_id) == (1e-6, 10000.0, 100000, 100001)


def test_moe_layer_frequency():
    layout = dict(first_k_dense_replace=3, moe_layer_freq=2, num_hidden_layers=9)
    cfg = deepseek.config_from_hf(DEEPSEEK_MOE_16B | layout)
    assert cfg.moe_layers == (4, 6, 8)


def test_float32_logits_router_and_hidden_states_match(pair):
    config, reference, ours = pair
    assert ours.cfg.moe_layers == (1, 2) and not ours.blocks[0].is_moe
    assert_parity(reference, ours, tokens(config))


def test_norm_topk_prob_follows_deepseek_formula(pair):
    config, _, ours = pair
    _, cache = ours.run_with_cache(tokens(config, seed=1))
    for layer in ours.cfg.moe_layers:
        top = cache["router_logits", layer].softmax(dim=-1).topk(config["num_experts_per_tok"], dim=-1).values
        expected = top / (top.sum(-1, keepdim=True) + 1e-20) if config["norm_topk_prob"] else top
        assert torch.allclose(cache["topk_weights", layer], expected, atol=1e-7), layer
        sums = cache["topk_weights", layer].sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums)) == config["norm_topk_prob"]


def test_norm_topk_prob_is_off_for_top1():
    """DeepSeekMoE v1 renormalises only when top-k > 1."""
    cfg = deepseek.config_from_hf(DEEPSEEK_MOE_16B | dict(norm_topk_prob=True, num_experts_per_tok=1))
    assert not cfg.norm_topk_prob


def test_dense_and_shared_expert_hooks(pair):
    config, reference, ours = pair
    ids = tokens(config, batch=2, pos=7)
    layers = reference.model.layers
    shared, handles = capture_outputs({layer: layers[layer].mlp.shared_experts for layer in ours.cfg.moe_layers})
    dense_in, dense_handles = capture_outputs({0: layers[0].post_attention_layernorm})
    with torch.no_grad():
        reference(ids)
        _, cache = ours.run_with_cache(ids)
    for handle in handles + dense_handles:
        handle.remove()
    mlp = layers[0].mlp
    assert torch.allclose(cache["blocks.0.mlp.hook_pre"], mlp.gate_proj(dense_in[0]), atol=1e-5)
    expected_post = F.silu(mlp.gate_proj(dense_in[0])) * mlp.up_proj(dense_in[0])
    assert torch.allclose(cache["blocks.0.mlp.hook_post"], expected_post, atol=1e-5)
    assert cache["blocks.0.mlp.hook_post"].shape == (2, 7, config["intermediate_size"])
    for layer in ours.cfg.moe_layers:
        assert torch.allclose(cache["shared_out", layer], shared[layer], atol=1e-5), layer
        width = config["n_shared_experts"] * config["moe_intermediate_size"]
        assert cache[f"blocks.{layer}.mlp.shared_expert.hook_post"].shape == (2, 7, width)


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    config = deepseek_config(num_hidden_layers=4)
    reference = build_reference(config, seed=5)
    folder = write_checkpoint(reference, config, tmp_path, n_shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (folder / "model.safetensors").exists()
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in index["weight_map"]
    ours = HookedMoETransformer.from_pretrained(folder)
    assert_parity(reference, ours, tokens(config, batch=2, seed=2))


def test_router_dtype_float32_option(pair, tmp_path):
    config, reference, _ = pair
    folder = write_checkpoint(reference, config, tmp_path, dtype=torch.bfloat16)
    ids = tokens(config, batch=2, pos=9)
    as_model = HookedMoETransformer.from_pretrained(folder)
    as_float32 = HookedMoETransformer.from_pretrained(folder, router_dtype="float32")
    assert as_model.cfg.dtype == torch.bfloat16 and as_model.cfg.router_dtype == "model"
    assert as_float32.cfg.router_dtype == "float32"
    layer = as_model.cfg.moe_layers[-1]
    moe_input = []
    handle = as_model.blocks[layer].mlp.register_forward_pre_hook(lambda m, args: moe_input.append(args[0]))
    with torch.no_grad():
        _, model_cache = as_model.run_with_cache(ids)
        _, float32_cache = as_float32.run_with_cache(ids)
    handle.remove()
    # DeepSeekMoE v1's gate: logits and softmax in the model dtype
    expected = F.linear(moe_input[0], as_model.blocks[layer].mlp.router.weight).softmax(dim=-1)
    assert model_cache["router_probs", layer].dtype == torch.bfloat16
    assert torch.equal(model_cache["router_probs", layer], expected)
    assert float32_cache["router_probs", layer].dtype == torch.float32
    expected32 = float32_cache["router_logits", layer].float().softmax(dim=-1)
    assert torch.allclose(float32_cache["router_probs", layer], expected32, atol=1e-7)


def test_string_input_prepends_bos_with_the_checkpoint_tokenizer(pair, tmp_path):
    config, reference, _ = pair
    folder = write_checkpoint(reference, config, tmp_path)
    write_word_tokenizer(folder, ["experts", "route", "tokens"])
    ours = HookedMoETransformer.from_pretrained(folder)
    assert ours.to_tokens("experts route tokens").tolist() == [[config["bos_token_id"], 3, 4, 5]]
    with torch.no_grad():
        assert torch.equal(ours("route tokens"), ours(torch.tensor([[config["bos_token_id"], 4, 5]])))


@pytest.mark.parametrize(
    "variant, named",
    [
        (dict(scoring_func="sigmoid"), "scoring_func 'sigmoid'"),
        (dict(topk_method="group_limited_greedy"), "topk_method 'group_limited_greedy'"),
        (dict(topk_method="noaux_tc"), "topk_method 'noaux_tc'"),
        (dict(kv_lora_rank=512), "kv_lora_rank 512"),
        (dict(q_lora_rank=1536, kv_lora_rank=None), "q_lora_rank 1536"),
        (dict(routed_scaling_factor=2.5), "routed_scaling_factor 2.5"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(n_routed_experts=None), "n_routed_experts"),
    ],
)
def test_unsupported_deepseek_variants_raise(variant, named):
    with pytest.raises(UnsupportedArchitectureError, match="supports DeepSeekMoE v1") as err:
        deepseek.config_from_hf(DEEPSEEK_MOE_16B | variant)
    assert named in str(err.value)


def test_greedy_v1_style_fields_are_accepted():
    v1_fields = dict(topk_method="greedy", routed_scaling_factor=1.0, kv_lora_rank=None, q_lora_rank=None)
    cfg = deepseek.config_from_hf(DEEPSEEK_MOE_16B | v1_fields)
    assert cfg.n_experts == 64


def test_v1_refusal_points_to_the_v2_and_v3_families():
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'deepseek_v2' or 'deepseek_v3'"):
        deepseek.config_from_hf(DEEPSEEK_MOE_16B | dict(kv_lora_rank=512))
