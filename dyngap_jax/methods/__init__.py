"""Training methods on one interface (:class:`Method`), by name: ``config.balance.method``.

``lfm`` is the paper's (Eq. 1 with its alpha strategy; configured by ``loss.*`` and ``alpha.*``).
A balancing method is a module with a :class:`Method` subclass, its options a frozen dataclass,
registered with :func:`register`; ``docs/design.md`` shows one written against the interface.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

from dyngap_jax.methods.base import (
    Method,
    NoOptions,
    Part,
    RunInfo,
    StepContext,
    StepInfo,
    finish_metrics,
    modality_keys,
    scale_modalities,
)
from dyngap_jax.methods.state import TrainState, forward

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` a training method under ``cls.name`` (its options must be a frozen dataclass)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a method needs a `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"training method {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"{cls.__name__}.Options must be a (frozen) dataclass of the method's options")
    METHODS[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def option_names() -> tuple[str, ...]:
    """Every registered method's option names (each has a slot in ``config.balance.options``)."""
    names: list[str] = []
    for cls in METHODS.values():
        names += [f.name for f in dataclasses.fields(cls.Options) if f.name not in names]
    return tuple(names)


def _python_type(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))  # an annotation or a type
    return bool if "bool" in t else int if t.startswith("int") else str if "str" in t else float


def option_types() -> dict[str, type]:
    """Every registered method's options with their Python type (for config placeholders)."""
    out: dict[str, type] = {}
    for cls in METHODS.values():
        for f in dataclasses.fields(cls.Options):
            out.setdefault(f.name, _python_type(f))
    return out


def options_from_config(name: str, options: Mapping[str, Any], field: str = "config.balance.options") -> Any:
    """The ``Options`` of method ``name`` from the config's options that are set (``None``: the default);
    another method's option or a bad value fails naming the field."""
    cls = get(name)
    own = {f.name for f in dataclasses.fields(cls.Options)}
    given = {k: v for k, v in dict(options).items() if v is not None}
    for key in sorted(given):
        if key not in own:
            owners = [m for m, c in METHODS.items() if key in {f.name for f in dataclasses.fields(c.Options)}]
            raise ValueError(f"{field}.{key}: training method {name!r} has no option {key!r}"
                             + (f" (an option of {', '.join(owners)})" if owners else "")
                             + (f"; {name!r} takes {', '.join(sorted(own))}" if own else f"; {name!r} takes none"))
    types = {f.name: _python_type(f) for f in dataclasses.fields(cls.Options)}
    checks = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
              int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
              float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)}
    for key, value in given.items():
        if not checks[types[key]](value):
            raise ValueError(f"{field}.{key}: {name}'s option is a {types[key].__name__}, got {value!r}")
    try:
        return cls.Options(**given)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field}: {name}: {e}") from None


from dyngap_jax.methods.agm import AGM  # noqa: E402  (after `register`: these import the interface only)
from dyngap_jax.methods.gblending import GBlending  # noqa: E402
from dyngap_jax.methods.lfm import LFM  # noqa: E402
from dyngap_jax.methods.mla import MLA  # noqa: E402
from dyngap_jax.methods.mmpareto import MMPareto  # noqa: E402
from dyngap_jax.methods.mslr import MSLR  # noqa: E402
from dyngap_jax.methods.ogm_ge import OGMGE  # noqa: E402
from dyngap_jax.methods.pmr import PMR  # noqa: E402

register(LFM)
register(OGMGE)
register(MMPareto)
register(MSLR)
register(AGM)
register(PMR)
register(MLA)
register(GBlending)

__all__ = ["AGM", "GBlending", "LFM", "METHODS", "MLA", "MMPareto", "MSLR", "OGMGE", "PMR", "Method", "NoOptions", "Part", "RunInfo", "StepContext", "StepInfo", "TrainState", "finish_metrics",
           "forward", "get", "modality_keys", "option_names", "option_types", "options_from_config", "register", "scale_modalities"]
