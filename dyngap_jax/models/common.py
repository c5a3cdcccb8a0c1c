"""Shared checks for the encoders."""
from __future__ import annotations

from typing import Sequence


def check_input(x, expected: Sequence[int | None], modality: str) -> None:
    """Raise a ValueError naming ``modality`` unless ``x`` is ``[batch, *expected]`` (None: any size)."""
    shape = tuple(x.shape)
    want = "[batch, " + ", ".join("*" if d is None else str(d) for d in expected) + "]"
    if len(shape) != len(expected) + 1 or any(e is not None and s != e for s, e in zip(shape[1:], expected)):
        raise ValueError(f"modality {modality!r}: expected input of shape {want}, got {list(shape)}")
