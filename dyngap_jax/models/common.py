"""Shared checks for the encoders."""
from __future__ import annotations

from typing import Sequence


def check_input(x, expected: Sequence[int | None], modality: str) -> None:
    """Raise a ValueError naming ``modality`` unless ``x`` is ``[batch, *expected]`` (None: any size)."""
    shape = tuple(x.shape)
    want = "[batch, " + ", ".join("*" if d is None else str(d) for d in expected) + "]"
    if len(shape) != len(expected) + 1 or any(e is not None and s != e for s, e in zip(shape[1:], expected)):
        raise ValueError(f"modality {modality!r}: expected input of shape {want}, got {list(shape)}")


def with_dtype(module, dtype):
    """A copy of an (unbound) Flax module tree with every ``dtype`` field set to ``dtype``.

    Walks the module's dataclass fields: sub-modules, and dicts / lists / tuples of them (a
    ``MultimodalClassifier``'s encoders, a video encoder's backbone). Used to run a model in
    float64 for a reference computation; the parameters must be cast by the caller.
    """
    import dataclasses

    import flax.linen as nn

    def convert(value):
        if isinstance(value, nn.Module):
            return with_dtype(value, dtype)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and any(isinstance(v, nn.Module) for v in value):
            return type(value)(convert(v) for v in value)
        return value

    changes = {}
    for f in dataclasses.fields(module):
        if f.name in ("parent", "name"):
            continue
        value = getattr(module, f.name)
        if f.name == "dtype":
            changes["dtype"] = dtype
        else:
            new = convert(value)
            if new is not value:
                changes[f.name] = new
    return module.clone(**changes)
