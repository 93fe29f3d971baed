"""Hook points: names, shapes, invariants, and that editing a hook changes what it should."""

from __future__ import annotations

import pytest
import torch
from hf_models import olmoe_config, qwen2_moe_config
from tiny import tiny_model

from moe_hooked import HookShapeError, get_act_name

BATCH, POS = 2, 7


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Qwen2-MoE: gated shared expert, GQA, layer 1 dense."""
    return tiny_model(qwen2_moe_config(), tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    return tiny_model(olmoe_config(num_experts_per_tok=3), tmp_path_factory.mktemp("olmoe"))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(4, 97, (BATCH, POS), generator=torch.Generator().manual_seed(0))


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    b, p, d, k, e = BATCH, POS, cfg.d_model, cfg.top_k, cfg.n_experts
    heads, kv, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    shapes = {"hook_embed": (b, p, d), "ln_final.hook_scale": (b, p, 1), "ln_final.hook_normalized": (b, p, d)}
    for layer in range(cfg.n_layers):
        block = f"blocks.{layer}."
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            shapes[block + name] = (b, p, d)
        for ln in ("ln1", "ln2"):
            shapes[f"{block}{ln}.hook_scale"] = (b, p, 1)
            shapes[f"{block}{ln}.hook_normalized"] = (b, p, d)
        for name, n in (("q", heads), ("k", kv), ("v", kv), ("rot_q", heads), ("rot_k", kv), ("z", heads)):
            shapes[f"{block}attn.hook_{name}"] = (b, p, n, dh)
        shapes[block + "attn.hook_attn_scores"] = (b, heads, p, p)
        shapes[block + "attn.hook_pattern"] = (b, heads, p, p)
        mlp = block + "mlp."
        if layer not in cfg.moe_layers:
            for name in ("hook_pre", "hook_pre_linear", "hook_post"):
                shapes[mlp + name] = (b, p, cfg.d_mlp)
            continue
        shapes |= {
            mlp + "hook_router_logits": (b, p, e),
            mlp + "hook_router_probs": (b, p, e),
            mlp + "hook_topk_indices": (b, p, k),
            mlp + "hook_topk_weights": (b, p, k),
            mlp + "hook_expert_pre": (b, p, k, cfg.d_expert),
            mlp + "hook_expert_pre_linear": (b, p, k, cfg.d_expert),
            mlp + "hook_expert_post": (b, p, k, cfg.d_expert),
            mlp + "hook_expert_out": (b, p, k, d),
            mlp + "hook_routed_out": (b, p, d),
        }
        if cfg.d_shared_expert:
            shapes[mlp + "hook_shared_out"] = (b, p, d)
            for name in ("hook_pre", "hook_pre_linear", "hook_post"):
                shapes[f"{mlp}shared_expert.{name}"] = (b, p, cfg.d_shared_expert)
        if cfg.shared_expert_gated:
            shapes[mlp + "hook_shared_gate"] = (b, p, 1)
    return shapes


@pytest.mark.parametrize("name", ["qwen", "olmoe"])
def test_every_hook_has_its_documented_shape(name, request, tokens):
    model = request.getfixturevalue(name)
    _, cache = model.run_with_cache(tokens)
    expected = expected_shapes(model.cfg)
    qk_norm_hooks = {k for k in cache.keys() if "_norm." in k}  # OLMoE's q/k RMSNorm internals
    assert set(cache.keys()) - qk_norm_hooks == set(expected)
    for hook, shape in expected.items():
        assert tuple(cache[hook].shape) == shape, hook


def test_moe_invariants(qwen, tokens):
    _, cache = qwen.run_with_cache(tokens)
    for layer in range(qwen.cfg.n_layers):
        assert torch.allclose(cache["resid_mid", layer] + cache["mlp_out", layer], cache["resid_post", layer])
    for layer in qwen.cfg.moe_layers:
        weights, expert_out = cache["topk_weights", layer], cache["expert_out", layer]
        assert torch.allclose((weights[..., None] * expert_out).sum(-2), cache["routed_out", layer], atol=1e-6)
        assert torch.allclose(cache["routed_out", layer] + cache["shared_out", layer], cache["mlp_out", layer])
        probs = torch.softmax(cache["router_logits", layer].float(), -1)
        top = probs.topk(qwen.cfg.top_k, dim=-1)
        assert torch.equal(top.indices, cache["topk_indices", layer])
        assert torch.allclose(top.values, weights)
        moe = qwen.blocks[layer].mlp
        x = cache[f"blocks.{layer}.ln2.hook_normalized"] * qwen.blocks[layer].ln2.w
        gate = torch.sigmoid(x @ moe.w_shared_gate.T)
        shared = moe.shared_expert
        by_hand = (torch.nn.functional.silu(x @ shared.w_gate.T) * (x @ shared.w_up.T)) @ shared.w_down.T
        assert torch.allclose(cache["shared_gate", layer], gate, atol=1e-6)
        assert torch.allclose(cache["shared_out", layer], gate * by_hand, atol=1e-6)


def test_expert_out_is_the_expert_applied_to_its_token(olmoe, tokens):
    """Slot j's output equals expert i_j's SwiGLU on ln2(resid_mid), computed by hand."""
    _, cache = olmoe.run_with_cache(tokens)
    layer = 1
    x = cache[f"blocks.{layer}.ln2.hook_normalized"] * olmoe.blocks[layer].ln2.w
    experts = olmoe.blocks[layer].mlp.experts
    b, p, slot = 1, 4, 2
    e = int(cache["topk_indices", layer][b, p, slot])
    h = torch.nn.functional.silu(x[b, p] @ experts.W_gate[e].T) * (x[b, p] @ experts.W_up[e].T)
    assert torch.allclose(h @ experts.W_down[e].T, cache["expert_out", layer][b, p, slot], atol=1e-6)


def test_editing_router_logits_changes_routing(olmoe, tokens):
    layer, forced = 1, 5

    def force_expert(logits, hook):
        logits = logits.clone()
        logits[..., forced] = 1e4
        return logits

    _, cache = olmoe.run_with_cache(tokens)
    assert not (cache["topk_indices", layer][..., 0] == forced).all()
    with olmoe.hooks(fwd_hooks=[(get_act_name("router_logits", layer), force_expert)]):
        _, edited = olmoe.run_with_cache(tokens)
    assert (edited["topk_indices", layer][..., 0] == forced).all()
    assert torch.allclose(edited["topk_weights", layer][..., 0], torch.ones(BATCH, POS))


def test_editing_weights_indices_and_expert_out_changes_the_mix(olmoe, tokens):
    layer = 2
    _, clean = olmoe.run_with_cache(tokens)
    block_in = clean[f"blocks.{layer}.ln2.hook_normalized"]

    def double_slot0(w, hook):
        w = w.clone()
        w[..., 0] *= 2
        return w

    def zero_expert_out(out, hook):
        return torch.zeros_like(out)

    def swap_slots(idx, hook):
        return idx.flip(-1)

    name = lambda short: get_act_name(short, layer)  # noqa: E731
    w, out = clean["topk_weights", layer], clean["expert_out", layer]
    assert olmoe.run_with_hooks(tokens, return_type=None, fwd_hooks=[(name("topk_weights"), double_slot0)]) is None
    with olmoe.hooks(fwd_hooks=[(name("topk_weights"), double_slot0)]):
        _, c = olmoe.run_with_cache(tokens)
    slot0_doubled = (w[..., None] * out).sum(-2) + w[..., 0, None] * out[..., 0, :]
    assert torch.allclose(c["routed_out", layer], slot0_doubled, atol=1e-6)
    with olmoe.hooks(fwd_hooks=[(name("expert_out"), zero_expert_out)]):
        _, c = olmoe.run_with_cache(tokens)
    assert torch.equal(c["mlp_out", layer], torch.zeros_like(c["mlp_out", layer]))
    with olmoe.hooks(fwd_hooks=[(name("topk_indices"), swap_slots)]):
        _, c = olmoe.run_with_cache(tokens)
    assert torch.allclose(c["expert_out", layer], out.flip(-2), atol=1e-6)
    assert torch.equal(block_in, c[f"blocks.{layer}.ln2.hook_normalized"])


def test_hook_returning_wrong_shape_is_a_clear_error(olmoe, tokens):
    with pytest.raises(HookShapeError, match=r"blocks\.1\.mlp\.hook_topk_weights.*\(2, 7\).*\(2, 7, 3\)"):
        olmoe.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_topk_weights", lambda w, hook: w[..., 0])])


def test_expert_index_out_of_range_is_a_clear_error(olmoe, tokens):
    with pytest.raises(ValueError, match=r"expert ids \[99\] are out of range: valid ids are 0\.\.7"):
        olmoe.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_topk_indices", lambda i, hook: torch.full_like(i, 99))])


def test_token_ids_out_of_vocabulary_are_a_clear_error(olmoe):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        olmoe(torch.tensor([[1, 2, 97]]))


def test_unused_hook_points_do_not_change_outputs(olmoe, tokens):
    plain = olmoe(tokens)
    logits, _ = olmoe.run_with_cache(tokens)
    assert torch.allclose(plain, logits, atol=1e-6)


def test_names_filter_and_get_act_name(olmoe, tokens):
    _, cache = olmoe.run_with_cache(tokens, names_filter=lambda n: n.endswith("router_logits"))
    assert sorted(cache.keys()) == [f"blocks.{layer}.mlp.hook_router_logits" for layer in range(3)]
    assert get_act_name("router_logits", 3) == "blocks.3.mlp.hook_router_logits"
    assert get_act_name("resid_mid", 1) == "blocks.1.hook_resid_mid"
    assert get_act_name("pattern", 0) == "blocks.0.attn.hook_pattern"
    assert get_act_name("scale", 2, "ln2") == "blocks.2.ln2.hook_scale"
    assert torch.equal(cache["router_logits", -1], cache["blocks.2.mlp.hook_router_logits"])
    with pytest.raises(ValueError, match="give a layer index"):
        get_act_name("expert_out")


def test_string_input_tokenizer_round_trip_and_loss(olmoe):
    text = "The cat sat on the mat."
    tokens = olmoe.to_tokens(text)
    assert tokens.shape[0] == 1
    assert olmoe.to_string(tokens[0]) == text
    str_tokens = olmoe.to_str_tokens(text)
    assert len(str_tokens) == tokens.shape[1]
    assert "".join(str_tokens).replace(" ", "") == text.replace(" ", "")
    logits, loss = olmoe(text, return_type="both")
    manual = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    assert torch.allclose(loss, manual, atol=1e-6)
    texts = [text, "Le chat dort."]
    batch = olmoe.to_tokens(texts)
    per_token = olmoe(texts, return_type="loss", loss_per_token=True)
    assert per_token.shape == (2, batch.shape[1] - 1)
    short = olmoe("Le chat dort.", return_type="loss", loss_per_token=True)[0]
    assert torch.allclose(per_token[1, : short.shape[0]], short, atol=1e-5)
    assert (per_token[1, short.shape[0] :] == 0).all()


def test_all_experts_mode(olmoe, tokens):
    layer = 0
    with olmoe.all_experts():
        _, cache = olmoe.run_with_cache(tokens)
    every = cache["all_expert_out", layer]
    assert every.shape == (BATCH, POS, olmoe.cfg.n_experts, olmoe.cfg.d_model)
    idx = cache["topk_indices", layer]
    gathered = every.gather(2, idx[..., None].expand(-1, -1, -1, olmoe.cfg.d_model))
    assert torch.allclose(gathered, cache["expert_out", layer], atol=1e-6)
    _, after = olmoe.run_with_cache(tokens)
    assert "blocks.0.mlp.hook_all_expert_out" not in after.keys()
