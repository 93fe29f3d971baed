"""Per-token routing of one prompt, drawn with circuitsvis.

Three views, each taking either a model and a prompt (the model is run with a cache of the
routing hooks only) or an existing cache and the prompt's string tokens:

- :func:`expert_weight_view`: tokens coloured by one expert's routing weight at one layer
  (0 where the expert is not among the token's top-k).
- :func:`top1_expert_view`: tokens coloured by the id of their top-1 expert, one row per MoE
  layer, in a categorical palette with a legend (plain HTML, see `categorical.py`).
- :func:`routing_view`: every (layer, expert) weight, with layer and expert pickers.

The circuitsvis views return a :class:`CircuitsView`. circuitsvis's own objects display by
loading its JavaScript from the unpkg CDN whenever a request to google.com succeeds; a
`CircuitsView` made with ``offline=True`` (the default) instead embeds the bundled JavaScript
(about 1.3 MB), so it renders with no network at all: on air-gapped machines, in saved
notebooks and in the report. In a notebook the bundle is embedded once, by the first view
displayed; later views reuse it (in Colab, where each output is its own frame, every view
embeds it). `save`/`to_html` always embed it. ``offline=False`` keeps circuitsvis's behaviour.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

import torch
from circuitsvis.activations import text_neuron_activations
from circuitsvis.tokens import colored_tokens
from circuitsvis.utils.render import RenderedHTML
from jaxtyping import Float, Int

from moe_hooked._tl import ActivationCache
from moe_hooked.cache import cached_layers
from moe_hooked.hook_names import get_act_name
from moe_hooked.model import HookedMoETransformer
from moe_hooked.viz.categorical import CategoricalTokensView
from moe_hooked.viz.html_page import HtmlPage
from moe_hooked.viz.tokens import readable_str_tokens

ROUTING_HOOKS = ("topk_indices", "topk_weights")


class CircuitsView(HtmlPage):
    """A circuitsvis visualization that can render with no network access.

    In a notebook it displays itself (`_repr_html_`); `save(path)` writes a standalone HTML
    page, which always embeds the JavaScript bundle.
    """

    def __init__(self, rendered: RenderedHTML, offline: bool = True, title: str = "moe_hooked"):
        self.rendered = rendered
        self.offline = offline
        self.title = title

    bundle_shown = False
    """Whether a view of this session has already put the bundle into the notebook."""

    def _repr_html_(self) -> str:
        if not self.offline:
            return self.rendered._repr_html_()
        if CircuitsView.bundle_shown and "google.colab" not in sys.modules:
            return _reuse_bundle(self.rendered.local_src)
        CircuitsView.bundle_shown = True
        return _share_bundle(self.rendered.local_src)

    def page_body(self) -> str:
        """The view with the bundle embedded (what `to_html` and `save` write)."""
        return self.rendered.local_src


_RENDER_CALL = "CircuitsVis.render("


def _split_local_src(local_src: str) -> tuple[str, str, str]:
    """circuitsvis's offline HTML as (div and script opening, bundle, render call and closing)."""
    script = local_src.index("<script")
    body = local_src.index(">", script) + 1
    call = local_src.rindex(_RENDER_CALL)
    return local_src[:body], local_src[body:call], local_src[call:]


def _share_bundle(local_src: str) -> str:
    """The view with the bundle, which it also publishes as `window.CircuitsVis` for later views."""
    head, bundle, call = _split_local_src(local_src)
    return f"{head}{bundle}\nwindow.CircuitsVis = CircuitsVis;\n{call}"


def _reuse_bundle(local_src: str) -> str:
    """The view without the bundle: its render call waits for `window.CircuitsVis`."""
    head, _, call = _split_local_src(local_src)
    call = call.removesuffix("</script>").rstrip()
    return (
        f"{head}\n(function show() {{ const CircuitsVis = window.CircuitsVis; "
        f"if (!CircuitsVis) {{ setTimeout(show, 50); return; }}\n{call}\n}})();\n</script>"
    )


def _html_tokens(str_tokens: list[str]) -> list[str]:
    """Escape &, < and > in the tokens: circuitsvis inserts each token as raw HTML (only
    whitespace is replaced), so "<div" would open an element and "</script>" would end the
    inline script. Escaped, they display as written (its hover tooltips show the entities)."""
    return [html.escape(token, quote=False) for token in str_tokens]


# --------------------------------------------------------------------------- routing data
def routing_cache(
    model: HookedMoETransformer, prompt: str | Int[torch.Tensor, " pos"], prepend_bos: bool | None = None
) -> tuple[ActivationCache, list[str]]:
    """Run `prompt` (a string, or token ids such as `model.generate`'s output row) caching only
    the routing hooks; returns (cache, string tokens), the pieces of a character split by
    byte-level BPE labelled readably (see `readable_str_tokens`)."""
    names = {get_act_name(hook, layer) for layer in model.cfg.moe_layers for hook in ROUTING_HOOKS}
    _, cache = model.run_with_cache(prompt, return_type=None, prepend_bos=prepend_bos, names_filter=lambda n: n in names)
    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)[0] if isinstance(prompt, str) else torch.as_tensor(prompt)
    return cache, readable_str_tokens(model, tokens.flatten())


def _routing_layers(cache: ActivationCache) -> list[int]:
    """The MoE layers whose routing (`hook_topk_indices` and `hook_topk_weights`) the cache holds."""
    layers = cached_layers(cache, ROUTING_HOOKS)
    if not layers:
        raise ValueError(
            "the cache holds no routing: run model.run_with_cache(prompt) without a names_filter, or with "
            "one that keeps blocks.{l}.mlp.hook_topk_indices and blocks.{l}.mlp.hook_topk_weights"
        )
    return layers


def _real_rows(cache: ActivationCache, batch: int, x: torch.Tensor) -> torch.Tensor:
    """`x[batch]` [pos ...] at the real positions (all of them when the cache has no mask)."""
    mask = getattr(cache, "attention_mask", None)
    return x[batch] if mask is None else x[batch][mask[batch].bool().to(x.device)]


def routing_weights(cache: ActivationCache, batch: int = 0) -> tuple[Float[torch.Tensor, "pos layer expert"], list[int]]:
    """Each expert's routing weight on each token at each cached MoE layer (0 where not selected).

    Returns (weights [pos, layer, n_experts], the MoE layer ids along `layer`); `pos` spans the
    row's real tokens when the cache holds an attention mask.
    """
    layers = _routing_layers(cache)
    per_layer = []
    for layer in layers:
        indices = _real_rows(cache, batch, cache[get_act_name("topk_indices", layer)])  # [pos k]
        weights = _real_rows(cache, batch, cache[get_act_name("topk_weights", layer)])  # [pos k]
        dense = torch.zeros(indices.shape[0], cache.model.cfg.n_experts, dtype=torch.float32)
        per_layer.append(dense.scatter(-1, indices.cpu(), weights.float().cpu()))
    return torch.stack(per_layer, dim=1), layers


def top1_experts(cache: ActivationCache, batch: int = 0) -> tuple[Int[torch.Tensor, "pos layer"], list[int]]:
    """The top-1 (highest-weight) expert of each token at each cached MoE layer, and the layer ids."""
    layers = _routing_layers(cache)
    ids = [_real_rows(cache, batch, cache[get_act_name("topk_indices", layer)])[:, 0].cpu() for layer in layers]
    return torch.stack(ids, dim=1), layers


def _routing_inputs(
    source: HookedMoETransformer | ActivationCache, tokens: str | list[str] | torch.Tensor, batch: int
) -> tuple[ActivationCache, list[str], int]:
    """(cache, string tokens, batch index) from a model and a prompt (text or token ids), or a
    cache and its string tokens."""
    if isinstance(source, HookedMoETransformer):
        if not isinstance(tokens, str) and not (isinstance(tokens, torch.Tensor) and tokens.squeeze(0).ndim == 1):
            raise TypeError("with a model, pass the prompt as a string or one row of token ids")
        cache, str_tokens = routing_cache(source, tokens)
        return cache, _html_tokens(str_tokens), 0
    if not isinstance(source, ActivationCache):
        raise TypeError(f"expected a HookedMoETransformer or an ActivationCache, got {type(source).__name__}")
    if isinstance(tokens, str):
        raise TypeError("with a cache, pass the prompt's string tokens (model.to_str_tokens(prompt)), not the text")
    n_pos = _real_rows(source, batch, source[get_act_name("topk_indices", _routing_layers(source)[0])]).shape[0]
    if len(tokens) != n_pos:
        raise ValueError(f"{len(tokens)} string tokens given but the cache has {n_pos} positions")
    return source, _html_tokens(list(tokens)), batch


# --------------------------------------------------------------------------- views
def expert_weight_view(
    source: HookedMoETransformer | ActivationCache,
    tokens: str | list[str] | torch.Tensor,
    layer: int,
    expert: int,
    batch: int = 0,
    offline: bool = True,
    max_value: float | None = None,
) -> CircuitsView:
    """Tokens coloured by the routing weight of `expert` at MoE layer `layer` (0 = not selected).

    The colour scale runs from 0 to `max_value` (default: the largest weight shown, so that
    small weights stay visible; pass 1.0 to compare views on one scale).
    `source`/`tokens`: a model and a prompt (text or token ids, e.g. a row of `model.generate`'s
    output), or a cache and the prompt's string tokens.
    """
    cache, str_tokens, batch = _routing_inputs(source, tokens, batch)
    cfg = cache.model.cfg
    cfg.check_moe_layer(layer)
    cfg.check_expert(expert)
    weights, layers = routing_weights(cache, batch)
    if layer not in layers:
        raise ValueError(f"the cache holds no routing for MoE layer {layer}; it has layers {layers}")
    values = weights[:, layers.index(layer), expert]
    if max_value is None:
        max_value = float(values.max()) if values.max() > 0 else 1.0
    elif max_value <= 0:
        raise ValueError(f"max_value must be > 0 (the top of the colour scale), got {max_value}")
    view = colored_tokens(str_tokens, values, min_value=0.0, max_value=max_value)
    return CircuitsView(view, offline, title=f"expert {expert} at layer {layer}")


def top1_expert_view(
    source: HookedMoETransformer | ActivationCache, tokens: str | list[str] | torch.Tensor, batch: int = 0
) -> CategoricalTokensView:
    """Tokens coloured by their top-1 expert id, one row per MoE layer: a categorical palette
    (one colour per expert id) and a legend of the experts shown."""
    cache, str_tokens, batch = _routing_inputs(source, tokens, batch)
    ids, layers = top1_experts(cache, batch)
    str_tokens = [html.unescape(t) for t in str_tokens]  # the categorical view escapes itself
    labels = [f"layer {layer}" for layer in layers]
    return CategoricalTokensView(str_tokens, ids, labels, cache.model.cfg.n_experts, title="top-1 expert per layer")


def routing_view(
    source: HookedMoETransformer | ActivationCache, tokens: str | list[str] | torch.Tensor, batch: int = 0, offline: bool = True
) -> CircuitsView:
    """Every expert's routing weight on every token: pick a layer and an expert to colour by."""
    cache, str_tokens, batch = _routing_inputs(source, tokens, batch)
    weights, layers = routing_weights(cache, batch)
    view = text_neuron_activations(
        str_tokens,
        weights,
        first_dimension_name="Layer",
        second_dimension_name="Expert",
        first_dimension_labels=[str(layer) for layer in layers],
        second_dimension_labels=[str(e) for e in range(weights.shape[-1])],
    )
    return CircuitsView(view, offline, title="routing weights per layer and expert")
