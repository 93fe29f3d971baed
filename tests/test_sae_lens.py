"""SAELens SAEs on hooked MoE models (skipped without sae-lens): SAETrainer trains on a
HookActivationSource; spliced SAEs change the forward pass as a hand-written hook does, leave
it unchanged with the error term, expose their features in the cache; feature_routing equals
numpy's correlation; mismatched SAEs are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import qwen2_moe_config
from tiny import tiny_model

pytest.importorskip("sae_lens")
from sae_lens import StandardSAE, StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

from moe_hooked import HookedMoETransformer  # noqa: E402
from moe_hooked.data import builtin_corpora  # noqa: E402
from moe_hooked.sae import HookActivationSource, SAEHookPoint, attached_saes, feature_routing  # noqa: E402

TEXTS = ["The cat sat on the mat and looked at the moon.", "def add(a, b): return a + b"]
CORPORA = {"prose": TEXTS[:1] + ["Le chat dort sur le canape."], "code": TEXTS[1:] + ["2 + 3 = 5 and 7 * 6 = 42"]}
D_SAE = 48


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """MoE layers 0 and 2, layer 1 dense; 6 experts, top-2, d_model 32."""
    return tiny_model(qwen2_moe_config(), tmp_path_factory.mktemp("qwen"), seed=4)


def make_sae(hook_name: str | None, d_in: int, seed: int = 0) -> StandardSAE:
    """A random SAELens SAE whose features fire on about half of the inputs."""
    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name=hook_name) if hook_name else SAEMetadata()
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=metadata))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.normal_(0, D_SAE**-0.5)
        sae.b_dec.normal_(0, 0.1)
    return sae


def test_training_steps_on_the_demo_model_reduce_the_reconstruction_loss():
    model = HookedMoETransformer.from_pretrained("moe-hooked/demo")
    hook_name = f"blocks.{model.cfg.moe_layers[1]}.hook_resid_mid"  # the router's input
    source = HookActivationSource(model, hook_name, builtin_corpora(["english", "code"]), batch_size=128)
    held_out = next(source)
    torch.manual_seed(0)
    sae = StandardTrainingSAE(
        StandardTrainingSAEConfig(d_in=source.d_in, d_sae=256, l1_coefficient=0.5, metadata=SAEMetadata(hook_name=hook_name))
    )

    def reconstruction_loss() -> float:
        with torch.no_grad():
            return ((sae.decode(sae.encode(held_out)) - held_out) ** 2).sum(-1).mean().item()

    before = reconstruction_loss()
    steps = 40
    trainer_cfg = SAETrainerConfig(total_training_samples=128 * steps, train_batch_size_samples=128, lr=1e-3, lr_end=1e-3)
    SAETrainer(trainer_cfg, sae, source).fit()
    assert reconstruction_loss() < 0.6 * before


def test_error_term_leaves_the_logits_unchanged(qwen):
    sae = make_sae("blocks.1.hook_resid_mid", qwen.cfg.d_model)
    clean = qwen(TEXTS)
    with qwen.saes([sae], use_error_term=True):
        spliced = qwen(TEXTS)
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=0)


def test_splice_without_error_term_equals_a_hand_written_replacement_hook(qwen):
    hook_name = "blocks.2.mlp.hook_router_logits"
    sae = make_sae(hook_name, qwen.cfg.n_experts)
    expected = qwen.run_with_hooks(TEXTS, fwd_hooks=[(hook_name, lambda x, hook: sae.decode(sae.encode(x)))])
    assert not torch.allclose(expected, qwen(TEXTS), atol=1e-3)
    with qwen.saes([sae]):
        torch.testing.assert_close(qwen(TEXTS), expected)
    torch.testing.assert_close(qwen(TEXTS), qwen.run_with_hooks(TEXTS))  # removed on exit


def test_feature_hooks_are_in_the_cache_with_the_documented_shapes(qwen):
    resid = make_sae("blocks.1.hook_resid_mid", qwen.cfg.d_model)
    experts = make_sae("blocks.2.mlp.hook_expert_out", qwen.cfg.d_model, seed=1)
    tokens = qwen.to_tokens(TEXTS)
    batch, pos = tokens.shape
    with qwen.saes([resid, experts], use_error_term=True):
        _, cache = qwen.run_with_cache(tokens)
    d, k = qwen.cfg.d_model, qwen.cfg.top_k
    for hook_name, lead in (("blocks.1.hook_resid_mid", (batch, pos)), ("blocks.2.mlp.hook_expert_out", (batch, pos, k))):
        for suffix in ("hook_sae_input", "hook_sae_recons", "hook_sae_error", "hook_sae_output", ""):
            assert cache[f"{hook_name}.{suffix}".rstrip(".")].shape == (*lead, d)
        for suffix in ("hook_sae_acts_pre", "hook_sae_acts_post"):
            assert cache[f"{hook_name}.{suffix}"].shape == (*lead, D_SAE)
    x = cache["blocks.1.hook_resid_mid.hook_sae_input"]
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid.hook_sae_acts_post"], resid.encode(x))
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid.hook_sae_error"], x - resid.decode(resid.encode(x)))


def test_ablating_a_feature_removes_its_decoder_direction(qwen):
    hook_name, feature = "blocks.1.hook_resid_mid", 5
    sae = make_sae(hook_name, qwen.cfg.d_model)

    def ablate(acts, hook):
        acts[..., feature] = 0
        return acts

    with qwen.saes([sae], use_error_term=True):
        _, clean = qwen.run_with_cache(TEXTS)
        with qwen.hooks(fwd_hooks=[(f"{hook_name}.hook_sae_acts_post", ablate)]):
            _, ablated = qwen.run_with_cache(TEXTS)
    activation = clean[f"{hook_name}.hook_sae_acts_post"][..., feature]
    assert (activation > 0).any()
    expected = clean[hook_name] - activation[..., None] * sae.W_dec[feature]
    torch.testing.assert_close(ablated[hook_name], expected, atol=1e-5, rtol=1e-4)


def test_add_sae_and_reset_saes_restore_the_original_hook_points(qwen):
    hook_name = "blocks.0.mlp.hook_router_logits"
    original = qwen.hook_dict[hook_name]
    names_before = set(qwen.hook_dict)
    sae = make_sae(hook_name, qwen.cfg.n_experts)
    assert qwen.add_sae(sae) == hook_name
    assert isinstance(qwen.hook_dict[hook_name], SAEHookPoint) and attached_saes(qwen) == {hook_name: sae}
    assert f"{hook_name}.hook_sae_acts_post" in qwen.hook_dict
    with pytest.raises(ValueError, match="already spliced"):
        qwen.add_sae(sae)
    qwen.reset_saes()
    assert qwen.hook_dict[hook_name] is original and set(qwen.hook_dict) == names_before
    with pytest.raises(ValueError, match="no SAE is spliced"):
        qwen.reset_saes([hook_name])


def test_saes_context_removes_the_saes_after_an_error(qwen):
    sae = make_sae("blocks.1.hook_resid_mid", qwen.cfg.d_model)
    wrong = make_sae("blocks.2.hook_resid_mid", qwen.cfg.d_model + 1)
    with pytest.raises(ValueError, match="d_in=33"):
        with qwen.saes([sae, wrong]):
            pass
    assert attached_saes(qwen) == {}


@pytest.mark.parametrize(
    ("hook_name", "d_in", "message"),
    [
        ("blocks.1.hook_resid_mid", 16, r"reads d_in=16 values, but 'blocks.1.hook_resid_mid' carries 32"),
        ("blocks.2.mlp.hook_router_logits", 32, r"reads d_in=32 values, but 'blocks.2.mlp.hook_router_logits' carries 6"),
        ("blocks.7.hook_resid_mid", 32, "is not a hook point of this model"),
        ("blocks.1.hook_mlp_outt", 32, "did you mean blocks.1.hook_mlp_out"),
        (None, 32, "names no hook"),
    ],
)
def test_mismatched_saes_are_refused(qwen, hook_name, d_in, message):
    with pytest.raises(ValueError, match=message):
        qwen.add_sae(make_sae(hook_name, d_in))
    assert attached_saes(qwen) == {}


def test_feature_routing_equals_numpys_correlation(qwen):
    layer = 2
    sae = make_sae(f"blocks.{layer}.hook_resid_mid", qwen.cfg.d_model)
    result = feature_routing(qwen, sae, CORPORA, progress=False)
    features, selected = [], []
    for text in [text for texts in CORPORA.values() for text in texts]:  # unpadded, no BOS (qwen has none)
        _, cache = qwen.run_with_cache(text)
        features.append(sae.encode(cache[f"blocks.{layer}.hook_resid_mid"][0]).detach().numpy())
        chosen = cache[f"blocks.{layer}.mlp.hook_topk_indices"][0].numpy()
        selected.append((chosen[:, :, None] == np.arange(qwen.cfg.n_experts)).any(1).astype(float))
    features, selected = np.concatenate(features), np.concatenate(selected)
    with np.errstate(invalid="ignore"):  # constant columns (dead features, experts never chosen) give nan
        expected = np.corrcoef(features.T, selected.T)[:D_SAE, D_SAE:]
    expected[~np.isfinite(expected)] = 0
    assert result.n_tokens == len(features) and result.layer == layer
    np.testing.assert_allclose(result.correlation.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(result.expert_frequency.numpy(), selected.mean(0), atol=1e-6)
    np.testing.assert_allclose(result.feature_frequency.numpy(), (features > 0).mean(0), atol=1e-6)
    top = result.top_features(k=2)
    assert len(top) == 2 * qwen.cfg.n_experts
    best = top[top["rank"] == 0].set_index("expert")
    np.testing.assert_array_equal(best["feature"].to_numpy(), expected.argmax(0))


def test_feature_routing_needs_a_moe_layer(qwen):
    with pytest.raises(ValueError, match="layer 1 is not a MoE layer"):
        feature_routing(qwen, make_sae("blocks.1.hook_resid_mid", qwen.cfg.d_model), CORPORA, progress=False)
