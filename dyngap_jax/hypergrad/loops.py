"""Where a solver's iterations run: in one compiled XLA while loop, or driven from the host one iteration
at a time, every Hessian-vector product one shared compiled program.

The solvers of :mod:`~dyngap_jax.hypergrad.solvers` and :mod:`~dyngap_jax.hypergrad.certified` loop with
:func:`while_loop` / :func:`fori_loop` here (``jax.lax.while_loop`` under a named scope that names the
loop), and :func:`~dyngap_jax.hypergrad.hvp.make_hvp` wraps its product in :func:`outlined` (``jax.jit``
under a marked name). Under plain ``jax.jit`` these are ordinary: the whole solve is one program and XLA
inlines the calls. :class:`HostLoops` instead traces the function once and splits its jaxpr:

* a **segment**, a run of ordinary equations, is one program taking the values it reads and returning
  those read later: nothing is computed twice;
* a **loop** (a ``while`` at the function's top level) runs on the host: its condition is one small
  program, its body a plan of its own (segments and calls), called while the condition holds;
* a **call** (an :func:`outlined` function, at the top level or in a loop body) is one program for every
  call site computing the same thing (the same jaxpr and input types): the power iteration's product,
  CG's two a step, ``H g`` and the residual's all run one compiled HVP.

Why: on XLA:CPU a ResNet's HVP runs ~10x slower inside a while loop's body than as a program of its own,
whatever the XLA flags (``scripts.bench_krylov_loop``; docs/benchmarks.md); one compiled HVP instead of a
copy per use halves the alpha step's compilation; the host sees every iteration (progress). jax has no
such driver (``lax.while_loop`` is all or nothing), hence this module.

Only loops at the top level (through ``jax.jit`` calls, which are entered) are split; a loop inside a
loop body, a ``cond``, a ``scan``, a ``custom_vjp`` or a ``checkpoint`` stays an XLA loop in its segment.
The price: a compilation per program, and a host round trip an iteration (the condition's value).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Any, Callable

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

CALL_PREFIX = "host_call__"  # the jit name that marks an outlined function
LOOP_SCOPE = "hostloop="  # the named scope that names a loop


def while_loop(cond: Callable, body: Callable, init, *, name: str = "loop"):
    """``jax.lax.while_loop``, named ``name`` (what :class:`HostLoops` reports in its progress)."""
    with jax.named_scope(LOOP_SCOPE + name):
        return jax.lax.while_loop(cond, body, init)


def fori_loop(lower: int, upper: int, body: Callable, init, *, name: str = "loop"):
    """``jax.lax.fori_loop`` as a while loop (which the host can drive; ``lax``'s with static bounds is a scan)."""
    out = while_loop(lambda c: c[0] < upper, lambda c: (c[0] + 1, body(c[0], c[1])),
                     (jnp.asarray(lower, jnp.int32), init), name=name)
    return out[1]


def outlined(name: str, fn: Callable) -> Callable:
    """``fn`` under ``jax.jit``, marked so that :class:`HostLoops` runs it as a program of its own, shared by
    every call site computing the same thing. Elsewhere an ordinary nested jit (XLA inlines it)."""
    def call(*args):
        return fn(*args)

    call.__name__ = call.__qualname__ = CALL_PREFIX + name
    return jax.jit(call)


def _strong(leaves: list) -> list:
    """Every value an array without jax's weak type: a carry's type never changes between calls."""
    arrays = [x if isinstance(x, jax.Array) else jnp.asarray(np.asarray(x, jnp.result_type(x))) for x in leaves]
    return [jax.lax.convert_element_type(x, x.dtype) if x.weak_type else x for x in arrays]


def _types(leaves) -> tuple:  # what a compiled program is specialised on
    return tuple((tuple(np.shape(x)), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves)


def _placement(inputs: list, carry: list) -> list:
    """Where each carry value stays through a loop: its own sharding if committed; an uncommitted one (a
    literal's start value) replicated where the committed inputs live, as a program computing it would
    place it; None (unpinned) where no input is committed."""
    home = next((x.sharding for x in inputs if getattr(x, "committed", False)), None)
    if isinstance(home, jax.sharding.NamedSharding):
        home = jax.sharding.NamedSharding(home.mesh, jax.sharding.PartitionSpec())
    elif home is not None and len(home.device_set) != 1:
        home = None
    return [c.sharding if getattr(c, "committed", False) else home for c in carry]


def _put(x, sharding):
    """``x`` placed so; across processes (a sharding some of whose devices are elsewhere) each process
    places its own part."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _callee(eqn):
    """The closed jaxpr a ``jit`` equation calls, or None."""
    inner = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else None
    return inner if isinstance(inner, jcore.ClosedJaxpr) else None


def _is_call(eqn) -> bool:
    return _callee(eqn) is not None and str(eqn.params.get("name", "")).startswith(CALL_PREFIX)


def _loop_name(eqn) -> str:
    scopes = [s for s in str(eqn.source_info.name_stack).split("/") if s.startswith(LOOP_SCOPE)]
    return scopes[-1][len(LOOP_SCOPE):] if scopes else "loop"


def _splits(eqn, loops: bool) -> bool:
    """Whether the plan splits at ``eqn``: a call, a loop (with ``loops``), a ``jit`` holding either."""
    return _is_call(eqn) or (loops and eqn.primitive.name == "while") or (
        _callee(eqn) is not None and any(_splits(e, loops) for e in _callee(eqn).jaxpr.eqns))


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _store(env, outvars, values):  # a step's outputs into the plan's environment
    for v, x in zip(outvars, values):
        if not isinstance(v, jcore.DropVar):
            env[v] = x


def _spec(v):
    return jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)


class _Shared:
    """What every plan of one :class:`HostLoops` shares: its name, the compiled calls by their computation."""

    def __init__(self, name: str, progress):
        self.name, self.progress, self.calls, self._keys = name, progress, {}, {}

    def jit(self, fn, **kw):
        def program(*args):
            return fn(*args)

        program.__name__ = program.__qualname__ = self.name  # compilation counts name the function
        return jax.jit(program, **kw)

    def call(self, closed):
        """The one program of every call computing ``closed`` (the same equations, constants and types)."""
        key = self._keys.get(id(closed))
        if key is None:
            digest = hashlib.sha256(str(closed.jaxpr).encode())
            for c in closed.consts:
                digest.update(np.asarray(c).tobytes())
            key = (digest.hexdigest(), _types(closed.in_avals))
            self._keys[id(closed)] = key  # `closed` lives in the plan that asked: its id is not reused
        if key not in self.calls:
            self.calls[key] = self.jit(jcore.jaxpr_as_fun(closed))
        return self.calls[key]


@dataclasses.dataclass
class _Segment:
    program: Any
    ins: list
    outs: list

    def run(self, env):
        for v, x in zip(self.outs, self.program(*[env[v] for v in self.ins])):
            env[v] = x


@dataclasses.dataclass
class _Call:
    program: Any
    eqn: Any

    def run(self, env):
        _store(env, self.eqn.outvars, self.program(*[_read(env, v) for v in self.eqn.invars]))


@dataclasses.dataclass
class _Sub:
    """A ``jit`` call whose jaxpr holds split points: run as a plan of its own."""

    plan: "_Plan"
    eqn: Any

    def run(self, env):
        _store(env, self.eqn.outvars, self.plan.run([_read(env, v) for v in self.eqn.invars]))


@dataclasses.dataclass
class Loop:
    """A host-driven loop: its name, its condition's program and its body's plan."""

    name: str
    cond: Any
    body: "_Plan"
    eqn: Any
    shared: _Shared

    def run(self, env):
        p = self.eqn.params
        nb, nc = p["body_nconsts"], p["cond_nconsts"]
        vals = [np.asarray(v.val, v.aval.dtype) if isinstance(v, jcore.Literal) else env[v] for v in self.eqn.invars]
        cond_consts, body_consts, carry = vals[:nc], vals[nc:nc + nb], _strong(vals[nc + nb:])  # while's order
        shardings = _placement(cond_consts + body_consts + carry, carry)
        carry = [c if s is None else _put(c, s) for c, s in zip(carry, shardings)]
        pinned = [(i, s) for i, s in enumerate(shardings) if s is not None and len(s.device_set) > 1]
        go, n = self.cond(cond_consts, carry), 0
        while bool(go):
            carry = self.body.run(body_consts + carry)
            for i, s in pinned:  # across devices the carry keeps its first shardings: the body compiles once
                if carry[i].sharding != s:
                    carry[i] = jax.device_put(carry[i], s)
            go, n = self.cond(cond_consts, carry), n + 1
            if self.shared.progress is not None:
                self.shared.progress(self.name, n)
        _store(env, self.eqn.outvars, carry)


class _Plan:
    """A jaxpr as steps the host runs in order: segments, calls, loops (with ``loops``) and sub-plans.

    ``donate``: the input positions whose buffers may be reused once read for the last time.
    ``strong``: the outputs without weak types (a loop body's: its next carry)."""

    def __init__(self, closed, shared: _Shared, *, loops: bool, donate=frozenset(), strong: bool = False):
        jaxpr = closed.jaxpr
        self.jaxpr, self.consts, self.shared = jaxpr, list(closed.consts), shared
        self.strong = strong and any(isinstance(v, jcore.Literal) or v.aval.weak_type for v in jaxpr.outvars)
        self.loops: list[Loop] = []
        groups = [[]]  # runs of ordinary equations (lists) between the split points (equations)
        for eqn in jaxpr.eqns:
            if _splits(eqn, loops):
                groups += [eqn, []]
            else:
                groups[-1].append(eqn)
        groups = [g for g in groups if not isinstance(g, list) or g] or [[]]
        # liveness: what each step must leave behind for the steps after it and the outputs
        needed = [set(v for v in jaxpr.outvars if isinstance(v, jcore.Var))]
        for g in reversed(groups[1:]):
            eqns = g if isinstance(g, list) else [g]
            reads = {v for e in eqns for v in e.invars if isinstance(v, jcore.Var)}
            needed.insert(0, (needed[0] - {v for e in eqns for v in e.outvars}) | reads)
        donatable = {v for i, v in enumerate(jaxpr.invars) if i in donate} - needed[-1]
        self.steps = [self._step(g, after, donatable, loops) for g, after in zip(groups, needed)]
        self.drop, live = [], set(jaxpr.constvars) | set(jaxpr.invars)
        for step, after in zip(self.steps, needed):  # what each step leaves that nothing later reads: freed
            live |= set(step.outs if isinstance(step, _Segment) else
                        [v for v in step.eqn.outvars if not isinstance(v, jcore.DropVar)])
            self.drop.append(live - after)
            live &= after

    def _step(self, group, after, donatable, loops):
        if isinstance(group, list):
            defined = {v for e in group for v in e.outvars}
            ins = list(dict.fromkeys(v for e in group for v in e.invars
                                     if isinstance(v, jcore.Var) and v not in defined))
            outs = [v for v in dict.fromkeys(v for e in group for v in e.outvars) if v in after]
            info = jcore.DebugInfo("host loops", self.shared.name, tuple(map(str, ins)), tuple(map(str, outs)))
            sub = jcore.Jaxpr([], ins, outs, group, effects=frozenset().union(*(e.effects for e in group)),
                              debug_info=info)
            fn = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(sub, []))
            spare = [_types([o.aval]) for o in outs]
            donated = []
            for i, v in enumerate(ins):  # an input read for the last time here, if an output can take its buffer
                if v in donatable and v not in after and _types([v.aval]) in spare:
                    spare.remove(_types([v.aval]))
                    donated.append(i)
            return _Segment(self.shared.jit(fn, donate_argnums=tuple(donated)), ins, outs)
        eqn = group
        if _is_call(eqn):
            return _Call(self.shared.call(_callee(eqn)), eqn)
        if eqn.primitive.name == "while" and loops:
            p = eqn.params
            cond_closed = p["cond_jaxpr"]
            cond = self.shared.jit(lambda c, x: jcore.jaxpr_as_fun(cond_closed)(*c, *x)[0])
            body = _Plan(p["body_jaxpr"], self.shared, loops=False, strong=True)
            loop = Loop(_loop_name(eqn), cond, body, eqn, self.shared)
            self.loops.append(loop)
            return loop
        sub = _Plan(_callee(eqn), self.shared, loops=loops)
        self.loops.extend(sub.loops)
        return _Sub(sub, eqn)

    def run(self, args):
        env = dict(zip(self.jaxpr.constvars, self.consts))
        env.update(zip(self.jaxpr.invars, args))
        del args
        for step, drop in zip(self.steps, self.drop):
            step.run(env)
            for v in drop:
                env.pop(v, None)
        outs = [_read(env, v) for v in self.jaxpr.outvars]
        return _strong(outs) if self.strong else outs

    def programs(self, where: str = "", seen=None):
        """``(label, program, input specs)`` of every program the plan runs, in the order they first run
        (a call's once)."""
        seen = set() if seen is None else seen
        for step in self.steps:
            if isinstance(step, _Segment):
                yield where + "segment", step.program, [_spec(v) for v in step.ins]
            elif isinstance(step, _Call) and id(step.program) not in seen:
                seen.add(id(step.program))
                yield where + "call " + str(step.eqn.params["name"])[len(CALL_PREFIX):], step.program, \
                    [_spec(v) for v in step.eqn.invars]
            elif isinstance(step, _Sub):
                yield from step.plan.programs(where, seen)
            elif isinstance(step, Loop):
                nc = step.eqn.params["cond_nconsts"]
                n = nc + step.eqn.params["body_nconsts"]
                carry = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in step.eqn.invars[n:]]
                yield f"{step.name}: condition", step.cond, ([_spec(v) for v in step.eqn.invars[:nc]], carry)
                yield from step.body.programs(f"{step.name}: body ", seen)


class HostLoops:
    """``fn(*args)`` with its top-level solver loops driven from the host (see the module docstring).

    ``donate_argnums``: those arguments' buffers are reused by the program that reads them last (where an
    output of it has their type). ``out_shardings``: the outputs are placed so. ``context``: a callable
    returning a context manager entered around the trace and every call (a precision, ``jax.enable_x64``).
    ``progress(name, iteration)``: called on the host once an iteration has run. A plan is kept per
    input signature (tree, shapes, dtypes): other shapes trace and compile their own. One call at a time.
    """

    def __init__(self, fn: Callable, *, donate_argnums: tuple = (), out_shardings=None, context=None,
                 progress: Callable | None = None):
        self.fn, self.donate_argnums, self.out_shardings = fn, tuple(donate_argnums), out_shardings
        self.context = context or contextlib.nullcontext
        self.shared = _Shared(getattr(fn, "__name__", "fn"), progress)
        self.signatures: dict = {}
        self.placements: dict = {}  # the programs placing outputs, by their shardings
        self.last = None  # the plan of the last signature called

    @property
    def count(self) -> int | None:  # the number of host-driven loops (of the last signature called)
        return None if self.last is None else len(self.last[0].loops)

    @property
    def loops(self) -> dict:  # {k: loop k} (of the last signature called), in the order they run; each has a name
        return {} if self.last is None else dict(enumerate(self.last[0].loops))

    def _plan(self, args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tree, _types(leaves))
        if key not in self.signatures:
            closed, out_shape = jax.make_jaxpr(self.fn, return_shape=True)(*args)
            offsets = np.cumsum([0] + [len(jax.tree_util.tree_leaves(a)) for a in args])
            donate = frozenset(i for k in self.donate_argnums for i in range(offsets[k], offsets[k + 1]))
            self.signatures[key] = (_Plan(closed, self.shared, loops=True, donate=donate),
                                    jax.tree_util.tree_structure(out_shape))
        self.last = self.signatures[key]
        return self.last

    def __call__(self, *args):
        with self.context():
            plan, out_tree = self._plan(args)
            outs = jax.tree_util.tree_unflatten(out_tree, plan.run(jax.tree_util.tree_leaves(args)))
            return outs if self.out_shardings is None else self._placed(outs)

    def _placed(self, outs):
        """``outs`` with ``out_shardings``: those placed otherwise go through one program that places them
        (as a jitted function's outputs are placed; across processes too)."""
        wanted = jax.tree_util.tree_leaves(jax.tree_util.tree_map(  # out_shardings may be a prefix of the outputs
            lambda s, sub: jax.tree_util.tree_map(lambda _: s, sub), self.out_shardings, outs))
        flat, tree = jax.tree_util.tree_flatten(outs)
        moved = [i for i, (x, s) in enumerate(zip(flat, wanted))
                 if not (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim))]
        if moved:
            key = tuple(wanted[i] for i in moved)
            if key not in self.placements:
                self.placements[key] = self.shared.jit(lambda *xs: xs, out_shardings=key)
            for i, x in zip(moved, self.placements[key](*[flat[i] for i in moved])):
                flat[i] = x
        return jax.tree_util.tree_unflatten(tree, flat)

    def lower(self, *args) -> "LoweredPrograms":
        """Every program lowered, in the order they first run, from ``args``' types alone: nothing runs.
        ``.as_text()`` joins their texts; ``.compile()`` compiles them all."""
        with self.context():
            plan, _ = self._plan(args)
            listed = list(plan.programs())
            return LoweredPrograms([program.lower(*specs) for _, program, specs in listed], [x[0] for x in listed])


class LoweredPrograms:
    """The lowered programs of a :class:`HostLoops` function; ``labels``: what each is (a segment, a call, a
    loop's condition or a body's segment)."""

    def __init__(self, programs, labels):
        self.programs, self.labels = programs, labels

    def as_text(self) -> str:
        return "\n".join(p.as_text() for p in self.programs)

    def compile(self):
        return [p.compile() for p in self.programs]
