"""Splice SAELens SAEs into a hooked model's forward pass.

`add_sae(model, sae)` replaces the hook point named by `sae.cfg.metadata.hook_name` with an
:class:`SAEHookPoint`: what flows on from there is the SAE's reconstruction (plus the
reconstruction error with `use_error_term=True`, so that the model's output is unchanged until
a hook edits a feature). The SAE's own hook points appear under the hook's name, as in SAELens's
`HookedSAETransformer`:

| hook | shape | meaning |
|---|---|---|
| `<hook>.hook_sae_input` | [batch pos d_in] | the activation the SAE reads |
| `<hook>.hook_sae_acts_pre`, `.hook_sae_acts_post` | [batch pos d_sae] | feature pre-activations, feature activations |
| `<hook>.hook_sae_recons` | [batch pos d_in] | the reconstruction |
| `<hook>.hook_sae_error` | [batch pos d_in] | input - reconstruction (only with `use_error_term`) |
| `<hook>.hook_sae_output` and `<hook>` | [batch pos d_in] | what flows on |

(`pos` gains the hook's extra dimensions, e.g. `[batch pos k ...]` on `hook_expert_out`.) The
SAE is duck-typed: anything with `cfg.d_in`, `cfg.metadata.hook_name`, `encode`, `decode` and a
TransformerLens `hook_dict` of its hook points (every SAELens SAE) can be spliced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import nn

from moe_hooked._tl import HookPoint
from moe_hooked.components import MoEHookPoint
from moe_hooked.sae.activations import check_hook_name, hook_width

if TYPE_CHECKING:
    from sae_lens import SAE

    from moe_hooked.model import HookedMoETransformer

_OWN_HOOKS = ("hook_sae_error", "hook_sae_output")
"""The SAE hooks the splice fires itself (the SAE's own ones belong to its standalone forward)."""


class SAEHookPoint(MoEHookPoint):
    """A hook point with an SAE spliced in: carries `sae(x)` (plus `x - sae(x)` computed without
    feature hooks when `use_error_term`), and exposes the SAE's hook points as its children."""

    def __init__(self, sae: SAE, original: HookPoint, use_error_term: bool):
        super().__init__()
        # Kept out of the module tree: registered, they would add ".sae." / ".original." to hook names.
        self.__dict__["sae"] = sae
        self.__dict__["original"] = original
        self.use_error_term = use_error_term
        for name, hook in sae.hook_dict.items():
            if name not in _OWN_HOOKS:
                setattr(self, name, hook)
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(self.splice(x))  # hooks on the hook point itself see what flows on

    def splice(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        """`x` [... d_in] -> the reconstruction [... d_in] (+ error), in `x`'s dtype."""
        out = self.sae.decode(self.sae.encode(x))
        if self.use_error_term:
            with torch.no_grad():
                clean = self._unhooked_reconstruction(x) if self._feature_hooks_active() else out
                out = out + self.hook_sae_error(x.to(clean.dtype) - clean)  # in the SAE's dtype: no rounding to x's
        return self.hook_sae_output(out.to(x.dtype))

    def _feature_hooks_active(self) -> bool:
        return any(hook._forward_hooks for name, hook in self.sae.hook_dict.items() if name not in _OWN_HOOKS)

    def _unhooked_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's reconstruction with its hook points swapped out for identities."""
        hooks = dict(self.sae.hook_dict)
        try:
            for name in hooks:
                setattr(self.sae, name, nn.Identity())
            return self.sae.decode(self.sae.encode(x))
        finally:
            for name, hook in hooks.items():
                setattr(self.sae, name, hook)


def _sae_hook_name(sae: SAE) -> str:
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    hook_name = getattr(metadata, "hook_name", None)
    if not hook_name:
        raise ValueError(
            "this SAE names no hook (sae.cfg.metadata.hook_name is not set): set it to the hook the "
            "SAE was trained on, e.g. sae.cfg.metadata.hook_name = 'blocks.2.hook_resid_mid'"
        )
    return hook_name


def check_sae(model: HookedMoETransformer, sae: SAE) -> str:
    """The hook name `sae` belongs to, after checking that `model` has that hook and that its
    activation's width equals the SAE's `d_in`; a ValueError says what is wrong."""
    hook_name = _sae_hook_name(sae)
    if ".hook_sae_" in hook_name:
        raise ValueError(f"'{hook_name}' is a hook of a spliced SAE: SAEs cannot be spliced into other SAEs")
    check_hook_name(model, hook_name)
    width = hook_width(model, hook_name)
    if sae.cfg.d_in != width:
        raise ValueError(
            f"the SAE reads d_in={sae.cfg.d_in} values, but '{hook_name}' carries {width} per position: "
            "this SAE was trained on another model or hook"
        )
    return hook_name


def _set_hook_point(model: HookedMoETransformer, hook_name: str, hook_point: HookPoint) -> None:
    parent, _, attribute = hook_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, hook_point)


def add_sae(model: HookedMoETransformer, sae: SAE, use_error_term: bool | None = None) -> str:
    """Splice `sae` into `model` at `sae.cfg.metadata.hook_name`, until `reset_saes`; returns
    the hook name. `use_error_term=None` takes the SAE's own `use_error_term` (False if none)."""
    hook_name = check_sae(model, sae)
    if isinstance(model.hook_dict[hook_name], SAEHookPoint):
        raise ValueError(f"an SAE is already spliced into '{hook_name}': call model.reset_saes(['{hook_name}']) first")
    error_term = getattr(sae, "use_error_term", False) if use_error_term is None else use_error_term
    _set_hook_point(model, hook_name, SAEHookPoint(sae, model.hook_dict[hook_name], error_term))
    model.setup()
    return hook_name


def attached_saes(model: HookedMoETransformer) -> dict[str, SAE]:
    """{hook name: SAE} of the SAEs spliced into `model`."""
    return {name: hook.sae for name, hook in model.hook_dict.items() if isinstance(hook, SAEHookPoint)}


def reset_saes(model: HookedMoETransformer, hook_names: Sequence[str] | None = None) -> None:
    """Remove the SAEs spliced at `hook_names` (default: all), restoring the original hook points."""
    spliced = {name: hook for name, hook in model.hook_dict.items() if isinstance(hook, SAEHookPoint)}
    names = list(spliced) if hook_names is None else list(hook_names)
    unknown = [name for name in names if name not in spliced]
    if unknown:
        raise ValueError(f"no SAE is spliced at {unknown} (SAEs are at {sorted(spliced)})")
    for name in names:
        _set_hook_point(model, name, spliced[name].original)
    model.setup()


@contextlib.contextmanager
def saes(model: HookedMoETransformer, sae_list: Sequence[SAE], use_error_term: bool | None = None) -> Iterator[HookedMoETransformer]:
    """Within the context, every SAE of `sae_list` is spliced in (see `add_sae`); all are removed
    on exit, also after an error."""
    added: list[str] = []
    try:
        for sae in sae_list:
            added.append(add_sae(model, sae, use_error_term))
        yield model
    finally:
        if added:
            reset_saes(model, added)
