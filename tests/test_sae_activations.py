"""`moe_hooked.sae.HookActivationSource` (needs no sae-lens): its rows are exactly the hook's
activations of every real non-BOS token (per selected slot for an expert), checked against
each text run alone and unpadded; shuffled, repeatable, cycling; bad input refused."""

from __future__ import annotations

import pytest
import torch
from hf_models import qwen2_moe_config
from tiny import tiny_model

from moe_hooked import HookedMoETransformer
from moe_hooked.sae import HookActivationSource, hook_width

CORPORA = {
    "prose": ["The cat sat on the mat and looked at the moon.", "Le chat dort sur le canape.", "The moon."],
    "code": ["def add(a, b): return a + b", "2 + 3 = 5 and 7 * 6 = 42"],
}
TEXTS = [text for texts in CORPORA.values() for text in texts]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """MoE layers 0 and 2, layer 1 dense; 6 experts, top-2, d_model 32."""
    return tiny_model(qwen2_moe_config(), tmp_path_factory.mktemp("qwen"), seed=4)


def one_pass(model, hook_name, **kwargs) -> torch.Tensor:
    """All rows of one pass, one row per batch so that none is dropped."""
    source = HookActivationSource(model, hook_name, CORPORA, batch_size=1, epochs=1, model_batch_size=2, **kwargs)
    return torch.cat(list(source))


def hand_rows(model, hook_name, select=None) -> torch.Tensor:
    """Rows from each text run alone (no padding), BOS dropped; `select(cache, first)` picks
    per-slot rows from position `first` on."""
    first = int(model.cfg.default_prepend_bos)
    rows = []
    for text in TEXTS:
        _, cache = model.run_with_cache(text)
        acts = cache[hook_name][0, first:]
        rows.append(acts.reshape(-1, acts.shape[-1]) if select is None else select(cache, first))
    return torch.cat(rows)


def assert_same_rows(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal as multisets of rows (order differs: the source shuffles)."""
    assert actual.shape == expected.shape
    key = torch.randn(actual.shape[-1], dtype=torch.float64)
    order = lambda rows: rows[(rows.double() @ key).argsort()]  # noqa: E731
    torch.testing.assert_close(order(actual), order(expected), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("hook_name", ["blocks.1.hook_resid_mid", "blocks.2.mlp.hook_router_logits", "blocks.0.hook_resid_pre"])
def test_rows_are_every_real_token_without_bos(qwen, hook_name):
    assert_same_rows(one_pass(qwen, hook_name), hand_rows(qwen, hook_name))


def test_bos_is_dropped_unless_included():
    demo = HookedMoETransformer.from_pretrained("moe-hooked/demo")  # prepends BOS; qwen does not
    hook_name = "blocks.1.hook_resid_mid"
    without_bos = hand_rows(demo, hook_name)
    assert_same_rows(one_pass(demo, hook_name), without_bos)
    with_bos = one_pass(demo, hook_name, include_bos=True)
    assert len(with_bos) == len(without_bos) + len(TEXTS)


def test_expert_rows_are_that_experts_outputs(qwen):
    layer, expert = 2, 3
    mlp = f"blocks.{layer}.mlp."

    def select(cache, first):
        chosen = cache[mlp + "hook_topk_indices"][0, first:] == expert  # [pos k]
        return cache[mlp + "hook_expert_out"][0, first:][chosen]

    expected = hand_rows(qwen, mlp + "hook_expert_out", select)
    assert len(expected) > 0
    assert_same_rows(one_pass(qwen, mlp + "hook_expert_out", expert=expert), expected)
    # without expert=, every slot is a row: k rows per token
    assert len(one_pass(qwen, mlp + "hook_expert_out")) == qwen.cfg.top_k * len(hand_rows(qwen, "blocks.0.hook_resid_pre"))


def test_batches_are_shuffled_repeatable_and_cycle(qwen):
    hook_name = "blocks.1.hook_resid_mid"
    in_corpus_order = hand_rows(qwen, hook_name)
    make = lambda seed: HookActivationSource(qwen, hook_name, CORPORA, batch_size=4, buffer_batches=4, seed=seed)  # noqa: E731
    source = make(0)
    batches = [next(source) for _ in range(2 * len(in_corpus_order) // 4 + 1)]  # more rows than one pass holds
    assert all(batch.shape == (4, qwen.cfg.d_model) for batch in batches)
    torch.testing.assert_close(batches[0], next(make(0)))  # same seed, same batches
    assert not torch.equal(next(make(1)), batches[0])
    assert not torch.allclose(batches[0], in_corpus_order[:4], atol=1e-3)


def test_d_in_and_hook_width(qwen):
    assert HookActivationSource(qwen, "blocks.2.mlp.hook_router_logits", CORPORA).d_in == qwen.cfg.n_experts
    assert hook_width(qwen, "blocks.2.mlp.hook_expert_out") == qwen.cfg.d_model
    assert hook_width(qwen, "blocks.2.mlp.hook_all_expert_out") == qwen.cfg.d_model  # fires in all_experts()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(hook_name="blocks.1.hook_resid_mids"), "did you mean blocks.1.hook_resid_mid"),
        (dict(hook_name="blocks.1.hook_resid_mid", expert=0), "expert= selects slots"),
        (dict(hook_name="blocks.1.mlp.hook_expert_out", expert=0), "not a hook point"),  # layer 1 is dense
        (dict(hook_name="blocks.2.mlp.hook_expert_out", expert=6), "out of range"),
        (dict(hook_name="blocks.1.hook_resid_mid", buffer_batches=1), "buffer_batches >= 2"),
    ],
)
def test_bad_arguments_are_refused(qwen, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HookActivationSource(qwen, corpora=CORPORA, **kwargs)


def test_attention_patterns_are_refused(qwen):
    with pytest.raises(ValueError, match="not laid out as"):
        next(HookActivationSource(qwen, "blocks.0.attn.hook_pattern", CORPORA))
