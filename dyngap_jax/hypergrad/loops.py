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
also sees every iteration, so a long solve can show progress. jax has no such driver
(``lax.while_loop`` is all or nothing), hence this module.

Only loops at the top level of the traced function are split. A loop met anywhere else stays a ``lax``
loop: inside a host-driven body (CG's restarts around its inner solve), or under any transformation
between the function and the loop (``cond``, ``checkpoint``, ``jit``, ``vmap``, ``grad``, ``scan``:
the trace there is not the function's own). The alpha step calls its solvers directly in its trace.

The price, besides a compilation per phase and per loop body: the code before a loop runs again in
each later phase (the batches' preparation, the gradients the right-hand side is made from, an
initial residual; in a separate program, so equal to the loop's own up to rounding), and one host
round trip an iteration.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from typing import Any, Callable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

_active = threading.local()


def _driven():
    """The phase trace a loop here should stop or replay, or None (then the loop is ``lax``'s)."""
    trace = getattr(_active, "trace", None)
    if trace is None or trace.nested or jax.extend.core.get_opaque_trace_state() != trace.state:
        return None
    return trace


def while_loop(cond: Callable, body: Callable, init, *, name: str = "loop"):
    """``jax.lax.while_loop``, or under :class:`HostLoops` a loop the host drives (``name`` in its progress)."""
    trace = _driven()
    if trace is None:
        return jax.lax.while_loop(cond, body, init)
    return trace.loop(cond, body, init, name)


def fori_loop(lower: int, upper: int, body: Callable, init, *, name: str = "loop"):
    """``jax.lax.fori_loop`` with static bounds, or under :class:`HostLoops` a loop the host drives."""
    trace = _driven()
    if trace is None:
        return jax.lax.fori_loop(lower, upper, body, init)
    out = trace.loop(lambda c: c[0] < upper, lambda c: (c[0] + 1, body(c[0], c[1])),
                     (jnp.asarray(lower, jnp.int32), init), name)
    return out[1]


def _strong(tree):
    """Every leaf without jax's weak type, so a carry's type never changes between calls (no recompilation)."""
    return jax.tree_util.tree_map(lambda x: jax.lax.convert_element_type(x, jnp.result_type(x)), tree)


def _types(leaves) -> tuple:
    return tuple((tuple(np.shape(x)), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves)


@dataclasses.dataclass
class _Loop:
    """What phase ``k`` learned of loop ``k``: its body and condition as jaxprs (their closed-over values
    are the phase's outputs), and the carry's structure."""

    name: str
    body: Any  # jax.core.Jaxpr: (*body consts, *carry) -> carry
    cond: Any  # (*cond consts, *carry) -> bool
    tree: Any


class _Stop(BaseException):  # not an Exception: no `except Exception` on the way may swallow it
    def __init__(self, loop: _Loop, outputs):
        super().__init__(loop.name)
        self.loop, self.outputs = loop, outputs


class _Trace:
    """One phase's trace: loops before ``stop`` return the given final carries; loop ``stop`` ends the trace
    (``stop=None``: every loop returns its initial carry, to count them)."""

    def __init__(self, stop: int | None, results):
        self.stop, self.results, self.count, self.nested, self.state = stop, results, 0, False, None

    def loop(self, cond, body, init, name):
        k, self.count = self.count, self.count + 1
        flat, tree = jax.tree_util.tree_flatten(_strong(init))
        if self.stop is None:
            return jax.tree_util.tree_unflatten(tree, flat)
        if k < self.stop:
            return jax.tree_util.tree_unflatten(tree, self.results[k])
        unflat = lambda c: jax.tree_util.tree_unflatten(tree, c)
        self.nested = True  # loops inside the body and the condition stay lax loops
        try:
            body_j = jax.make_jaxpr(lambda *c: jax.tree_util.tree_leaves(_strong(body(unflat(c)))))(*flat)
            cond_j = jax.make_jaxpr(lambda *c: cond(unflat(c)))(*flat)
            go = cond(unflat(flat))
        finally:
            self.nested = False
        carry_types = [t[:2] for t in _types(flat)]
        if [t[:2] for t in _types(body_j.out_avals)] != carry_types:  # as lax.while_loop refuses it
            raise TypeError(f"loop {name!r}: the body's output {_types(body_j.out_avals)} is not its carry's type "
                            f"{_types(flat)}")
        if len(cond_j.out_avals) != 1 or cond_j.out_avals[0].shape != () or cond_j.out_avals[0].dtype != bool:
            raise TypeError(f"loop {name!r}: the condition must return a scalar bool, got {cond_j.out_avals}")
        raise _Stop(_Loop(name, body_j.jaxpr, cond_j.jaxpr, tree), (flat, list(body_j.consts), list(cond_j.consts), go))


def _traced(fn, trace: _Trace):
    """``fn()`` with ``trace`` active: ``(None, outputs)`` when it finished, ``(loop, phase outputs)`` when a
    loop stopped it."""
    previous = getattr(_active, "trace", None)
    _active.trace, trace.state = trace, jax.extend.core.get_opaque_trace_state()
    try:
        return None, fn()
    except _Stop as stop:
        return stop.loop, stop.outputs
    finally:
        _active.trace = previous


class _Programs:
    """The programs of one input signature: the number of loops, the phases, what each traced of its loop
    and the loop bodies (by the carry's shardings)."""

    def __init__(self, count: int):
        self.count, self.phases, self.loops, self.bodies = count, {}, {}, {}


class HostLoops:
    """``fn(*args)`` with its top-level solver loops driven from the host (see the module docstring).

    ``donate_argnums`` / ``out_shardings``: the last phase's (it returns ``fn``'s outputs; the earlier
    phases read ``args`` and donate nothing). Every phase takes ``args`` with the shardings they have;
    a loop's iterations keep its carry's shardings. ``context``: a callable returning a context manager
    entered around every trace and call (a precision, ``jax.enable_x64``). ``progress(name, iteration)``:
    called on the host once an iteration is dispatched. Programs are kept per input
    signature (tree, shapes, dtypes): other shapes trace and compile their own. One call at a time.
    """

    def __init__(self, fn: Callable, *, donate_argnums: tuple = (), out_shardings=None, context=None,
                 progress: Callable | None = None):
        self.fn, self.progress = fn, progress
        self.final = {"donate_argnums": tuple(i + 1 for i in donate_argnums)}
        if out_shardings is not None:
            self.final["out_shardings"] = out_shardings
        self.context = context or contextlib.nullcontext
        self.name = getattr(fn, "__name__", "fn")  # every program's (compilation counts name the function)
        self.signatures: dict = {}
        self.last: _Programs | None = None  # the programs of the last signature called

    @property
    def count(self) -> int | None:
        """The number of top-level loops (of the last signature called)."""
        return None if self.last is None else self.last.count

    @property
    def loops(self) -> dict:
        """``{k: what phase k traced of loop k}`` (of the last signature called): its name, body, condition."""
        return {} if self.last is None else self.last.loops

    def _programs(self, args) -> _Programs:
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tree, _types(leaves))
        if key not in self.signatures:  # how many loops: the last phase (fn's outputs, donation) is phase `count`
            counter = _Trace(None, [])
            jax.eval_shape(lambda *a: _traced(lambda: self.fn(*a), counter)[1], *args)
            self.signatures[key] = _Programs(counter.count)
        self.last = self.signatures[key]
        return self.last

    def _phase(self, programs: _Programs, k: int):
        if k not in programs.phases:
            def phase(results, *args):
                loop, out = _traced(lambda: self.fn(*args), _Trace(k, results))
                if (loop is None) != (k == programs.count):
                    when = "early" if loop is None else "late"
                    raise RuntimeError(f"HostLoops: phase {k} of {programs.count} ended {when}: the function's "
                                       "top-level loops must be the same on every trace")
                if loop is not None:
                    programs.loops[k] = loop
                return out

            phase.__name__ = self.name
            programs.phases[k] = jax.jit(phase, **(self.final if k == programs.count else {}))
        return programs.phases[k]

    def _body(self, programs: _Programs, k: int, shardings=None):
        loop = programs.loops[k]
        key = (k, id(loop.body), shardings)
        if key not in programs.bodies:
            def iterate(body_consts, cond_consts, carry):
                new = jax.core.eval_jaxpr(loop.body, body_consts, *carry)
                return new, jax.core.eval_jaxpr(loop.cond, cond_consts, *new)[0]

            iterate.__name__ = self.name
            kw = {} if shardings is None else {"out_shardings": (list(shardings[0]), shardings[1])}
            programs.bodies[key] = jax.jit(iterate, **kw)
        return programs.bodies[key]

    def __call__(self, *args):
        with self.context():
            programs, results = self._programs(args), []
            for k in itertools.count():
                out = self._phase(programs, k)(results, *args)
                if k == programs.count:
                    return out
                carry, body_consts, cond_consts, go = out
                del out
                # the carry keeps the shardings the phase gave it (no second compilation of the body)
                iterate = self._body(programs, k, (tuple(c.sharding for c in carry), go.sharding))
                n = 0
                while bool(go):
                    carry, go = iterate(body_consts, cond_consts, carry)
                    n += 1
                    if self.progress is not None:
                        self.progress(programs.loops[k].name, n)
                results.append(carry)
                del carry, body_consts, cond_consts  # the next phase makes its own

    def lower(self, *args) -> "LoweredPhases":
        """Every program lowered, in order (phase 0, loop 0's iteration, phase 1, ...), from ``args``'
        types alone: nothing runs. ``.as_text()`` joins their texts; ``.compile()`` compiles them all."""
        with self.context():
            programs, results, lowered = self._programs(args), [], []
            for k in itertools.count():
                phase = self._phase(programs, k)
                lowered.append(phase.lower(results, *args))
                if k == programs.count:
                    return LoweredPhases(lowered)
                carry, body_consts, cond_consts, _ = jax.eval_shape(phase, results, *args)
                lowered.append(self._body(programs, k).lower(body_consts, cond_consts, carry))
                results.append(carry)


class LoweredPhases:
    """The lowered programs of a :class:`HostLoops` function."""

    def __init__(self, programs):
        self.programs = programs

    def as_text(self) -> str:
        return "\n".join(p.as_text() for p in self.programs)

    def compile(self):
        return [p.compile() for p in self.programs]
