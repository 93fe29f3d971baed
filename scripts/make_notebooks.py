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
# Installs moe_hooked only when it is not importable yet (e.g. on Colab), from the source YOU set:
# a git URL such as "git+https://github.com/<org>/moe_hooked@<commit or tag>", a wheel file or a
# local checkout. moe_hooked is not published on the package index: never install it by bare name
# (whoever registered that name there would run code here).
MOE_HOOKED_SOURCE = ""
try:
    import moe_hooked
except ImportError:
    import os

    source = MOE_HOOKED_SOURCE.strip()
    if not source:
        raise RuntimeError(
            "moe_hooked is not installed: set MOE_HOOKED_SOURCE in this cell to a git URL, a wheel file "
            "or a local checkout of moe_hooked, then run the cell again"
        ) from None
    if os.path.exists(source):
        source = os.path.abspath(source)  # a path pip cannot mistake for a package name
    elif not (source.startswith("git+") or "://" in source):
        raise RuntimeError(
            f"MOE_HOOKED_SOURCE={source!r} is neither a URL nor an existing file or folder; a bare name "
            "would install whatever the package index holds under it: use a git URL, a wheel or a checkout"
        )
    print(f"installing moe_hooked from {source!r}")
    %pip install --quiet {source}
    import moe_hooked
"""

CONFIG = f"""\
import pandas as pd
import torch

torch.set_grad_enabled(False)  # inference only: no autograd graphs, less memory

# The small MoE trained for these demos, shipped inside the package: runs offline, on a CPU.
MODEL, DTYPE, DEVICE = "{DEMO_MODEL}", None, "cpu"  # DTYPE None: the checkpoint's dtype (config.json's)
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

        prompt = model.to_tokens("def factorial(n): total = 1 for i in range(2, n + 1): total *= i return")
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
        # the top-1 token and its probability for every decoded vector but the single experts; with
        # the shared expert included, H^{l,k} is the layer's output, resid_post
        top1 = lens.query("rank == 0 and variant != 'expert'")
        (top1.token + " " + top1.prob.round(2).astype(str)).to_frame("decoded").join(top1[["layer", "variant"]]).pivot(
            index="layer", columns="variant", values="decoded")[["resid_mid", "shared", *[f"top{k}" for k in range(1, cfg.top_k + 1)]]]
        """
    ),
    md(
        """
        On the demo model the answer ` total` appears at layer 3 and is settled by one expert at
        layer 4: there the post-attention residual `u` decodes it with probability 0.33, `u` plus the
        shared expert 0.37, adding only the highest-weighted routed expert 0.88, and all four 0.97,
        the paper's finding that the top-1 expert carries most of a layer's update.
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

# ---------------------------------------------------------------------------------- 04 end to end
END_TO_END = header(
    "End to end: which expert drives a correct prediction, and what if it is ablated there?",
    "A small mechanistic investigation on the demo model, the way a TransformerLens user would run "
    "it: (1) find a position where the model predicts the next token correctly, (2) attribute the "
    "logit difference between the correct token and the runner-up to every component of the "
    "residual stream, down to each routed expert (direct logit attribution per expert), (3) ablate "
    "the expert with the largest attribution *only at that position* and measure the logit "
    "difference and the loss, (4) compare with that expert's causal importance over a small corpus, "
    "and (5) generate text with and without the ablation.",
    config_extra="TEXTS_PER_DOMAIN = 2  # texts of each built-in corpus for the corpus-level importance\n"
    "CORPUS_TOKENS = 64  # tokens of each chunk of those texts (the importance reads TEXTS_PER_DOMAIN * CORPUS_TOKENS a domain)\n",
) + [
    md("## Load the model"),
    code(LOAD),
    md(
        """
        ## 1. Correct predictions

        Run an English text from the built-in corpora and keep the positions where the model's top
        prediction is the correct next token with probability above one half; the runner-up is its
        second choice there.
        """
    ),
    code(
        """
        from moe_hooked.data import builtin_corpora

        corpora = builtin_corpora()
        tokens = model.to_tokens(corpora["english"][0])[:, :48]
        logits, cache = model.run_with_cache(tokens)
        next_tokens = tokens[0, 1:]
        top2 = logits[0, :-1].topk(2).indices  # [pos, 2]
        p_correct = logits[0, :-1].softmax(-1).gather(-1, next_tokens[:, None])[:, 0]
        confident = (top2[:, 0] == next_tokens) & (p_correct > 0.5)
        runners_up = top2[:, 1]
        print(f"{int(confident.sum())} of {len(next_tokens)} next tokens predicted correctly with p > 0.5")
        """
    ),
    md(
        """
        ## 2. Direct logit attribution per expert

        `cache.decompose_resid_by_expert` splits the final residual stream into the embedding, each
        layer's attention, dense MLPs, and in MoE layers one component per routed expert (its
        routing weight times its output, zero where the token did not select it) plus the shared
        expert. With `apply_ln=True` each component is divided by the final norm's scale, so its dot
        product with the direction "correct minus runner-up" is its direct contribution to the logit
        difference; the contributions sum to it. Among the confident positions, take the one where a
        single routed expert carries the largest share of the logit difference.
        """
    ),
    code(
        """
        import re

        stack, labels = cache.decompose_resid_by_expert(apply_ln=True, return_labels=True)  # [component batch pos d_model]
        directions = model.tokens_to_residual_directions(next_tokens) - model.tokens_to_residual_directions(runners_up)
        contributions = (stack[:, 0, :-1] * directions).sum(-1)  # [component pos]
        is_routed = [bool(re.fullmatch(r"L\\d+E\\d+", label)) for label in labels]
        share = contributions[is_routed] / contributions.sum(0)  # [routed expert, pos]
        share[:, ~confident] = -torch.inf
        best_expert, pos = divmod(int(share.argmax()), share.shape[1])
        top_label = [label for label, routed in zip(labels, is_routed) if routed][best_expert]
        layer, expert = map(int, top_label[1:].split("E"))
        answer, runner_up = int(next_tokens[pos]), int(runners_up[pos])
        str_tokens = model.to_str_tokens(tokens[0])
        print("context:", repr("".join(str_tokens[max(0, pos - 10) : pos + 1])))
        print(f"position {pos}: correct next token {model.to_single_str_token(answer)!r} "
              f"(p = {p_correct[pos]:.3f}), runner-up {model.to_single_str_token(runner_up)!r}")


        def logit_diff(logits: torch.Tensor) -> float:
            \"\"\"Correct minus runner-up logit at `pos`.\"\"\"
            return float(logits[0, pos, answer] - logits[0, pos, runner_up])


        attribution = pd.Series(contributions[:, pos].numpy(), index=labels, name="attribution")
        print(f"logit difference {logit_diff(logits):.3f}; sum of the attributions {attribution.sum():.3f}")
        assert abs(attribution.sum() - logit_diff(logits)) < 1e-3
        attribution.sort_values(ascending=False).head(8).to_frame()
        """
    ),
    code(
        """
        slot = int((cache["topk_indices", layer][0, pos] == expert).nonzero()[0])
        weight = float(cache["topk_weights", layer][0, pos, slot])
        print(f"expert {expert} of layer {layer} contributes {attribution[top_label]:.3f} of the logit difference "
              f"{logit_diff(logits):.3f}, from slot {slot} with routing weight {weight:.3f}")
        # the same expert's output, by expert id, at every position (zero where it was not selected)
        print("positions routed to it:", cache.expert_selected(layer, expert)[0].nonzero().squeeze(1).tolist())
        """
    ),
    md(
        """
        ## 3. Ablate it at that position only

        `ablate_experts(..., positions=[pos])` zeroes the expert's routing weight at that one
        position (the other selected experts keep their weights). Direct attribution ignores what
        the expert does through later layers; the ablation measures its total effect.
        """
    ),
    code(
        """
        from moe_hooked.interventions import ablate_experts

        at_pos = ablate_experts(model, {layer: [expert]}, positions=[pos])
        clean_loss = model(tokens, return_type="loss", loss_per_token=True)[0]
        with model.hooks(fwd_hooks=at_pos):
            ablated_logits, ablated_loss = model(tokens, return_type="both", loss_per_token=True)
        predicted = [model.to_single_str_token(int(x[0, pos].argmax())) for x in (logits, ablated_logits)]
        pd.DataFrame({
            "clean": [logit_diff(logits), float(clean_loss[pos]), float(clean_loss.mean()), predicted[0]],
            "expert ablated at pos": [logit_diff(ablated_logits), float(ablated_loss[0, pos]), float(ablated_loss.mean()),
                                      predicted[1]],
        }, index=["logit difference", f"loss of the next token at {pos}", "mean loss of the text", "top prediction at pos"])
        """
    ),
    md(
        """
        ## 4. Compare with its importance over a corpus

        The causal importance of each expert of that layer over a small corpus, from
        `expert_importance`: per domain, the increase of the mean next-token loss when the expert
        is zero-ablated at every position (`delta_nll`, nats per token), with a bootstrap interval
        over texts, beside how often the router picks it. Is the expert that drives this one
        prediction also one the model relies on in general?
        """
    ),
    code(
        """
        from moe_hooked.analysis import expert_importance

        small = {domain: texts[:TEXTS_PER_DOMAIN] for domain, texts in corpora.items()}
        table = expert_importance(model, small, layers=layer, max_length=CORPUS_TOKENS,
                          max_tokens=TEXTS_PER_DOMAIN * CORPUS_TOKENS, progress=False)
        # over all domains: the token-weighted mean of the per-domain loss increases
        weighted = table.assign(total=table.delta_nll * table.n_tokens).groupby("expert")[["total", "n_tokens"]].sum()
        importance = (weighted.total / weighted.n_tokens).rename("loss increase").sort_values(ascending=False)
        rank = list(importance.index).index(expert) + 1
        print(f"expert {expert} of layer {layer}: loss increase {importance[expert]:.4f}, "
              f"rank {rank} of {cfg.n_experts} experts of the layer by corpus-level importance")
        table[table.expert == expert].round(4)
        """
    ),
    md(
        """
        ## 5. Generate with and without the ablation

        `model.generate` samples (here greedily) token by token; hooks added with `model.hooks`
        act at every step. Position-targeted hooks index the current forward pass, so with
        `positions=[pos]` generate without the KV cache (every step reruns the whole sequence,
        and `pos` keeps its meaning). The last line ablates the expert at every position instead.
        """
    ),
    code(
        """
        prompt = tokens[:, : pos + 1]
        options = dict(max_new_tokens=20, do_sample=False, verbose=False)
        clean_text = model.to_string(model.generate(prompt, **options)[0])
        with model.hooks(fwd_hooks=at_pos):
            at_pos_text = model.to_string(model.generate(prompt, use_past_kv_cache=False, **options)[0])
        with model.hooks(fwd_hooks=ablate_experts(model, {layer: [expert]})):
            everywhere_text = model.to_string(model.generate(prompt, **options)[0])
        for name, text in [("clean", clean_text), ("ablated at pos", at_pos_text), ("ablated everywhere", everywhere_text)]:
            print(f"{name:>20}: {text!r}")
        """
    ),
    code(
        """
        from moe_hooked.viz import expert_weight_view

        generated = model.generate(prompt, **options)[0]
        expert_weight_view(model, generated, layer=layer, expert=expert)  # where the expert is used in the generated text
        """
    ),
    md(
        """
        ## What this shows on the demo model

        In "... relieved to find an old basket", the model predicts ` under` (p = 0.99, runner-up
        ` at`). Expert 7 of layer 5 alone contributes 6.17 of the logit difference of 6.29. Ablating
        it at that one position cuts the difference to 0.20 and the top prediction becomes ` to`
        (the token's loss goes from 0.007 to 1.83 nats), and greedy generation from there writes
        "to buy tomatoes" instead of "under the bookshelf". Over the corpus the same expert is only
        8th of 16 by causal importance in its layer: an expert can decide one prediction without
        being one the model relies on in general.
        """
    ),
]


# ---------------------------------------------------------------------------------- 05 SAEs and routing
SAE_ROUTING = header(
    "Sparse autoencoders on the router's input: which features pick the experts",
    "A MoE router reads the residual stream after attention (`hook_resid_mid`, through the "
    "layer's norm). This notebook trains a small sparse autoencoder (SAE) with SAELens on that "
    "stream, finds the SAE features whose activation best predicts each expert's selection, "
    "splices the SAE into the model so that its features are hook points, ablates one feature "
    "and shows how the routing changes.\n\n"
    "It needs `sae-lens` (`pip install \"moe_hooked[sae]\"`, which brings TransformerLens 3.x). "
    "On the demo model and a CPU the training takes about a minute.",
    config_extra="TRAIN_STEPS, BATCH_SIZE, D_SAE = 300, 128, 256  # SAE training: steps, activations per step, features\n",
) + [
    code(
        """
        try:
            import sae_lens
        except ImportError:
            print("installing sae-lens")
            %pip install --quiet "sae-lens>=6"
            import sae_lens
        """
    ),
    md("## Load the model"),
    code(LOAD_FOR_HOOKS),
    md(
        """
        ## Activations of the router's input

        `HookActivationSource` streams the built-in corpora through the model (only up to the
        hook's block) and yields shuffled batches `[BATCH_SIZE d_model]` of the hook's activation
        on every real token, BOS excluded: the data provider SAELens's `SAETrainer` expects.
        """
    ),
    code(
        """
        from moe_hooked.data import builtin_corpora
        from moe_hooked.sae import HookActivationSource

        hook_name = get_act_name("resid_mid", layer)
        corpora = builtin_corpora()
        source = HookActivationSource(model, hook_name, corpora, batch_size=BATCH_SIZE)
        held_out = next(source)  # kept aside to measure the reconstruction
        print(hook_name, tuple(held_out.shape))
        """
    ),
    md("## Train an SAE with SAELens"),
    code(
        """
        from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.sae import SAEMetadata
        from sae_lens.training.sae_trainer import SAETrainer

        torch.manual_seed(0)
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=source.d_in, d_sae=D_SAE, l1_coefficient=5.0, normalize_activations="expected_average_only_in",
            device=DEVICE, metadata=SAEMetadata(hook_name=hook_name)))
        trainer_cfg = SAETrainerConfig(total_training_samples=TRAIN_STEPS * BATCH_SIZE, train_batch_size_samples=BATCH_SIZE,
                                       lr=3e-3, lr_end=3e-3, device=DEVICE, n_batches_for_norm_estimate=20)
        with torch.enable_grad():  # the configuration cell switched autograd off
            SAETrainer(trainer_cfg, sae, source).fit()

        features = sae.encode(held_out.float())  # [batch d_sae]
        residual = held_out.float() - sae.decode(features)
        unexplained = residual.pow(2).sum() / (held_out.float() - held_out.float().mean(0)).pow(2).sum()
        print(f"variance unexplained {unexplained:.2f}, active features per token {(features > 0).sum(-1).float().mean():.1f}, "
              f"features that never fired here {int(((features > 0).sum(0) == 0).sum())} of {D_SAE}")
        """
    ),
    md(
        """
        ## Features that predict each expert's selection

        `feature_routing` runs the corpora again and correlates every feature's activation with
        every expert's selection at the layer (1 when the expert holds one of the token's top-k
        slots), token by token. The three best features of each expert:
        """
    ),
    code(
        """
        from moe_hooked.sae import feature_routing

        routing = feature_routing(model, sae, corpora, progress=False)
        top = routing.top_features(k=3)  # expert, rank, feature, correlation, feature_frequency
        top.assign(feature_and_correlation=top.feature.astype(str) + " (" + top.correlation.round(2).astype(str) + ")").pivot(
            index="expert", columns="rank", values="feature_and_correlation")
        """
    ),
    md(
        """
        ## Splice the SAE in and ablate a feature

        Within `model.saes([sae], use_error_term=True)` the SAE's reconstruction plus its error
        flows on from `hook_resid_mid`, so the model's output is unchanged, and the features are
        the hook point `<hook>.hook_sae_acts_post` `[batch pos d_sae]`. Zeroing one feature there
        removes exactly its decoder direction from the router's input.
        """
    ),
    code(
        """
        best = top[top["rank"] == 0].sort_values("correlation", ascending=False).iloc[0]
        expert, feature = int(best.expert), int(best.feature)
        print(f"layer {layer}: feature {feature} correlates {best.correlation:.2f} with the selection of expert {expert}")

        texts = [text for texts in corpora.values() for text in texts[:6]]
        acts_hook, chosen_hook = f"{hook_name}.hook_sae_acts_post", get_act_name("topk_indices", layer)
        with model.saes([sae], use_error_term=True):
            check_close(model(texts[0]), model.run_with_hooks(texts[0]), "logits with the SAE spliced vs without")


        def ablate_feature(acts: torch.Tensor, hook) -> torch.Tensor:
            acts[..., feature] = 0
            return acts


        def routing_per_token(fwd_hooks=()) -> tuple[torch.Tensor, torch.Tensor]:
            \"\"\"Over every token of `texts` (BOS dropped): the feature's activation [tokens] and
            which experts the layer chose [tokens n_experts], with `fwd_hooks` active.\"\"\"
            first = int(cfg.default_prepend_bos)
            acts, chosen = [], []
            with model.saes([sae], use_error_term=True), model.hooks(fwd_hooks=list(fwd_hooks)):
                for text in texts:
                    _, cache = model.run_with_cache(text, names_filter=[acts_hook, chosen_hook])
                    acts.append(cache[acts_hook][0, first:, feature])
                    chosen.append(torch.nn.functional.one_hot(cache[chosen_hook][0, first:], cfg.n_experts).sum(-2))
            return torch.cat(acts), torch.cat(chosen).float()


        activation, clean = routing_per_token()
        _, ablated = routing_per_token([(acts_hook, ablate_feature)])
        active = activation > 0
        changed = (clean != ablated).any(-1)
        print(f"feature {feature} fires on {int(active.sum())} of {len(active)} tokens; ablating it changes the "
              f"experts of {changed[active].float().mean():.0%} of those and of {changed[~active].float().mean():.0%} of the others")
        pd.DataFrame({"clean": clean[active].mean(0), "feature ablated": ablated[active].mean(0)}).rename_axis(
            "expert").round(3).T  # share of the feature's tokens that select each expert
        """
    ),
    md(
        """
        On the demo model the chosen expert's share drops on the tokens where the feature fires
        (and other experts take its slots), while tokens on which the feature does not fire keep
        their routing: the feature is a direction of the router's input that the router reads
        when it picks that expert.
        """
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_interventions.ipynb": INTERVENTIONS,
    "03_moe_lens_paper.ipynb": PAPER,
    "04_end_to_end.ipynb": END_TO_END,
    "05_sae_routing.ipynb": SAE_ROUTING,
}
REQUIRES = {"05_sae_routing.ipynb": "sae_lens"}
"""Notebooks that need an optional package: their execution test is skipped without it."""


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
