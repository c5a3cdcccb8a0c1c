"""XLA compilations: a persistent cache across processes, and a count of what a run compiled.

:func:`enable_persistent_cache` points JAX's compilation cache at a folder, so a rerun (another seed,
a resumed run, the tests) loads its executables instead of compiling them again. The entry points
turn it on by default (``--compilation_cache_dir``; ``--nocompilation_cache`` turns it off); the
library never changes JAX's configuration by itself.

:class:`CompileCounter` counts the backend compilations (cache hits included: each is an
executable JAX had to obtain) by the name of the jitted function, from JAX's monitoring events.
A run's ``summary.json`` records them as ``compilations``: the train, evaluation and alpha steps
compile once each, whatever the number of epochs.
"""
from __future__ import annotations

import collections
import os
import threading

import jax

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dyngap_jax", "xla")

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_compiles: collections.Counter = collections.Counter()
_hits = 0
_registered = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE:
        with _lock:
            _compiles[kwargs.get("fun_name") or "?"] += 1


def _on_event(event: str, **kwargs) -> None:
    global _hits
    if event == _CACHE_HIT:
        with _lock:
            _hits += 1


def _register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _registered = True


def enable_persistent_cache(path: str = DEFAULT_CACHE_DIR, min_compile_secs: float = 0.0) -> str:
    """Cache compiled executables in ``path`` (created), every one that took ``min_compile_secs`` or more."""
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _step_name(fun_name: str) -> str:
    """``jit(train_step)`` -> ``train_step``; everything that is not one of the run's steps -> ``other``."""
    name = fun_name[4:-1] if fun_name.startswith("jit(") and fun_name.endswith(")") else fun_name
    return name if name in ("train_step", "eval_step", "alpha_step") else "other"


class CompileCounter:
    """Counts compilations between ``start()`` (or entering the ``with`` block) and :meth:`summary`.

    ``summary()``: ``{"train_step": n, "eval_step": n, "alpha_step": n, "other": n, "total": n,
    "persistent_cache_hits": n}``; ``other`` is everything else the process compiled meanwhile
    (initialisation, small host-side operations).
    """

    def __init__(self):
        _register()
        self._start: collections.Counter = collections.Counter()
        self._start_hits = 0

    def start(self) -> "CompileCounter":
        with _lock:
            self._start, self._start_hits = collections.Counter(_compiles), _hits
        return self

    def __enter__(self) -> "CompileCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        return None

    def by_function(self) -> dict[str, int]:
        with _lock:
            return {k: v - self._start.get(k, 0) for k, v in _compiles.items() if v > self._start.get(k, 0)}

    def summary(self) -> dict[str, int]:
        out = {"train_step": 0, "eval_step": 0, "alpha_step": 0, "other": 0}
        for name, n in self.by_function().items():
            out[_step_name(name)] += n
        out["total"] = sum(out.values())
        with _lock:
            out["persistent_cache_hits"] = _hits - self._start_hits
        return out
