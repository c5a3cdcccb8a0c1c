"""One hypergradient method, compiled once and run on batch pairs: what the comparison measures with.

``dtype="float64"`` runs a method with the model's computation dtype, parameters, BN statistics,
batches and alpha in float64 (under ``jax.enable_x64``), and checks that the traced losses hold no
lower-precision value, so a "float64" result never carries float32 rounding.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dyngap_jax import hypergrad, models
from dyngap_jax.methods.alpha_step import alpha_losses


def cast_floating(tree, dtype):
    """Every floating leaf of ``tree`` as ``dtype`` (integer leaves such as labels and token ids kept)."""
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, tree)


class Estimator:
    """One method with fixed options, compiled once for the batch shapes and run on any batch pair.

    ``method`` and ``options`` as :func:`dyngap_jax.hypergrad.alpha_hypergradient` takes them (options
    and call-time inputs); they are checked here, before anything is compiled.

    ``dtype="float64"`` runs it with the model's computation dtype, parameters, BN statistics,
    batches and alpha in float64 (under ``jax.enable_x64``); the traced loss is checked to hold no
    lower-precision floating-point value, so a "float64" result never carries float32 rounding.
    ``precision``: every matmul's and convolution's (``jax.default_matmul_precision``; "highest" in
    float64), as the training alpha step sets it. ``loop``: where the solver loops run, as the
    training alpha step's ``config.alpha.hypergrad.loop`` (resolved: ``"device"`` or ``"host"``; with
    ``"host"`` the compile time is the first call's less a run's, and no memory estimate is made).
    """

    def __init__(self, model, mm_loss, state, method: str, options: Mapping[str, Any], dtype: str | None = None,
                 precision: str = "highest", loop: str = "device"):
        name, fields = _split(method, options)
        hypergrad.make_method(name, **fields)  # an unknown method or a bad option fails here
        if dtype is not None:
            model = models.with_dtype(model, jnp.dtype(dtype))
        self.model, self.mm_loss, self.method, self.options = model, mm_loss, method, dict(options)
        self.dtype = dtype
        self.precision = "highest" if dtype == "float64" else precision
        self.state, self.loop = state, loop
        self._compiled = None
        self._cast_state = None
        self.compile_s = 0.0
        self.peak_bytes = None

    def _x64(self):
        return jax.enable_x64(self.dtype == "float64")

    def _prepare(self, inner, outer):
        if self.dtype is None:
            return self.state, inner, outer
        dt = jnp.dtype(self.dtype)
        if self._cast_state is None:  # the state is the same for every batch pair: cast it once
            self._cast_state = self.state.replace(
                params=cast_floating(self.state.params, dt), model_state=cast_floating(self.state.model_state, dt),
                alpha=self.state.alpha.replace(value=cast_floating(self.state.alpha.value, dt)))
        return self._cast_state, cast_floating(inner, dt), cast_floating(outer, dt)

    def _fn(self, state):
        def fn(params, a, inner, outer, dynamic):
            with jax.default_matmul_precision(self.precision):
                c, m, o = alpha_losses(self.model, self.mm_loss, state.replace(params=params), inner, outer)
                res = hypergrad.alpha_hypergradient(c, m, o, params, a, self.method, **{**self.options, **dynamic})
            return res.replace(solution=None)

        return fn

    def __call__(self, inner, outer, repeats: int = 1, dynamic: Mapping[str, Any] | None = None) -> dict:
        """Run on one batch pair (once, then ``repeats`` timed times; 0: the first run is timed). ``dynamic``: options passed as traced arrays (e.g. CG's ``maxiter``), so
        one compilation serves every value; the same keys must be given on every call."""
        dynamic = {k: np.asarray(v) for k, v in (dynamic or {}).items()}
        with self._x64():
            state, inner, outer = self._prepare(inner, outer)
            args = (state.params, state.alpha.value, inner, outer, dynamic)
            first = self._compiled is None and self.loop == "host"
            if self._compiled is None:
                if self.dtype is not None:
                    c, m, o = alpha_losses(self.model, self.mm_loss, state, inner, outer)
                    low = sorted({str(d) for f in (c, m, o) for d in _float_dtypes(jax.make_jaxpr(f)(state.params).jaxpr)}
                                 - {str(jnp.dtype(self.dtype))})
                    if low:
                        raise ValueError(
                            f"reference dtype {self.dtype}: the model's losses still compute in {low} (a module that "
                            "ignores its dtype field or casts explicitly); use --reference_dtype=float32")
                if self.loop == "host":  # compiled program by program on the first call, timed there
                    self._compiled = hypergrad.HostLoops(self._fn(state))
                else:
                    t0 = time.perf_counter()
                    self._compiled = jax.jit(self._fn(state)).lower(*args).compile()
                    self.compile_s = time.perf_counter() - t0
                    mem = self._compiled.memory_analysis()
                    if mem is not None:
                        self.peak_bytes = int(getattr(mem, "temp_size_in_bytes", 0)
                                              + getattr(mem, "argument_size_in_bytes", 0)
                                              + getattr(mem, "output_size_in_bytes", 0))
            t0 = time.perf_counter()
            res = jax.block_until_ready(self._compiled(*args))  # warm-up
            warm_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(repeats):
                res = jax.block_until_ready(self._compiled(*args))
            run_s = (time.perf_counter() - t0) / repeats if repeats else warm_s
            if first:
                self.compile_s = max(warm_s - run_s, 0.0)
            info = {k: (bool(v) if np.asarray(v).dtype == bool else float(v)) for k, v in jax.device_get(res.info).items()}
            return {"value": np.asarray(res.value, np.float64), "info": info, "run_s": run_s,
                    "compile_s": self.compile_s, "peak_bytes": self.peak_bytes, "ok": bool(res.ok)}


def _float_dtypes(jaxpr) -> set:
    """The floating dtypes of every value a jaxpr (and the jaxprs nested in it) computes."""
    out = set()
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            dt = getattr(v.aval, "dtype", None)
            if dt is not None and jnp.issubdtype(dt, jnp.floating):
                out.add(dt)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out |= _float_dtypes(inner)
    return out


def measure(model, mm_loss, state, inner, outer, method: str, options: Mapping[str, Any], repeats: int = 2,
            dtype: str | None = None, precision: str = "highest", loop: str = "device") -> dict:
    """One estimator on one batch pair: value, info, compile and run time (s), XLA's memory estimate (bytes)."""
    return Estimator(model, mm_loss, state, method, options, dtype, precision, loop)(inner, outer, repeats)


def relative_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(value - reference)) / max(np.max(np.abs(reference)), 1e-30))


def _split(method: str, options: Mapping[str, Any]):
    """``(method, options)`` without the call-time inputs (unknown names are left for ``make_method`` to name)."""
    cls = hypergrad.METHOD_CLASSES.get(method)
    return method, {k: v for k, v in options.items() if cls is None or k not in cls.inputs}
