"""The demo model shipped as "moe-hooked/demo" (trained by scripts/train_demo_model.py) and the
hub-layout exporter `moe_hooked.loading.export.save_hub_checkpoint`.

Perplexities and routing distributions are computed here by hand from the logits and from
`hook_topk_indices`, not with the package's analysis functions.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from deepseek_reference import build_reference, deepseek_config, write_checkpoint
from hf_models import build_hf, olmoe_config, qwen2_moe_config, save_hf
from safetensors.torch import load_file
from transformers import OlmoeForCausalLM, Qwen2MoeForCausalLM

from moe_hooked import HookedMoETransformer
from moe_hooked.data import builtin_corpora, load_texts
from moe_hooked.loading.export import save_hub_checkpoint

DOMAINS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "domains"
DEMO_DIR = Path(str(resources.files("moe_hooked") / "assets" / "demo_model"))
N_HELD_OUT = 5  # the training script keeps the last 5 samples of each domain file aside


@pytest.fixture(scope="module")
def demo() -> HookedMoETransformer:
    return HookedMoETransformer.from_pretrained("moe-hooked/demo")


def held_out_texts() -> dict[str, list[str]]:
    if not DOMAINS.is_dir():
        pytest.skip(f"{DOMAINS} is absent")
    return {path.stem: load_texts(path)[-N_HELD_OUT:] for path in sorted(DOMAINS.glob("*.txt"))}


def first_chunks(model: HookedMoETransformer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """<bos> + the first n_ctx - 1 tokens of each text, right-padded: tokens and mask [batch pos]."""
    tokenizer, n_ctx = model.tokenizer, model.cfg.n_ctx
    rows = [[tokenizer.bos_token_id] + tokenizer.encode(t, add_special_tokens=False)[: n_ctx - 1] for t in texts]
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return tokens, mask


class Measured(NamedTuple):
    perplexity: float
    fractions: torch.Tensor
    """[moe_layer, expert]: the share of routing slots each expert gets (<bos> excluded)."""


@torch.no_grad()
def measure(model: HookedMoETransformer, texts: list[str]) -> Measured:
    """Over the real tokens of `first_chunks(texts)`, in one forward pass: exp of the mean
    next-token negative log-likelihood, and the expert shares counted from `hook_topk_indices`."""
    tokens, mask = first_chunks(model, texts)
    routed = mask.bool().clone()
    routed[:, 0] = False
    counts = {}

    def count(indices: torch.Tensor, hook) -> None:  # indices [batch pos k]
        counts[hook.layer()] = torch.bincount(indices[routed].flatten(), minlength=model.cfg.n_experts)

    hooks = [(lambda name: name.endswith("mlp.hook_topk_indices"), count)]
    logits = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
    log_probs = logits[:, :-1].log_softmax(dim=-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    fractions = torch.stack([counts[layer] / counts[layer].sum() for layer in model.cfg.moe_layers])
    return Measured(math.exp(nll[mask[:, 1:].bool()].mean().item()), fractions)


@pytest.fixture(scope="module")
def held_out(demo) -> dict[str, Measured]:
    return {domain: measure(demo, texts) for domain, texts in held_out_texts().items()}


@pytest.fixture(scope="module")
def builtin(demo) -> dict[str, Measured]:
    return {domain: measure(demo, texts) for domain, texts in builtin_corpora().items()}


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per layer: half the L1 distance between two [layer, expert] distributions."""
    return 0.5 * (p - q).abs().sum(dim=-1)


# ------------------------------------------------------------------------------ demo model
def test_demo_checkpoint_is_deepseek_moe_in_the_hub_layout():
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["model_type"] == "deepseek" and config["architectures"] == ["DeepseekForCausalLM"]
    assert (config["n_routed_experts"], config["num_experts_per_tok"], config["first_k_dense_replace"]) == (16, 4, 1)
    assert config["scoring_func"] == "softmax" and config["tie_word_embeddings"] is False
    hidden, expert, layers = config["hidden_size"], config["moe_intermediate_size"], config["num_hidden_layers"]
    tensors = load_file(DEMO_DIR / "model.safetensors")
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        expected |= {prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"}
        expected |= {f"{prefix}self_attn.{p}_proj.weight" for p in "qkvo"}
        mlps = ["mlp"] if layer == 0 else ["mlp.shared_experts"] + [f"mlp.experts.{e}" for e in range(16)]
        expected |= {f"{prefix}{mlp}.{p}_proj.weight" for mlp in mlps for p in ("gate", "up", "down")}
        if layer:
            expected.add(prefix + "mlp.gate.weight")
    assert set(tensors) == expected
    assert tensors["model.layers.1.mlp.experts.15.down_proj.weight"].shape == (hidden, expert)
    shared_width = config["n_shared_experts"] * expert
    assert tensors["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (shared_width, hidden)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (config["intermediate_size"], hidden)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in DEMO_DIR.iterdir()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and config["torch_dtype"] == "float32"
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) < 40 * 2**20


def test_demo_loads_offline_by_its_reserved_name(demo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = demo.cfg
    assert cfg.architecture == "deepseek" and cfg.moe_layers == tuple(range(1, cfg.n_layers))
    assert (cfg.n_experts, cfg.top_k, cfg.router_dtype, cfg.shared_expert_gated) == (16, 4, "model", False)
    stored = load_file(DEMO_DIR / "model.safetensors")["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert cfg.dtype == torch.float32 and torch.equal(demo.blocks[1].mlp.experts.expert_weights(3)["W_up"], stored.float())
    assert demo.tokenizer is not None and demo.to_tokens("def f(x):")[0, 0] == demo.tokenizer.bos_token_id


def test_demo_held_out_perplexity_is_far_below_uniform(demo, held_out):
    """Perplexity of the first 255 tokens of each of the 5 held-out samples per domain.

    Measured: aime-math 22.8, arxiv 104.7, chinese 157.4, english 12.8, french-qa 97.9,
    github 122.0, gsm8k 47.2, against 4096 for a uniform distribution over the vocabulary
    (asserted: below 409.6).
    """
    measured = {domain: m.perplexity for domain, m in held_out.items()}
    assert len(measured) == 7
    assert all(ppl < demo.cfg.d_vocab / 10 for ppl in measured.values()), measured


def test_demo_perplexity_on_builtin_corpora(demo, builtin):
    """The built-in corpora were training text (with more samples from the same generators).
    Measured: chinese 7.0, code 1.8, english 2.7, french 2.4, math 3.5 (asserted: below 409.6)."""
    measured = {domain: m.perplexity for domain, m in builtin.items()}
    assert all(ppl < demo.cfg.d_vocab / 10 for ppl in measured.values()), measured


def test_demo_routing_differs_between_domains(demo, builtin):
    """Total-variation distance between the distributions of experts chosen on code and
    on Chinese (0: same routing, 1: disjoint experts).

    Measured on the built-in corpora, per MoE layer 1-5: 0.35, 0.26, 0.24, 0.20, 0.19; between
    the two halves of the code corpus (the noise floor): 0.027, 0.035, 0.018, 0.023, 0.028.
    """
    code = builtin_corpora(["code"])["code"]
    half = len(code) // 2
    noise = total_variation(measure(demo, code[:half]).fractions, measure(demo, code[half:]).fractions)
    across = total_variation(builtin["code"].fractions, builtin["chinese"].fractions)
    assert across.max() > 0.3
    assert (across > 5 * noise).all(), (across, noise)


def test_demo_routing_differs_between_held_out_domains(held_out):
    """Total-variation distance of the routing (as above) on the held-out samples.

    Measured: github vs chinese, per MoE layer 1-5: 0.27, 0.22, 0.40, 0.30, 0.35; the largest
    over all domain pairs and layers: 0.51 (arxiv vs chinese, layer 5); the smallest pair
    maximum: 0.28 (aime-math vs gsm8k).
    """
    fractions = {domain: m.fractions for domain, m in held_out.items()}
    assert total_variation(fractions["github"], fractions["chinese"]).max() > 0.3
    pair_maxima = [total_variation(p, q).max() for p, q in itertools.combinations(fractions.values(), 2)]
    assert max(pair_maxima) > 0.5 and min(pair_maxima) > 0.2


def decode_probability(model: HookedMoETransformer, resid: torch.Tensor, token: int) -> float:
    """The probability of `token` when the residual vector `resid` [d_model] is decoded as the
    final residual stream (final norm, unembedding, softmax)."""
    return model.unembed(model.ln_final(resid[None, None]))[0, 0].softmax(-1)[token].item()


@torch.no_grad()
def test_demo_top1_expert_carries_the_layer_update_the_notebook_states(demo):
    """Notebook 03's statement, recomputed from the hooks: in "def factorial(n): total = 1 for i
    in range(2, n + 1): total *= i return", layer 4's post-attention residual u decodes " total"
    with probability 0.33, u + shared expert 0.37, + the highest-weighted routed expert 0.88,
    + all four 0.97."""
    tokens = demo.to_tokens("def factorial(n): total = 1 for i in range(2, n + 1): total *= i return")
    _, cache = demo.run_with_cache(tokens)
    answer = demo.to_single_token(" total")
    u = cache["blocks.4.hook_resid_mid"][0, -1]
    base = u + cache["blocks.4.mlp.hook_shared_out"][0, -1]
    weights = cache["blocks.4.mlp.hook_topk_weights"][0, -1]
    updates = weights[:, None] * cache["blocks.4.mlp.hook_expert_out"][0, -1]  # [k d_model]
    by_weight = updates[weights.argsort(descending=True)]
    probs = [decode_probability(demo, vector, answer) for vector in (u, base, base + by_weight[0], base + by_weight.sum(0))]
    assert probs[0] < 0.5 and probs[1] < 0.5 and probs[2] > 0.8 and probs[3] > 0.9, probs
    assert torch.allclose(base + by_weight.sum(0), cache["blocks.4.hook_resid_post"][0, -1], atol=1e-4)


@torch.no_grad()
def test_demo_one_expert_decides_the_prediction_the_notebook_ablates(demo):
    """Notebook 04's statement, recomputed by hand: after "... find an old basket" the model
    predicts " under" (runner-up " at"); expert 7 of layer 5 contributes 6.17 of the logit
    difference 6.29 directly, and zeroing its routing weight at that position alone makes
    another token the top prediction (the token's loss 0.007 -> 1.83 nats)."""
    tokens = demo.to_tokens(builtin_corpora(["english"])["english"][0])[:, :48]
    context = demo.to_tokens("Every spring, Victor and Daniel spend a week by the river bank and talk about rivers and "
                             "lakes. Leo was relieved to find an old basket")
    pos = context.shape[1] - 1
    assert torch.equal(tokens[:, : pos + 1], context)
    answer, runner_up = demo.to_single_token(" under"), demo.to_single_token(" at")
    logits, cache = demo.run_with_cache(tokens)
    assert logits[0, pos].topk(2).indices.tolist() == [answer, runner_up] and tokens[0, pos + 1] == answer
    slot = int((cache["blocks.5.mlp.hook_topk_indices"][0, pos] == 7).nonzero()[0])
    weighted = cache["blocks.5.mlp.hook_topk_weights"][0, pos, slot] * cache["blocks.5.mlp.hook_expert_out"][0, pos, slot]
    direction = demo.tokens_to_residual_directions(answer) - demo.tokens_to_residual_directions(runner_up)
    direct = (weighted / cache["ln_final.hook_scale"][0, pos]) @ direction
    logit_diff = logits[0, pos, answer] - logits[0, pos, runner_up]
    assert direct > 0.9 * logit_diff > 5, (direct, logit_diff)

    def drop_expert_7(weights: torch.Tensor, hook) -> torch.Tensor:
        weights[0, pos, slot] = 0.0
        return weights

    ablated = demo.run_with_hooks(tokens, fwd_hooks=[("blocks.5.mlp.hook_topk_weights", drop_expert_7)])
    assert ablated[0, pos].argmax() != answer
    assert ablated[0, pos].log_softmax(-1)[answer] < -1.0 < logits[0, pos].log_softmax(-1)[answer]


def test_training_script_writes_a_bfloat16_checkpoint_that_loads_as_the_trained_model(tmp_path):
    """A two-step run of scripts/train_demo_model.py at toy sizes: it trains, rounds the weights to
    bfloat16, saves them so with config.json declaring float32, and checks the reload itself."""
    if not DOMAINS.is_dir():
        pytest.skip(f"{DOMAINS} is absent")
    out = tmp_path / "demo"
    toy = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-mlp", "64", "--d-expert", "16", "--steps", "2",
           "--eval-every", "2", "--log-every", "1", "--eval-tokens", "64", "--generated-samples", "20",
           "--vocab-size", "512", "--n-ctx", "64", "--batch-size", "2", "--held-out", "2"]
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(out), "--data", str(DOMAINS), *toy],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "from_pretrained reproduces the logits exactly" in done.stdout
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    model = HookedMoETransformer.from_pretrained(out)
    assert model.cfg.dtype == torch.float32 and model.cfg.n_layers == 2 and len(model.tokenizer) == 512


# -------------------------------------------------------------------------------- exporter
def test_export_writes_the_reference_writers_tensors_and_loads_back(tmp_path):
    """A tiny random DeepSeekMoE: our export of it equals, key by key, the checkpoint written by
    the independent reference writer, and loads back with the same logits."""
    config = deepseek_config()
    reference = build_reference(config, seed=1)
    ours = HookedMoETransformer.from_pretrained(write_checkpoint(reference, config, tmp_path / "reference"))
    save_hub_checkpoint(ours, tmp_path / "export", config)
    written = load_file(tmp_path / "export" / "model.safetensors")
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], expected[key]) for key in expected)
    assert json.loads((tmp_path / "export" / "config.json").read_text()) == config
    reloaded = HookedMoETransformer.from_pretrained(tmp_path / "export")
    ids = torch.randint(0, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), ours(ids))
        assert torch.allclose(reloaded(ids), reference(ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    ("config", "hf_class"),
    [(olmoe_config(), OlmoeForCausalLM), (qwen2_moe_config(), Qwen2MoeForCausalLM)],
    ids=["olmoe", "qwen2_moe"],
)
def test_export_loads_in_transformers(config, hf_class, tmp_path):
    """OLMoE and Qwen2-MoE exports load in transformers' own classes with the same logits."""
    original = build_hf(config)
    ours = HookedMoETransformer.from_pretrained(save_hf(original, tmp_path / "original"))
    save_hub_checkpoint(ours, tmp_path / "export", ours.cfg.original_config)
    exported = hf_class.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, original(ids).logits, atol=1e-5)
        assert torch.equal(HookedMoETransformer.from_pretrained(tmp_path / "export")(ids), ours(ids))


def test_export_refuses_a_config_of_another_model(tmp_path):
    config = deepseek_config()
    folder = write_checkpoint(build_reference(config), config, tmp_path / "reference")
    ours = HookedMoETransformer.from_pretrained(folder)
    with pytest.raises(ValueError, match="d_expert: 16 in the model, 32 in hf_config"):
        save_hub_checkpoint(ours, tmp_path / "export", config | {"moe_intermediate_size": 32})
    assert not (tmp_path / "export").exists()
