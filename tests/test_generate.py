"""`model.generate` and the KV cache: greedy decoding equals transformers' `generate` on every
family, the cache changes no token, left-padded batches equal their unbatched rows, hooks act
at every step, sampling filters, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build_and_save
from hf_models import olmoe_config
from tiny import tiny_model

from moe_hooked import HookedMoETransformer
from moe_hooked.components.kv_cache import KVCache
from moe_hooked.generation import sample_logits
from moe_hooked.interventions import ablate_experts
from moe_hooked.viz import expert_weight_view, routing_cache, top1_expert_view

N_NEW = 12


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """Every family's tiny reference (a transformers model) and its hooked twin."""
    reference, folder = build_and_save(next(iter(FAMILIES[request.param].configs)), tmp_path_factory.mktemp(request.param), 1)
    return reference, HookedMoETransformer.from_pretrained(folder)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> HookedMoETransformer:
    return tiny_model(olmoe_config(num_key_value_heads=2), tmp_path_factory.mktemp("text"), seed=2)


PROMPTS = ["The cat sat on the mat", "2 + 3", "Le chat dort sur le canape, la nuit"]


def greedy(model, input, **kwargs):
    return model.generate(input, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, verbose=False, **kwargs)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_equals_transformers_generate_with_and_without_cache(pair, seed):
    hf, ours = pair
    ids = torch.randint(3, ours.cfg.d_vocab, (1, 5 + 2 * seed), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert torch.equal(greedy(ours, ids), ref)
    assert torch.equal(greedy(ours, ids, use_past_kv_cache=False), ref)


def test_cached_forward_equals_full_forward(pair):
    """Logits of a sequence run in three chunks through one KVCache equal one full pass."""
    _, ours = pair
    ids = torch.randint(3, ours.cfg.d_vocab, (2, 11), generator=torch.Generator().manual_seed(4))
    cache = KVCache(ours.cfg.n_layers)
    with torch.no_grad():
        full = ours(ids)
        chunks = [ours(ids[:, a:b], past_kv_cache=cache) for a, b in ((0, 4), (4, 5), (5, 11))]
    assert cache.n_cached == 11 and cache[0].keys.shape[1] == 11
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_left_padded_batch_rows_equal_their_unbatched_runs(text_model):
    tokens = greedy(text_model, PROMPTS, return_type="tokens")
    lengths = [text_model.to_tokens(p).shape[1] for p in PROMPTS]
    assert tokens.shape == (len(PROMPTS), max(lengths) + N_NEW)
    for row, prompt, length in zip(tokens, PROMPTS, lengths):
        alone = greedy(text_model, prompt, return_type="tokens")[0]
        assert torch.equal(row[max(lengths) - length :], alone), prompt
        assert (row[: max(lengths) - length] == text_model.pad_token_id()).all()
    uncached = greedy(text_model, PROMPTS, return_type="tokens", use_past_kv_cache=False)
    assert torch.equal(uncached, tokens)


def test_left_padded_logits_equal_unpadded(text_model):
    """Rotary positions count real tokens: a left-padded row's logits equal the row alone."""
    ids = torch.randint(3, text_model.cfg.d_vocab, (1, 6), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.allclose(text_model(padded, attention_mask=mask)[:, 3:], text_model(ids), atol=1e-5)


# ----------------------------------------------------------------------------- return types and EOS
def test_return_types_follow_the_input(text_model):
    out = greedy(text_model, PROMPTS[0])
    prompt_text = text_model.to_string(text_model.to_tokens(PROMPTS[0])[0, 1:])  # BOS removed
    assert isinstance(out, str) and out.startswith(prompt_text) and len(out) > len(prompt_text)
    listed = greedy(text_model, PROMPTS[:2])
    assert isinstance(listed, list) and listed[0] == out
    tokens = text_model.to_tokens(PROMPTS[0])
    assert greedy(text_model, tokens).shape == (1, tokens.shape[1] + N_NEW)
    assert greedy(text_model, tokens[0]).shape == (tokens.shape[1] + N_NEW,)
    assert greedy(text_model, tokens, return_type="str") == [text_model.to_string(greedy(text_model, tokens)[0])]


def test_stops_at_eos_and_pads_finished_rows_with_it(text_model):
    free = greedy(text_model, PROMPTS, return_type="tokens")
    n_prompt = free.shape[1] - N_NEW
    eos = int(free[0, n_prompt + 2])  # row 0's third new token plays the EOS
    stopped = text_model.generate(
        PROMPTS, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, return_type="tokens", verbose=False
    )
    first_eos = [int((row[n_prompt:] == eos).nonzero()[0]) if (row[n_prompt:] == eos).any() else None for row in free]
    for row, free_row, at in zip(stopped, free, first_eos):
        if at is None:  # a row that never meets EOS runs to the end of the others
            assert torch.equal(row, free_row[: row.shape[0]])
            continue
        assert torch.equal(row[: n_prompt + at + 1], free_row[: n_prompt + at + 1])
        assert (row[n_prompt + at :] == eos).all()
    longest = max((at for at in first_eos if at is not None), default=N_NEW - 1)
    expected_new = N_NEW if None in first_eos else longest + 1
    assert stopped.shape[1] == n_prompt + expected_new


# ----------------------------------------------------------------------------- sampling
def test_sampling_with_and_without_cache_gives_the_same_tokens(text_model):
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(
            text_model.generate(
                PROMPTS, max_new_tokens=N_NEW, temperature=0.8, top_k=20, top_p=0.9, use_past_kv_cache=use_cache, verbose=False
            )
        )
    assert outs[0] == outs[1]


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    torch.manual_seed(0)
    # top_p=0.7: tokens 1 (0.5) and 3 (0.3) reach 0.8 >= 0.7; token 2 and 0 are cut
    assert set(sample_logits(logits, top_p=0.7).tolist()) == {1, 3}
    assert set(sample_logits(logits, top_p=0.5).tolist()) == {1}
    assert set(sample_logits(logits, top_k=3).tolist()) == {1, 2, 3}
    assert set(sample_logits(logits, top_p=1.0).tolist()) == {0, 1, 2, 3}
    frequencies = torch.bincount(sample_logits(logits), minlength=4) / 4000
    assert torch.allclose(frequencies, probs, atol=0.03)
    assert torch.equal(sample_logits(logits[:2], do_sample=False), torch.tensor([1, 1]))
    assert torch.equal(sample_logits(logits[:2], temperature=0), torch.tensor([1, 1]))


def test_freq_penalty_discourages_repeats(text_model):
    plain = greedy(text_model, PROMPTS[0], return_type="tokens")[0]
    penalised = greedy(text_model, PROMPTS[0], return_type="tokens", freq_penalty=100.0)[0]
    new = penalised[-N_NEW:]
    assert len(set(new.tolist())) == N_NEW  # no token repeats
    assert not set(new.tolist()) & set(penalised[:-N_NEW].tolist())  # nor repeats the prompt
    assert not torch.equal(plain, penalised)


# ----------------------------------------------------------------------------- hooks
def test_hooks_act_at_every_step_with_documented_shapes(text_model):
    shapes = {"resid": [], "pattern": []}

    def record(name):
        return lambda x, hook: shapes[name].append(tuple(x.shape))

    hooks = [("blocks.0.hook_resid_pre", record("resid")), ("blocks.1.attn.hook_pattern", record("pattern"))]
    n_prompt = text_model.to_tokens(PROMPTS[1]).shape[1]
    with text_model.hooks(fwd_hooks=hooks):
        greedy(text_model, PROMPTS[1])
    d_model, n_heads = text_model.cfg.d_model, text_model.cfg.n_heads
    assert shapes["resid"] == [(1, n_prompt, d_model)] + [(1, 1, d_model)] * (N_NEW - 1)
    assert shapes["pattern"] == [(1, n_heads, n_prompt, n_prompt)] + [
        (1, n_heads, 1, n_prompt + step) for step in range(1, N_NEW)
    ]


def test_interventions_during_generation_match_an_uncached_run(text_model):
    steer = torch.randn(text_model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def add_direction(resid, hook):
        return resid + 3 * steer

    hooks = ablate_experts(text_model, {0: [0, 1, 2], 2: [3]}) + [("blocks.1.hook_resid_mid", add_direction)]
    with text_model.hooks(fwd_hooks=hooks):
        cached = greedy(text_model, PROMPTS, return_type="tokens")
        uncached = greedy(text_model, PROMPTS, return_type="tokens", use_past_kv_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, greedy(text_model, PROMPTS, return_type="tokens"))


def test_routing_trace_of_the_generated_tokens(text_model):
    """The views take the generated token ids; the routing they show is the model's."""
    tokens = greedy(text_model, PROMPTS[0], return_type="tokens")[0]
    _, cache = text_model.run_with_cache(tokens)
    trace, str_tokens = routing_cache(text_model, tokens)
    assert str_tokens == text_model.to_str_tokens(tokens)
    for layer in text_model.cfg.moe_layers:
        assert torch.equal(trace["topk_indices", layer], cache["topk_indices", layer])
    html = top1_expert_view(text_model, tokens).to_html()
    assert all(f"layer {layer}" in html for layer in text_model.cfg.moe_layers)
    assert "expert 3 at layer 2" in expert_weight_view(text_model, tokens, layer=2, expert=3).to_html()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(padding_side="right"), "padding_side='right' is not supported"),
        (dict(return_type="logits"), "return_type must be"),
        (dict(max_new_tokens=100), "exceed the model's context of 64: ask for at most"),
        (dict(eos_token_id=[]), "eos_token_id is an empty list"),
    ],
)
def test_bad_arguments_are_refused(text_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        text_model.generate(PROMPTS[0], **({"verbose": False} | kwargs))


def test_prompt_longer_than_the_context_is_refused(text_model):
    ids = torch.randint(3, 97, (1, text_model.cfg.n_ctx + 1))
    with pytest.raises(ValueError, match="longer than the model's context of 64: shorten it"):
        text_model.generate(ids, verbose=False)


def test_kv_cache_refuses_a_different_batch(text_model):
    cache = KVCache(text_model.cfg.n_layers)
    text_model(torch.randint(3, 97, (2, 4)), past_kv_cache=cache)
    with pytest.raises(ValueError, match="holds a batch of 2 rows but the new tokens have 1"):
        text_model(torch.randint(3, 97, (1, 1)), past_kv_cache=cache)
