"""Errors raised while reading a checkpoint."""


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded: missing files, or missing/unexpected/misshapen tensors."""


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's `model_type` (or a variant of it) is not one moe_hooked implements."""
