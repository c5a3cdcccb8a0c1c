"""Host-driven solver loops (dyngap_jax.hypergrad.loops): the same results as the one-program solve, every
solver's iterations out of the XLA program, compiled once, and the alpha step the same either way."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyngap_jax import compilation
from dyngap_jax.hypergrad import HostLoops, conjugate_gradient, minres, power_iteration
from dyngap_jax.hypergrad.certified import bilinear_cg
from dyngap_jax.methods.alpha_step import make_alpha_step, resolve_loop
from dyngap_jax.train import setup
from test_precision import batch, image_config
from tiny_data import make_tiny_records


def solves(A, b, labels):
    """Every host-drivable loop: power iteration, CG with a restart, the certified CG and MINRES; the operator
    closes over an integer array (the labels of a batch) and a value computed before the loops."""
    shift = 1e-3 * jnp.sum(labels)
    mv = lambda v: {"w": A @ v["w"] + shift * v["w"], "s": 2.0 * v["s"]}
    rhs = {"w": b, "s": jnp.ones(())}
    lam, _ = power_iteration(mv, rhs, jax.random.PRNGKey(0), 7)
    x, info = conjugate_gradient(mv, rhs, tol=1e-6, maxiter=60, restarts=1)
    _, J, bound, certified = bilinear_cg(mv, rhs, jax.tree_util.tree_map(lambda x: 2 * x[None], rhs), 0.5, tol=1e-4,
                                         maxiter=60)
    y, minfo = minres(mv, rhs, tol=1e-6, maxiter=60)
    return lam, x, info, J, bound, certified, y, minfo


@pytest.fixture(scope="module")
def system():
    m = np.random.default_rng(0).standard_normal((24, 24))
    return jnp.asarray(m @ m.T + np.eye(24), jnp.float32), jnp.arange(24.0), jnp.arange(5)


def test_host_driven_loops_equal_the_one_program_solves_and_report_every_iteration(system):
    ref = jax.jit(solves)(*system)
    seen = []
    driven = HostLoops(solves, progress=lambda name, i: seen.append((name, i)))
    out = driven(*system)
    for r, o in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=2e-5, atol=1e-6)
    assert driven.count == 5
    assert [driven.loops[k].name for k in range(5)] == ["power iteration", "cg", "cg restart", "certified cg", "minres"]
    last = {}
    for name, i in seen:
        assert i == last.get(name, 0) + 1  # one call an iteration, in order
        last[name] = i
    assert last["power iteration"] == 7
    assert last["certified cg"] == int(out[5]["iterations"]) and last["minres"] == int(out[7]["iterations"])
    # CG's first run, then its one restart (a whole inner CG an iteration of the host-driven restart loop)
    assert last["cg"] < int(out[2]["iterations"]) and last["cg restart"] == 1
    assert bool(out[5]["converged"]) and float(out[2]["residual"]) < 1e-4 and float(out[7]["residual"]) < 1e-4


def test_host_driven_loops_compile_once_and_leave_the_iterations_out_of_the_programs(system):
    driven = HostLoops(solves)
    driven(*system)
    other = (system[0] * 2.0, system[1] + 1.0, system[2])
    with compilation.CompileCounter() as counter:
        out = driven(*other)  # other values, other iteration counts: nothing compiled again
    assert counter.by_function() == {}
    np.testing.assert_allclose(np.asarray(out[1]["w"]), np.asarray(jax.jit(solves)(*other)[1]["w"]),
                               rtol=2e-5, atol=1e-6)
    lowered = driven.lower(*system)
    names = ["power iteration", "cg", "cg restart", "certified cg", "minres"]
    assert lowered.labels == ["segment"] + [x for n in names for x in (f"{n}: condition", f"{n}: body segment",
                                                                        "segment")]
    # no solver iteration is an XLA loop; the only one left is the restart's inner CG (a loop inside a
    # host-driven body stays XLA's); the first segment's are threefry's (the power iteration's random start)
    whiles = [p.as_text().count("stablehlo.while") for p in lowered.programs]
    assert whiles[1:] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0], whiles


def test_every_hessian_vector_product_of_a_solve_is_one_shared_program():
    from dyngap_jax.hypergrad.hvp import make_hvp
    from dyngap_jax.hypergrad.problem import damped

    def solve(w, b):
        loss = lambda p: jnp.sum(jnp.tanh(p["a"] @ w) ** 2) + 0.5 * jnp.sum(p["c"] ** 2) * jnp.sum(p["a"] ** 2)
        params = {"a": jnp.ones(6) * 0.3, "c": jnp.arange(3.0)}
        hvp = make_hvp(loss, params)[0]
        rhs = hvp({"a": b, "c": jnp.ones(3)})  # H g: a call at the top level
        lam, _ = power_iteration(hvp, rhs, jax.random.PRNGKey(0), 5)
        normal = damped(lambda v: hvp(hvp(v)), 0.1)  # two calls in CG's body
        x, info = conjugate_gradient(normal, rhs, tol=1e-6, maxiter=40)
        return lam, x, info["iterations"], hvp(x)

    args = (jnp.asarray(np.random.default_rng(1).standard_normal((6, 4)), jnp.float32), jnp.linspace(-1.0, 1.0, 6))
    ref = jax.jit(solve)(*args)
    driven = HostLoops(solve)
    with compilation.CompileCounter() as counter:
        out = driven(*args)
        compiled = counter.by_function()
    for r, o in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-4, atol=1e-6)
    assert int(out[2]) > 3
    labels = driven.lower(*args).labels
    assert labels.count("call hvp") == 1, labels  # five call sites, one program
    assert "power iteration: body segment" in labels and "cg: body segment" in labels
    # segments, loop conditions and bodies, and the one HVP: each compiled once
    assert compiled == {"jit(solve)": len(labels)}


def test_each_input_signature_has_its_own_programs_and_loops_under_a_transformation_stay_xla_loops():
    from dyngap_jax.hypergrad import loops

    def fn(x):  # the body's value depends on the shape (a mean): a stale body would be silently wrong
        top = loops.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] - jnp.mean(c[1]) + 1.0), (0, x))[1]
        inner = jax.lax.cond(jnp.sum(x) > -1e9, lambda: loops.fori_loop(0, 4, lambda i, c: c * 2.0, x),
                             lambda: x)  # under a cond: not the function's own trace, stays lax's
        return top, inner

    driven = HostLoops(fn)
    for n in (3, 4, 3):
        x = jnp.arange(float(n))
        for got, want in zip(driven(x), jax.jit(fn)(x)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
        assert driven.count == 1
    assert len(driven.signatures) == 2

    def bad(x):
        return loops.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1][:1]), (0, x))

    with pytest.raises(TypeError, match="carry output must have equal types"):
        HostLoops(bad)(jnp.ones(3))


def test_resolve_loop():
    assert resolve_loop("auto", "cpu") == "host" and resolve_loop("auto", "gpu") == "device"
    assert resolve_loop("device", "cpu") == "device" and resolve_loop("host", "gpu") == "host"


@pytest.mark.parametrize("scalar_tol", [None, 0.05])
def test_the_alpha_step_is_the_same_host_driven_or_in_one_program(scalar_tol):
    cfg = image_config("highest", conv=False)
    if scalar_tol is not None:
        cfg.alpha.hypergrad.options = {"scalar_tol": scalar_tol}
    run = setup(cfg, data=False, example=batch(2, False))
    state = run.create_train_state(jax.random.PRNGKey(0))
    lfm = run.method
    steps = {loop: make_alpha_step(model=run.model, mm_loss=lfm.mm_loss, learned=lfm.learned, method=lfm.estimator,
                                   require_converged=True, shardings=run.shardings(state), loop=loop,
                                   donate=loop == "host")
             for loop in ("device", "host")}
    b = batch(4, False)
    ref_state, ref, ref_applied = steps["device"](state, b, b)
    copy = jax.device_put(jax.tree_util.tree_map(jnp.copy, state), run.shardings(state)[0])  # as training has it
    new, res, applied = steps["host"](copy, b, b)
    assert bool(ref_applied) and bool(applied)
    assert int(res.info["iterations"]) == int(ref.info["iterations"]) > 3
    # float32 rounding differs between the programs (XLA fuses them otherwise): equal within the solve's
    # own accuracy (residual 1e-3, the certified 5 %), far tighter than either
    np.testing.assert_allclose(float(res.value), float(ref.value), rtol=1e-3)
    np.testing.assert_allclose(float(new.alpha.value), float(ref_state.alpha.value), rtol=1e-5)
    # the donated input state: what the step leaves unchanged is returned as it is (no copy), the rest freed
    kept = [a is b for a, b in zip(jax.tree_util.tree_leaves(copy), jax.tree_util.tree_leaves(new))]
    deleted = [a.is_deleted() for a in jax.tree_util.tree_leaves(copy)]
    assert all(k or d for k, d in zip(kept, deleted)) and any(deleted) and all(jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda a, b: a is b, copy.params, new.params)))


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


def test_a_long_host_driven_alpha_step_prints_where_it_is(tiny_records, tmp_path, monkeypatch, capsys):
    from tiny_data import tiny_config

    from dyngap_jax.methods import lfm
    from dyngap_jax.train import train

    monkeypatch.setattr(lfm, "PROGRESS_SECONDS", 0.0)  # every iteration counts as long here
    cfg = tiny_config(tiny_records, "ours_lb", epochs=1)
    with cfg.unlocked():
        cfg.alpha.hypergrad.loop = "host"
    summary = train(cfg, str(tmp_path / "run"))
    out = capsys.readouterr().out
    steps = summary["alpha_steps"]["count"]
    assert steps >= 1
    # the solve's loops by name, each iteration: CG at every step, the power iteration only at the first (later
    # steps take the last solve's |lambda|_max, alpha.hypergrad.reuse_lambda)
    assert out.count(": cg iteration 1 (") == steps and out.count(": power iteration iteration 1 (") == 1
    assert ": cg iteration 2 (" in out and "alpha step at step " in out


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dyngap_jax import compilation
from dyngap_jax.hypergrad import HostLoops, conjugate_gradient
mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
def f(A, b):
    x, info = conjugate_gradient(lambda v: A @ v, b, tol=1e-5, maxiter=50)
    return x, info["iterations"]
m = np.random.default_rng(0).standard_normal((32, 32))
A = jax.device_put(jnp.asarray(m @ m.T + np.eye(32), jnp.float32), NamedSharding(mesh, P("d", None)))
b = jax.device_put(jnp.arange(32.0), NamedSharding(mesh, P("d")))
driven = HostLoops(f)
with compilation.CompileCounter() as counter:
    x, its = driven(A, b)
    first = counter.by_function()
other = (A * 2.0, b + 1.0)
with compilation.CompileCounter() as counter:
    driven(*other)
    again = counter.by_function()
ref = jax.jit(f)(A, b)
assert first["jit(f)"] == 4, first  # a segment, CG's condition and body, the last segment (and placing literals)
assert again == {}, again
assert int(its) == int(ref[1]) > 5 and np.allclose(np.asarray(x), np.asarray(ref[0]), rtol=1e-5, atol=1e-6)
print("OK")
"""


def test_on_a_mesh_a_loop_body_compiles_once_its_carry_keeping_its_first_shardings():
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
