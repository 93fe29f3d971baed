"""Write the Colab-ready demo notebooks of `demos/` from the cells below, without outputs.

Each notebook is a list of cells kept here as Python strings, so a change to a notebook is a
reviewable diff of this file; running the script rewrites `demos/*.ipynb` identically
(fixed cell ids, no outputs, no execution counts). `tests/test_notebooks.py` checks that the
stored notebooks equal what this script writes, and executes them on the demo model.

    python scripts/make_notebooks.py            # rewrites demos/*.ipynb
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = "moe-hooked/demo"

# ---------------------------------------------------------------------------------- shared cells
INSTALL = """\
# Installs moe_hooked only when it is not importable yet (e.g. on Colab). Set MOE_HOOKED_SOURCE to
# where pip finds the package: a git URL such as "git+https://github.com/<org>/moe_hooked",
# a wheel file or a local checkout.
MOE_HOOKED_SOURCE = "moe_hooked"
try:
    import moe_hooked
except ImportError:
    print(f"installing moe_hooked from {MOE_HOOKED_SOURCE!r}")
    %pip install --quiet {MOE_HOOKED_SOURCE}
    import moe_hooked
"""

CONFIG = f"""\
import pandas as pd
import torch

torch.set_grad_enabled(False)  # inference only: no autograd graphs, less memory

# The small MoE trained for these demos, shipped inside the package: runs offline, on a CPU.
MODEL, DTYPE, DEVICE = "{DEMO_MODEL}", None, "cpu"  # DTYPE None keeps the checkpoint's dtype
# A real checkpoint on a GPU instead (downloaded from the Hugging Face hub):
# MODEL, DTYPE, DEVICE = "allenai/OLMoE-1B-7B-0924", torch.bfloat16, "cuda"
"""

LOAD = """\
from moe_hooked import HookedMoETransformer

model = HookedMoETransformer.from_pretrained(MODEL, dtype=DTYPE, device=DEVICE)
cfg = model.cfg
print(f"{cfg.architecture}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_experts} routed experts, "
      f"top-{cfg.top_k}, MoE layers {list(cfg.moe_layers)}, shared expert width {cfg.d_shared_expert}")
"""

LOAD_FOR_HOOKS = LOAD + """\
from moe_hooked import get_act_name

layer = cfg.moe_layers[len(cfg.moe_layers) // 2]  # a MoE layer in the middle of the model, used below


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    \"\"\"Assert that two tensors agree up to the rounding of the model's dtype; print the largest gap.\"\"\"
    gap = (actual.float() - expected.float()).abs().max().item()
    tolerance = (1e-4 if cfg.dtype == torch.float32 else 3e-2) * (1 + expected.float().abs().max().item())
    assert gap <= tolerance, f"{what}: the largest difference, {gap:.3g}, exceeds {tolerance:.3g}"
    print(f"{what}: largest difference {gap:.2g}")
"""


def header(title: str, intro: str, config_extra: str = "") -> list[tuple[str, str]]:
    """Title and introduction, the install cell and the configuration cell."""
    return [("markdown", f"# {title}\n\n{intro}"), ("code", INSTALL), ("code", CONFIG + config_extra)]


def md(text: str) -> tuple[str, str]:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str) -> tuple[str, str]:
    return ("code", textwrap.dedent(text).strip("\n"))


# ---------------------------------------------------------------------------------- 01 quickstart
QUICKSTART = header(
    "moe_hooked quickstart",
    "moe_hooked loads a Mixture-of-Experts language model (OLMoE, Qwen-MoE, DeepSeekMoE) as a native "
    "TransformerLens-style model whose router logits, selected experts, expert outputs and residual "
    "stream are ordinary hook points. This notebook loads a model, caches a forward pass, lists the "
    "hook names, reads the routing of every token (as tables and as circuitsvis views) and applies "
    "the logit lens and TransformerLens's cache helpers.\n\n"
    "It runs on the small demo model shipped with the package, on a CPU, in well under a minute; "
    "change one line of the configuration cell to run it on a real checkpoint on a GPU.",
) + [
    md("## Load the model"),
    code(LOAD_FOR_HOOKS),
    md(
        """
        ## Run with a cache

        `run_with_cache` runs the model and keeps every hook's activation. The prompt stops just
        before its last token, which serves below as the answer the model should predict.
        """
    ),
    code(
        """
        text = "for i in range(10): print(i)"
        tokens = model.to_tokens(text)
        prompt, answer = tokens[:, :-1], tokens[0, -1].item()
        logits, cache = model.run_with_cache(prompt)  # logits [batch pos d_vocab]
        str_tokens = model.to_str_tokens(prompt[0])
        predicted = logits[0, -1].argmax().item()
        print(str_tokens)
        print(f"answer {model.to_string([answer])!r}, predicted {model.to_string([predicted])!r}")
        """
    ),
    md(
        """
        ## Hook names

        `model.hook_dict` maps every hook name to its `HookPoint`. The hooks of one MoE block, with
        the shapes of this run's activations (`hook_all_expert_out` only fires inside
        `model.all_experts()`, see the interventions notebook):
        """
    ),
    code(
        """
        print(len(model.hook_dict), "hook points in all")
        for name in model.hook_dict:
            if name.startswith(f"blocks.{layer}."):
                shape = tuple(cache[name].shape) if name in cache.cache_dict else "(inside model.all_experts() only)"
                print(f"  {name:42s} {shape}")
        """
    ),
    code(
        """
        # MoE shorthands resolve like TransformerLens's own names, in get_act_name and in the cache
        print(get_act_name("router_logits", layer), get_act_name("resid_mid", layer))
        assert torch.equal(cache["router_logits", layer], cache[f"blocks.{layer}.mlp.hook_router_logits"])
        """
    ),
    md(
        """
        ## Router logits, probabilities and the top-k of every token

        The router's probabilities are the softmax of its logits; each token goes to the `top_k`
        most probable experts (slot 0 = the highest weight), and the weights that multiply the
        expert outputs are those probabilities (renormalised over the top-k when the
        checkpoint's `norm_topk_prob` is set).
        """
    ),
    code(
        """
        router_logits = cache["router_logits", layer][0]  # [pos n_experts]
        router_probs = cache["router_probs", layer][0]    # [pos n_experts]
        indices = cache["topk_indices", layer][0]         # [pos k]
        weights = cache["topk_weights", layer][0]         # [pos k]

        check_close(router_probs, router_logits.float().softmax(-1), "probs vs softmax(logits)")
        chosen = router_probs.gather(-1, indices)
        check_close(weights, chosen / chosen.sum(-1, keepdim=True) if cfg.norm_topk_prob else chosen,
                    "weights vs probs of the chosen experts")

        entropy = -(router_probs.float() * router_probs.float().clamp_min(1e-12).log()).sum(-1)
        pd.DataFrame({
            "token": str_tokens,
            "experts (slot order)": indices.tolist(),
            "weights": [[round(w, 3) for w in row] for row in weights.float().tolist()],
            "router entropy (nats)": entropy.tolist(),
        })
        """
    ),
    code(
        """
        # the MoE block's output, rebuilt from its parts
        expert_out = cache["expert_out", layer]  # [batch pos k d_model], unweighted
        routed = (cache["topk_weights", layer][..., None] * expert_out).sum(-2)
        check_close(routed, cache["routed_out", layer], "sum of weight x expert_out vs routed_out")
        shared = cache["shared_out", layer] if cfg.d_shared_expert else 0
        check_close(cache["routed_out", layer] + shared, cache["mlp_out", layer], "routed_out + shared_out vs mlp_out")
        check_close(cache["resid_mid", layer] + cache["mlp_out", layer], cache["resid_post", layer],
                    "resid_mid + mlp_out vs resid_post")
        """
    ),
    md(
        """
        ## Per-token routing with circuitsvis

        The views embed circuitsvis's JavaScript (`offline=True`, the default), so they render with
        no network access; `.save("routing.html")` writes a standalone page.
        """
    ),
    code(
        """
        from moe_hooked.viz import routing_view, top1_expert_view

        top1_expert_view(cache, str_tokens)  # colour = each token's top-1 expert; one colouring per MoE layer
        """
    ),
    code(
        """
        routing_view(cache, str_tokens)  # every expert's weight on every token: pick a layer and an expert
        """
    ),
    md(
        """
        ## The logit lens

        `logit_lens` decodes the residual stream entering every layer (and the final one) through
        the final norm and the unembedding; the last row is the model's own prediction.
        """
    ),
    code(
        """
        from moe_hooked.lens import logit_lens

        lens = logit_lens(model, cache, top=3)  # layer, label, rank, token_id, token, prob
        lens.pivot(index=["layer", "label"], columns="rank", values="token")
        """
    ),
    md(
        """
        The same with TransformerLens's `accumulated_resid`, which also gives the stream after
        each attention layer (`{l}_mid`): the probability of the answer token at every depth.
        `model.W_U` has the final norm's gain folded in, so `normalized @ W_U` are logits.
        """
    ),
    code(
        """
        resid, labels = cache.accumulated_resid(apply_ln=True, incl_mid=True, pos_slice=-1, return_labels=True)
        lens_logits = resid[:, 0] @ model.W_U  # [component d_vocab]
        check_close(lens_logits[-1], logits[0, -1], "last lens row vs the model's logits")
        pd.Series(lens_logits.float().softmax(-1)[:, answer].tolist(), index=labels,
                  name=f"p({model.to_string([answer])!r})")
        """
    ),
    md(
        """
        ## Decomposing the residual stream

        `decompose_resid` splits the final residual stream into the embedding and each layer's
        attention and MLP (MoE) outputs; `logit_attrs` gives each component's direct effect on
        the answer's logit (after the final norm's scale), and the effects add up to the logit.
        """
    ),
    code(
        """
        components, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)  # [component batch d_model]
        check_close(components.sum(0), cache["resid_post", cfg.n_layers - 1][:, -1], "sum of components vs final resid")
        attrs = cache.logit_attrs(components, tokens=answer, pos_slice=-1)  # applies the final norm's scale itself
        check_close(attrs.sum(0), logits[:, -1, answer], "sum of attributions vs the answer's logit")
        direct_effect = pd.Series(attrs[:, 0].float().tolist(), index=labels, name="direct logit attribution")
        direct_effect
        """
    ),
    md(
        """
        An MoE layer's output is a weighted sum of expert outputs (plus the shared expert), so its
        direct effect splits further, expert by expert:
        """
    ),
    code(
        """
        direction = model.tokens_to_residual_directions(answer)  # [d_model], the answer's column of W_U
        scale = cache["ln_final.hook_scale"][0, -1]                # the final norm's divisor at this position
        rows = []
        for moe_layer in cfg.moe_layers:
            w, ids = cache["topk_weights", moe_layer][0, -1], cache["topk_indices", moe_layer][0, -1]
            effects = (w[:, None] * cache["expert_out", moe_layer][0, -1]) @ direction / scale
            rows += [dict(layer=moe_layer, expert=int(e), weight=float(wi), direct_effect=float(x))
                     for e, wi, x in zip(ids, w, effects)]
            if cfg.d_shared_expert:
                rows.append(dict(layer=moe_layer, expert="shared", weight=1.0,
                                 direct_effect=float(cache["shared_out", moe_layer][0, -1] @ direction / scale)))
        per_expert = pd.DataFrame(rows)
        # the experts of a layer add up to its MLP's share of the logit
        by_layer = per_expert.groupby("layer").direct_effect.sum()
        check_close(torch.tensor(by_layer.values), torch.tensor([direct_effect[f"{l}_mlp_out"] for l in by_layer.index]),
                    "experts + shared vs each MoE layer's mlp_out")
        per_expert.sort_values("direct_effect", ascending=False).head(10)
        """
    ),
]

# ---------------------------------------------------------------------------------- 02 interventions
INTERVENTIONS = header(
    "Interventions: expert ablation, top-k patching, custom hooks",
    "Every intervention in `moe_hooked.interventions` returns a list of `(hook_name, hook_fn)` "
    "pairs: plain TransformerLens hooks that compose with each other and with your own. This "
    "notebook ablates experts (zero / reroute / mean), keeps only the top-k' experts, writes hooks "
    "by hand on `hook_topk_weights` and `hook_router_logits`, measures the effect of each on the "
    "loss of every domain of the built-in corpora, patches expert outputs from a "
    "clean run into a corrupted one, and runs every expert on every token.",
    config_extra="TEXTS_PER_DOMAIN = 4  # texts of each built-in corpus used to measure the loss\n",
) + [
    md("## Load the model and the corpora"),
    code(LOAD_FOR_HOOKS),
    code(
        """
        from moe_hooked.data import builtin_corpora

        corpora = {domain: texts[:TEXTS_PER_DOMAIN] for domain, texts in builtin_corpora().items()}


        def domain_losses(fwd_hooks=()) -> pd.Series:
            \"\"\"Mean next-token loss (nats) of each domain's texts with `fwd_hooks` active.\"\"\"
            with model.hooks(fwd_hooks=list(fwd_hooks)):
                return pd.Series({domain: model(texts, return_type="loss").item() for domain, texts in corpora.items()})


        clean = domain_losses()
        clean
        """
    ),
    md(
        """
        ## Expert ablation

        First find the experts that code uses much more than the other domains, in every MoE
        layer (`domain_specialists`, from the routing counts), then ablate them three ways:

        - `zero`: their weight is set to 0 (the other selected experts keep theirs);
        - `reroute`: they are masked out of the router, so tokens go to the next-best experts;
        - `mean`: their output is replaced by its mean over a reference set.
        """
    ),
    code(
        """
        from moe_hooked.analysis import domain_specialists, routing_stats
        from moe_hooked.interventions import ablate_experts, expert_output_means, keep_top_k, patch_expert_outputs, route_to

        counts = routing_stats(model, corpora, progress=False)
        specialists = domain_specialists(counts, top=2).query("domain == 'code'")
        code_experts = {l: rows.expert.tolist() for l, rows in specialists.groupby("layer")}
        print("code specialists per layer:", code_experts)

        means = expert_output_means(model, [text for texts in corpora.values() for text in texts])
        ablated = pd.DataFrame({
            "clean": clean,
            "zero": domain_losses(ablate_experts(model, code_experts, mode="zero")),
            "reroute": domain_losses(ablate_experts(model, code_experts, mode="reroute")),
            "mean": domain_losses(ablate_experts(model, code_experts, mode="mean", mean_from=means)),
        })
        ablated
        """
    ),
    code(
        """
        ablated.drop(columns="clean").sub(ablated.clean, axis=0).add_prefix("loss increase, ")
        """
    ),
    md(
        """
        ## Top-k' patching

        `keep_top_k(model, k)` keeps each token's k highest-weighted experts with the weights the
        router gave them (the paper's top-k' experiment); `route_to` forces every token of a
        layer onto given experts.
        """
    ),
    code(
        """
        top_k = pd.DataFrame({f"top-{k}": domain_losses(keep_top_k(model, k)) for k in range(1, cfg.top_k + 1)})
        top_k[f"route_to code specialists (layer {layer})"] = domain_losses(route_to(model, layer, code_experts[layer]))
        top_k
        """
    ),
    md(
        """
        ## Writing your own hooks

        A hook is a function `(activation, hook) -> new activation` registered on a hook name.
        Keeping only the highest-weighted expert is a one-line edit of `hook_topk_weights` (slot 0
        holds the highest weight), and gives exactly what `keep_top_k(model, 1)` gives:
        """
    ),
    code(
        """
        def keep_slot_0(weights, hook):
            \"\"\"hook_topk_weights [batch pos k] -> the same with every slot but the first set to 0.\"\"\"
            return torch.cat([weights[..., :1], torch.zeros_like(weights[..., 1:])], dim=-1)


        by_hand = domain_losses([(get_act_name("topk_weights", l), keep_slot_0) for l in cfg.moe_layers])
        check_close(torch.tensor(by_hand.values), torch.tensor(top_k["top-1"].values), "hand-written vs keep_top_k")
        pd.DataFrame({"hand-written hook": by_hand, "keep_top_k(model, 1)": top_k["top-1"]})
        """
    ),
    md(
        """
        A hook on `hook_router_logits` steers the routing: adding a bias to one expert's logit
        sends more tokens to it. The cache records the edited run, so the hook's effect on the
        routing can be read back from `hook_topk_indices`.
        """
    ),
    code(
        """
        expert = code_experts[layer][0]
        code_text = corpora["code"][0]


        def boost(amount: float):
            def add_bias(logits, hook):  # [batch pos n_experts]
                return logits + amount * torch.nn.functional.one_hot(torch.tensor(expert), cfg.n_experts).to(logits)
            return [(get_act_name("router_logits", layer), add_bias)]


        rows = []
        for amount in (-4.0, 0.0, 2.0, 4.0):
            with model.hooks(fwd_hooks=boost(amount)):
                loss, steered = model.run_with_cache(code_text, return_type="loss")
            selected = (steered["topk_indices", layer] == expert).any(-1).float().mean().item()
            rows.append(dict(bias=amount, fraction_of_tokens_on_expert=selected, code_loss=loss.item()))
        pd.DataFrame(rows).set_index("bias")
        """
    ),
    md(
        """
        ## Activation patching of expert outputs

        Two prompts with the same number of tokens: run the clean one with a cache, then run the
        corrupted one with the clean run's expert outputs patched in, one MoE layer at a time.
        The metric is the KL divergence of the last position's next-token distribution from the
        clean run's (0 = fully restored). Patching `expert_out` goes slot by slot;
        `match="expert"` patches only the slots that hold the same expert in both runs, and
        patching `routed_out` transplants the whole weighted mix.
        """
    ),
    code(
        """
        clean_tokens = model.to_tokens("def add(a, b): return a + b")
        corrupt_tokens = model.to_tokens("def sub(a, b): return a - b")
        assert clean_tokens.shape == corrupt_tokens.shape, "pick two prompts with the same number of tokens"
        clean_logits, clean_cache = model.run_with_cache(clean_tokens)
        clean_logprobs = clean_logits[0, -1].float().log_softmax(-1)


        def kl_from_clean(logits) -> float:
            logprobs = logits[0, -1].float().log_softmax(-1)
            return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum().item()


        variants = {
            "expert_out, per slot": {},
            "expert_out, same expert only": {"match": "expert"},
            "routed_out": {"hooks": ("routed_out",)},
        }
        patching = pd.DataFrame(
            {name: [kl_from_clean(model.run_with_hooks(corrupt_tokens, fwd_hooks=patch_expert_outputs(
                        model, clean_cache, layers=[l], **kwargs))) for l in cfg.moe_layers]
             for name, kwargs in variants.items()},
            index=pd.Index(cfg.moe_layers, name="patched layer"),
        )
        print(f"KL(clean || corrupted) without patching: {kl_from_clean(model(corrupt_tokens)):.3g}")
        patching
        """
    ),
    md(
        """
        ## Every expert on every token

        Inside `with model.all_experts():` each MoE layer also runs all its experts on every token
        and exposes `hook_all_expert_out` [batch pos n_experts d_model] (n_experts / top_k times
        the routed compute: cache few layers at a time on a large model). The selected experts'
        outputs are rows of it; the others show what an unselected expert would have written. Here:
        each expert's direct effect on the logit of the clean prompt's last token, had it received
        its router probability as weight.
        """
    ),
    code(
        """
        wanted = [get_act_name(name, layer) for name in ("all_expert_out", "expert_out", "topk_indices", "router_probs")]
        with model.all_experts():
            _, cache = model.run_with_cache(clean_tokens, names_filter=wanted + ["ln_final.hook_scale"])
        all_out = cache["all_expert_out", layer]  # [batch pos n_experts d_model]
        indices = cache["topk_indices", layer]    # [batch pos k]
        gathered = all_out.gather(2, indices[..., None].expand(-1, -1, -1, cfg.d_model))
        check_close(gathered, cache["expert_out", layer], "selected rows of all_expert_out vs expert_out")

        last_token = clean_tokens[0, -1].item()
        direction = model.tokens_to_residual_directions(last_token)
        probs = cache["router_probs", layer][0, -2]  # routing of the position that predicts the last token
        effects = (probs[:, None].to(all_out) * all_out[0, -2]) @ direction / cache["ln_final.hook_scale"][0, -2]
        pd.DataFrame({
            "router_prob": probs.float().tolist(),
            "selected": [e in indices[0, -2].tolist() for e in range(cfg.n_experts)],
            "direct_effect_on_last_token": effects.float().tolist(),
        }).rename_axis("expert").sort_values("direct_effect_on_last_token", ascending=False).head(8)
        """
    ),
]

# ---------------------------------------------------------------------------------- 03 MoE Lens
PAPER = header(
    "MoE Lens: the paper's four analyses",
    "*MoE Lens - An Expert Is All You Need* (Chaudhari et al., 2025) studies DeepSeekMoE with four "
    "analyses: (1) domain specialization of the routed experts against the uniform baseline k/n, "
    "(2) an extended logit lens that decodes the residual stream after each of the top-k experts, "
    "(3) the cosine similarity between the residual stream with the top-1 expert only and with all "
    "top-k, and (4) perplexity when every layer keeps only its top-k' experts. Each is one call in "
    "`moe_hooked`; here they run on the demo model over the built-in corpora (small `MAX_TOKENS` so "
    "that the notebook runs in seconds on a CPU: raise it for a real study).",
    config_extra="MAX_TOKENS = 512  # tokens read from each domain's corpus by every analysis\n\n"
    "# show matplotlib figures inline (the figures of moe_hooked.viz are made without pyplot)\n"
    "%matplotlib inline\n",
) + [
    md("## Load the model and the corpora"),
    code(LOAD),
    code(
        """
        from moe_hooked.data import builtin_corpora

        corpora = builtin_corpora()  # {"chinese": [...], "code": [...], "english": [...], "french": [...], "math": [...]}
        {domain: len(texts) for domain, texts in corpora.items()}
        """
    ),
    md(
        """
        ## 1. Domain specialization

        `routing_stats` streams the corpora and counts, per domain, layer and expert, the tokens
        that select the expert among their top-k. `specialization` compares each fraction with the
        uniform baseline k/n (one-sided binomial test, Holm correction over a domain's experts);
        `threshold=1.5` also asks for 1.5 times the baseline.
        """
    ),
    code(
        """
        from moe_hooked.analysis import coverage, routing_entropy, routing_stats, specialization
        from moe_hooked.viz import specialization_figure

        counts = routing_stats(model, corpora, max_tokens=MAX_TOKENS, progress=False)
        spec = specialization(counts, threshold=1.5)
        print("specialized experts (layer, expert pairs) per domain:", spec.groupby("domain").specialized.sum().to_dict())
        spec[spec.specialized].sort_values("ratio", ascending=False).head(10)
        """
    ),
    code(
        """
        specialization_figure(spec, layers=list(cfg.moe_layers)[:4])  # dashed: the uniform baseline k/n
        """
    ),
    code(
        """
        # beyond the paper: how many experts cover half of the routing decisions, and the routing entropy
        coverage(counts, q=0.5).merge(routing_entropy(counts), on=["domain", "layer"]).head(10)
        """
    ),
    md(
        """
        ## 2. The expert lens

        For one position, `expert_lens` decodes the post-attention residual `u`, the partial sums
        `H^{l,k'} = u + sum of the k' highest-weighted expert outputs`, each selected expert alone
        (`u + w_j E_j`) and the layer's output. The grid is the paper's Figure 2: a cell shows the
        top-1 decoded token, darker for a higher probability (hover for the others).
        """
    ),
    code(
        """
        from moe_hooked.lens import expert_lens
        from moe_hooked.viz import ExpertLensGrid, top1_expert_view

        prompt = model.to_tokens("for i in range(10): print(i")
        str_tokens = model.to_str_tokens(prompt[0])
        _, cache = model.run_with_cache(prompt)
        lens = expert_lens(model, cache, include_shared=bool(cfg.d_shared_expert))
        print(str_tokens)
        ExpertLensGrid(lens, title=f"expert lens at the last token, {str_tokens[-1]!r}")
        """
    ),
    code(
        """
        top1_expert_view(cache, str_tokens)  # the routing of the same prompt, token by token
        """
    ),
    code(
        """
        # the top-1 token of every decoded vector but the single experts; with the shared expert
        # included, H^{l,k} is the layer's output, resid_post
        lens.query("rank == 0 and variant != 'expert'").pivot(index="layer", columns="variant", values="token")
        """
    ),
    md(
        """
        ## 3. Top-1 vs top-k cosine similarity

        cos(H^{l,1}, H^{l,k}) per layer, averaged over all tokens and over each text's last token
        (the paper's variant): close to 1 means the top-1 expert already sets the direction of the
        residual stream. Two baselines say how much of that the residual alone explains: `u_only`,
        cos(u, H^{l,k}), and `update`, cos(H^{l,1} - u, H^{l,k} - u), the expert updates themselves.
        """
    ),
    code(
        """
        from moe_hooked.lens import topk_cosine
        from moe_hooked.viz import cosine_figure

        cosine = topk_cosine(model, corpora, max_tokens=MAX_TOKENS, progress=False)
        display(cosine.pivot_table(index="layer", columns=["variant", "domain"], values="cosine").round(3))
        cosine_figure(cosine)
        """
    ),
    md(
        """
        ## 4. Perplexity vs the number of experts kept

        Every MoE layer keeps its top-k' experts (with the router's weights, not renormalised), for
        k' = 1..k. The figure shows the change in log-perplexity from the unmodified model, with
        its 95% bootstrap interval over chunks; `perplexity_figure(perplexity,
        value="normalized_log_ppl")` draws the paper's per-domain min-max normalisation instead,
        which hides how large the change is and in which direction.
        """
    ),
    code(
        """
        from moe_hooked.analysis import perplexity_vs_top_k
        from moe_hooked.viz import perplexity_figure

        perplexity = perplexity_vs_top_k(model, corpora, max_tokens=MAX_TOKENS, progress=False)
        display(perplexity.pivot(index="k", columns="domain", values="ppl").round(2))
        perplexity_figure(perplexity)
        """
    ),
    md(
        """
        ## Comparison with the paper's DeepSeekMoE-16B numbers (optional)

        Runs only where the paper's published numbers are available as `shared/data/paper` beside
        the repository (`routing_counts.json`, `deepseek_cosine_top1_vs_top6.csv`,
        `deepseek_perplexity_vs_topk.csv`); otherwise it says so and does nothing. The domains
        differ, so the comparison is per source: the share of (layer, expert) pairs specialized on
        a domain, the mean last-token top-1 vs top-k cosine, and the perplexity with the top-1
        expert relative to all top-k.
        """
    ),
    code(
        """
        import json
        from pathlib import Path

        from moe_hooked.analysis import RoutingCounts

        PAPER_DATA = next((p for p in (Path("../shared/data/paper"), Path("../../shared/data/paper")) if p.is_dir()), None)


        def summary(spec, cosine, ppl_top1_over_topk) -> pd.DataFrame:
            \"\"\"Per domain: specialized share, mean cosine, ppl(top-1) / ppl(top-k).\"\"\"
            return pd.DataFrame({
                "specialized_share": spec.groupby("domain").specialized.mean(),
                "mean_cosine_top1_vs_topk": cosine.groupby("domain").cosine.mean(),
                "ppl_top1_over_topk": ppl_top1_over_topk,
            })


        if PAPER_DATA is None:
            print("the paper's numbers (shared/data/paper) are not here: nothing to compare")
        else:
            published = json.loads((PAPER_DATA / "routing_counts.json").read_text())["counts"]["deepseek-base"]
            paper_spec = specialization(RoutingCounts.from_dict(published, top_k=6), threshold=1.5)
            paper_cosine = pd.read_csv(PAPER_DATA / "deepseek_cosine_top1_vs_top6.csv").rename(
                columns={"cosine_top1_vs_top6": "cosine"})
            paper_ppl = pd.read_csv(PAPER_DATA / "deepseek_perplexity_vs_topk.csv").pivot(
                index="Selection", columns="Domain", values="Perplexity")
            ours_ppl = perplexity.pivot(index="k", columns="domain", values="ppl")
            display(pd.concat({
                "DeepSeekMoE-16B (paper)": summary(paper_spec, paper_cosine, paper_ppl.loc["Top 1"] / paper_ppl.loc["Top 6"]),
                MODEL: summary(spec, cosine.query("variant == 'last_token'"), ours_ppl.loc[1] / ours_ppl.loc[cfg.top_k]),
            }, names=["model", "domain"]).round(3))
        """
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_interventions.ipynb": INTERVENTIONS,
    "03_moe_lens_paper.ipynb": PAPER,
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook of `cells` ((kind, source) pairs) with fixed cell ids and no outputs."""
    stem = name.removesuffix(".ipynb")
    makers = {"markdown": new_markdown_cell, "code": new_code_cell}
    notebook = new_notebook(
        cells=[makers[kind](source.strip("\n"), id=f"{stem}-{i:02d}") for i, (kind, source) in enumerate(cells)],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "colab": {"provenance": []},
        },
    )
    nbformat.validate(notebook)
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "demos", help="folder the notebooks are written to")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), args.out / name)
        print("wrote", args.out / name)


if __name__ == "__main__":
    main()
