"""`MoEHookPoint`: TransformerLens's `HookPoint` with a free fast path and a shape check."""

from __future__ import annotations

import torch

from moe_hooked._tl import HookPoint


class HookShapeError(ValueError):
    """A hook function returned a tensor whose shape differs from the activation it replaced."""


class HookDtypeError(TypeError):
    """A hook function returned a tensor whose dtype differs from the activation it replaced."""


class MoEHookPoint(HookPoint):
    """Identity module that hook functions attach to.

    Calling it with no hooks attached returns its input without entering
    `nn.Module.__call__`, so unused hook points cost one attribute check. With hooks,
    a replacement tensor of the wrong shape raises `HookShapeError`, of another dtype
    `HookDtypeError`, each naming the hook.
    """

    @property
    def is_hooked(self) -> bool:
        """Whether any forward or backward hook is attached."""
        return bool(self._forward_hooks or self._backward_hooks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_hooked:
            return x
        out = super().__call__(x)
        if out.shape != x.shape:
            raise HookShapeError(
                f"a hook on '{self.name}' returned shape {tuple(out.shape)}, but this hook point "
                f"carries shape {tuple(x.shape)}: return a tensor of the same shape (or None)"
            )
        if out.dtype != x.dtype:
            raise HookDtypeError(
                f"a hook on '{self.name}' returned dtype {out.dtype}, but this hook point carries "
                f"{x.dtype}: return a tensor of the same dtype (e.g. `return result.to(activation.dtype)`)"
            )
        return out
