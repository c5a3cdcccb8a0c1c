"""Where a solver's iterations run: in one compiled XLA while loop, or driven from the host one compiled
iteration a call.

The solvers of :mod:`~dyngap_jax.hypergrad.solvers` and :mod:`~dyngap_jax.hypergrad.certified` call
:func:`while_loop` / :func:`fori_loop` here. With no driver active they are ``jax.lax``'s: the whole
solve is one program. Under :class:`HostLoops` a traced function is split at its top-level loops:

* phase ``k``: the function traced with loops ``0 .. k-1`` replaced by their final carries (inputs)
  and stopped at loop ``k``; it returns that loop's initial carry, its condition there, and the values
  its body and condition close over (the parameters, the prepared batches, a damping, a right-hand
  side: computed once, never again per iteration);
* loop ``k``'s iteration: the body (its jaxpr, traced in phase ``k``) on those values and the carry,
  returning the next carry and its condition; the host calls it while the condition holds;
* the last phase: the function with every loop replaced by its final carry: the function's outputs.

Why: on XLA:CPU a ResNet's Hessian-vector product runs ~10x slower inside a while loop's body than as
a program of its own, and no XLA flag tried changes that (``scripts.bench_hvp``'s loop row;
``scripts.bench_krylov_loop`` measures a host-driven solve 11x faster; docs/benchmarks.md). The host
also sees every iteration, so a long solve can show progress. The price: the code before a loop runs
again in each later phase (a right-hand side, an initial residual: a few HVPs a step, not counted in
``hvp_count``), one host round trip an iteration, and a compilation per phase and per loop body. jax
has no such driver (``lax.while_loop`` is all or nothing), hence this module.

Only loops at the top level of the traced function are split; a loop met while tracing a body (CG's
restarts around its inner solve) stays a ``lax`` loop inside that body. Nothing between the function
and its loops may be a ``jax.jit``, ``vmap`` or ``cond`` boundary (the alpha step's solvers are called
directly in its trace).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

_active = threading.local()


def while_loop(cond: Callable, body: Callable, init, *, name: str = "loop"):
    """``jax.lax.while_loop``, or under :class:`HostLoops` a loop the host drives (``name`` in its progress)."""
    trace = getattr(_active, "trace", None)
    if trace is None or trace.nested:
        return jax.lax.while_loop(cond, body, init)
    return trace.loop(cond, body, init, name)


def fori_loop(lower: int, upper: int, body: Callable, init, *, name: str = "loop"):
    """``jax.lax.fori_loop`` with static bounds, or under :class:`HostLoops` a loop the host drives."""
    trace = getattr(_active, "trace", None)
    if trace is None or trace.nested:
        return jax.lax.fori_loop(lower, upper, body, init)
    out = trace.loop(lambda c: c[0] < upper, lambda c: (c[0] + 1, body(c[0], c[1])),
                     (jnp.asarray(lower, jnp.int32), init), name)
    return out[1]


def _strong(tree):
    """Every leaf without jax's weak type, so a carry's type never changes between calls (no recompilation)."""
    return jax.tree_util.tree_map(lambda x: jax.lax.convert_element_type(x, jnp.result_type(x)), tree)


@dataclasses.dataclass
class _Loop:
    """What phase ``k`` learned of loop ``k``: its body and condition as jaxprs (their closed-over values
    are the phase's outputs), and the carry's structure."""

    name: str
    body: Any  # jax.core.Jaxpr: (*body consts, *carry) -> carry
    cond: Any  # (*cond consts, *carry) -> bool
    tree: Any


class _Stop(Exception):
    def __init__(self, loop: _Loop, outputs):
        super().__init__(loop.name)
        self.loop, self.outputs = loop, outputs


class _Trace:
    """One phase's trace: loops before ``stop`` return the given final carries; loop ``stop`` ends the trace."""

    def __init__(self, stop: int | None, results):
        self.stop, self.results, self.count, self.nested = stop, results, 0, False

    def loop(self, cond, body, init, name):
        k, self.count = self.count, self.count + 1
        flat, tree = jax.tree_util.tree_flatten(_strong(init))
        if self.stop is None:  # counting the loops: the carry's type is the initial one's
            return jax.tree_util.tree_unflatten(tree, flat)
        if k < self.stop:
            return jax.tree_util.tree_unflatten(tree, self.results[k])
        self.nested = True  # loops inside the body stay lax loops
        try:
            unflat = lambda c: jax.tree_util.tree_unflatten(tree, c)
            body_j = jax.make_jaxpr(lambda *c: jax.tree_util.tree_leaves(_strong(body(unflat(c)))))(*flat)
            cond_j = jax.make_jaxpr(lambda *c: cond(unflat(c)))(*flat)
        finally:
            self.nested = False
        go = cond(init)
        raise _Stop(_Loop(name, body_j.jaxpr, cond_j.jaxpr, tree),
                    (flat, list(body_j.consts), list(cond_j.consts), go))


def _traced(fn, trace: _Trace):
    """``fn()`` with ``trace`` active: ``(None, outputs)`` when it finished, ``(loop, phase outputs)`` when a
    loop stopped it."""
    previous = getattr(_active, "trace", None)
    _active.trace = trace
    try:
        return None, fn()
    except _Stop as stop:
        return stop.loop, stop.outputs
    finally:
        _active.trace = previous


class HostLoops:
    """``fn(*args)`` with its top-level solver loops driven from the host (see the module docstring).

    ``donate_argnums`` / ``out_shardings``: the last phase's (it returns ``fn``'s outputs; the earlier
    phases read ``args`` and donate nothing). Every phase takes ``args`` with the shardings they have.
    ``context``: a callable returning a context manager entered around every trace and call (a precision,
    ``jax.enable_x64``). ``progress(name, iteration, seconds)``: called after every iteration on the host.
    """

    def __init__(self, fn: Callable, *, donate_argnums: tuple = (), out_shardings=None, context=None,
                 progress: Callable | None = None):
        self.fn, self.progress = fn, progress
        self.final = {"donate_argnums": tuple(i + 1 for i in donate_argnums)}
        if out_shardings is not None:
            self.final["out_shardings"] = out_shardings
        self.context = context or contextlib.nullcontext
        self.name = getattr(fn, "__name__", "fn")  # every program's (compilation counts name the function)
        self.count, self.loops, self.phases, self.bodies = None, {}, {}, {}

    def _phase(self, k: int, args):
        if self.count is None:  # how many loops: the last phase (fn's outputs, donation) is phase `count`
            counter = _Trace(None, [])
            jax.eval_shape(lambda *a: _traced(lambda: self.fn(*a), counter)[1], *args)
            self.count = counter.count
        if k not in self.phases:
            def phase(results, *args):
                loop, out = _traced(lambda: self.fn(*args), _Trace(k, results))
                if (loop is None) != (k == self.count):
                    when = "early" if loop is None else "late"
                    raise RuntimeError(f"HostLoops: phase {k} of {self.count} ended {when}: the function's loops "
                                       "must not depend on its inputs' values")
                if loop is not None:
                    self.loops[k] = loop
                return out

            phase.__name__ = self.name
            self.phases[k] = jax.jit(phase, **(self.final if k == self.count else {}))
        return self.phases[k]

    def _body(self, k: int):
        loop = self.loops[k]
        key = (k, id(loop.body))  # a phase traced again (new input types) traces a new body
        if key not in self.bodies:
            def iterate(body_consts, cond_consts, carry):
                new = jax.core.eval_jaxpr(loop.body, body_consts, *carry)
                return new, jax.core.eval_jaxpr(loop.cond, cond_consts, *new)[0]

            iterate.__name__ = self.name
            self.bodies = {kk: v for kk, v in self.bodies.items() if kk[0] != k}
            self.bodies[key] = jax.jit(iterate)
        return self.bodies[key]

    def __call__(self, *args):
        with self.context():
            results = []
            for k in itertools.count():
                out = self._phase(k, args)(results, *args)
                if k == self.count:
                    return out
                carry, body_consts, cond_consts, go = out
                iterate, t0, n = self._body(k), time.perf_counter(), 0
                while bool(go):
                    carry, go = iterate(body_consts, cond_consts, carry)
                    n += 1
                    if self.progress is not None:
                        self.progress(self.loops[k].name, n, time.perf_counter() - t0)
                results.append(carry)

    def lower(self, *args) -> "LoweredPhases":
        """Every program lowered, in order (phase 0, loop 0's iteration, phase 1, ...), from ``args``'
        types alone: nothing runs. ``.as_text()`` joins their texts; ``.compile()`` compiles them all."""
        with self.context():
            results, programs = [], []
            for k in itertools.count():
                phase = self._phase(k, args)
                programs.append(phase.lower(results, *args))
                if k == self.count:
                    return LoweredPhases(programs)
                carry, body_consts, cond_consts, _ = jax.eval_shape(phase, results, *args)
                programs.append(self._body(k).lower(body_consts, cond_consts, carry))
                results.append(carry)


class LoweredPhases:
    """The lowered programs of a :class:`HostLoops` function."""

    def __init__(self, programs):
        self.programs = programs

    def as_text(self) -> str:
        return "\n".join(p.as_text() for p in self.programs)

    def compile(self):
        return [p.compile() for p in self.programs]
