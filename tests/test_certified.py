"""The hypergradient's certified stopping rule (``cg`` with ``scalar_tol``) against dense float64 references.

The bound must hold at every iteration: the solve is run with budgets 0, 1, 2, ... (one compilation:
the budget is a traced option) and each stopped value's error against the reference (NumPy dense
solves of the same damped normal system) must be within its certified bound. With ``scalar_tol`` the
solve must stop within a few iterations of the first whose true error meets it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyngap_jax import hypergrad, losses
from dyngap_jax.hypergrad.certified import bilinear_cg
from dyngap_jax.hypergrad.quadratic import QuadraticBilevel
from dyngap_jax.models import ConcatFusion, MultimodalClassifier, ResNet, init_variables, with_dtype

pytestmark = pytest.mark.usefixtures("x64")


def test_bound_holds_at_every_iteration_on_a_dense_spd_matrix():
    rng = np.random.default_rng(0)
    n = 60
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.geomspace(1e-3, 1.0, n)
    A = (q * lam) @ q.T
    b, U = rng.standard_normal(n), rng.standard_normal((2, n))
    ref = U @ np.linalg.solve(A, b)
    mv = lambda v: {"w": jnp.asarray(A) @ v["w"]}
    _, J, bound, info = bilinear_cg(mv, {"w": jnp.asarray(b)}, {"w": jnp.asarray(U)}, 0.9e-3, tol=0.0, maxiter=80,
                                    record=81)
    est, bounds = np.asarray(info["history_estimate"]), np.asarray(info["history_bound"])
    err = np.abs(est - ref)
    assert int(info["iterations"]) == 80 and np.all(np.isfinite(est))
    assert np.all(err <= bounds * (1 + 1e-9)), np.max(err / bounds)
    assert np.all(bounds[-1] < 1e-3 * np.abs(ref))  # the bound itself converges
    # the Gauss-Radau bound of the corrected estimate is not loose by orders of magnitude on this spectrum
    assert np.median(err[1:] / bounds[1:]) > 1e-2
    # stopped on it: within the tolerance, and not long after the first iteration that met it truly
    _, J, bound, info = bilinear_cg(mv, {"w": jnp.asarray(b)}, {"w": jnp.asarray(U)}, 0.9e-3, tol=1e-3, maxiter=200)
    first = int(np.argmax(np.all(err <= 1e-3 * np.abs(ref), axis=1)))
    stop = int(info["iterations"])
    assert bool(info["converged"]) and np.all(np.abs(np.asarray(J) - ref) <= 1e-3 * np.abs(ref))
    assert first <= stop <= first + 15, (first, stop)


def _numpy_value(H, g, u, d):
    """``-u^T (H^2 + d I)^{-1} H g``: the damped normal system's hypergradient, dense (u: [P, n])."""
    return -(u @ np.linalg.solve(H @ H + d * np.eye(len(g)), H @ g))


def _flat_problem(cls, mm, outer, params, a):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    total = lambda f: losses.total(cls(unravel(f)), mm(unravel(f)), a)
    H = np.asarray(jax.jit(jax.hessian(total))(flat))
    g = np.asarray(jax.grad(lambda f: outer(unravel(f)))(flat))
    dtotal_da = lambda f: jnp.reshape(jax.jacrev(lambda b: losses.total(cls(unravel(f)), mm(unravel(f)), b))(a), (-1,))
    u = np.asarray(jax.jacrev(dtotal_da)(flat))
    return H, g, u


def _history(cls, mm, outer, params, a, damping, iterations):
    """The estimate and bound after each iteration ``0 .. iterations`` of the solve ``cg`` with ``scalar_tol`` makes
    (its pieces: the HVPs of the Problem, the damped normal operator, the cross vectors), in one compilation."""
    problem = hypergrad.Problem(cls, mm, outer, params, jnp.asarray(a), "forward_over_reverse")

    @jax.jit
    def run():
        hvp = problem.hvp()
        matvec = lambda v: jax.tree_util.tree_map(lambda x, y: x + damping * y, hvp(hvp(v)), v)
        return bilinear_cg(matvec, hvp(problem.outer_grad()), problem.cross_vectors(), damping, tol=0.0,
                           maxiter=iterations, record=iterations + 1)[3]

    info = run()
    made = int(info["iterations"]) + 1  # a solve met exactly (bound 0) stops early; NaN after it
    return -np.asarray(info["history_estimate"])[:made, 0], np.asarray(info["history_bound"])[:made, 0]


def mlp_problem(seed=0):
    rng = np.random.default_rng(seed)
    n, d, h, c = 12, 3, 4, 3
    xa, xb, y = rng.standard_normal((n, d)), rng.standard_normal((n, d)), jnp.asarray(rng.integers(0, c, n))
    init = lambda *s: jnp.asarray(0.5 * rng.standard_normal(s))
    params = {"enc_a": init(d, h), "enc_b": init(d, h), "head": init(2 * h, c), "bias": init(c)}

    def forward(p):
        za, zb = jnp.tanh(xa @ p["enc_a"]), jnp.tanh(xb @ p["enc_b"])
        return za, zb, jnp.concatenate([za, zb], 1) @ p["head"] + p["bias"]

    cls = lambda p: losses.cross_entropy(forward(p)[2], y)
    mm = lambda p: losses.modality_matching(forward(p)[:2], 0.5)
    outer = lambda p: losses.cross_entropy(forward(p)[2][::-1], y)  # another batch's labels: a distinct g
    return cls, mm, outer, params


@pytest.mark.parametrize("problem", ["quadratic", "mlp"])
def test_certified_bound_holds_at_every_iteration_and_the_stop_follows_the_true_error(problem):
    if problem == "quadratic":
        P = QuadraticBilevel.random(12, seed=0)
        a = 0.4
        cls, mm, outer, params = P.cls_loss, P.mm_loss, P.outer_loss, P.pack(P.solution(a))
    else:
        cls, mm, outer, params = mlp_problem()
        a = 0.3
    H, g, u = _flat_problem(cls, mm, outer, params, a)
    d = (1e-2 * np.max(np.abs(np.linalg.eigvalsh(H)))) ** 2
    ref = float(_numpy_value(H, g, u, d)[0])
    values, bounds = _history(cls, mm, outer, params, a, d, 90)
    errs = np.abs(values - ref)
    assert np.all(errs <= bounds * (1 + 1e-8) + 1e-14 * abs(ref)), np.max(errs / bounds)
    short = hypergrad.alpha_hypergradient(cls, mm, outer, params, a, "cg", damping=d, damping_mode="absolute",
                                          scalar_tol=0.0, maxiter=5, report_residual=False)
    assert len(values) > 6 and np.all(np.isfinite(values)) and np.all(np.isfinite(bounds))
    np.testing.assert_allclose(float(short.value), values[5], rtol=1e-10)  # the method is these pieces
    assert float(short.info["bound"]) == pytest.approx(bounds[5], rel=1e-10)
    assert int(short.info["hvp_count"]) == 2 * 2 * 5 + 1  # primal and dual, two HVPs each an iteration, and H g
    tol = 1e-4
    res = hypergrad.alpha_hypergradient(cls, mm, outer, params, a, "cg", damping=d, damping_mode="absolute",
                                        scalar_tol=tol, maxiter=500)
    # the first iteration from which the true error stays within tol (CG's error on this indefinite H is not
    # monotone: it can dip below tol and rise again, and a certified stop cannot follow a dip)
    above = np.flatnonzero(errs > tol * abs(ref))
    first = int(above[-1]) + 1 if above.size else 0
    stop = int(res.info["iterations"])
    assert bool(res.ok) and abs(float(res.value) - ref) <= tol * abs(ref)
    assert float(res.info["bound_relative"]) <= tol
    # the bound runs 5-20x above the true error here (Cauchy-Schwarz between the primal's and the dual's errors,
    # each bounded by Gauss-Radau), which costs about ten iterations at 1e-4
    assert first <= stop <= first + 10, (first, stop)


def test_vector_alpha_bounds_each_entry():
    rng = np.random.default_rng(1)
    n, pairs = 8, 3
    spd = lambda: (lambda q: q @ q.T + np.eye(n))(rng.standard_normal((n, n)))
    A, Bs, C = spd(), [spd() for _ in range(pairs)], spd()
    c, ms, t = rng.standard_normal(n), [rng.standard_normal(n) for _ in range(pairs)], rng.standard_normal(n)
    cls = lambda p: 0.5 * (p["x"] - c) @ A @ (p["x"] - c)
    mm = lambda p: jnp.stack([0.5 * (p["x"] - m) @ B @ (p["x"] - m) for B, m in zip(Bs, ms)])
    outer = lambda p: 0.5 * (p["x"] - t) @ C @ (p["x"] - t)
    a = jnp.asarray([0.2, 0.5, 0.8])
    params = {"x": jnp.asarray(rng.standard_normal(n))}
    H, g, u = _flat_problem(cls, mm, outer, params, a)
    d = 1e-2
    ref = _numpy_value(H, g, u, d)
    for k in range(0, 12):
        res = hypergrad.alpha_hypergradient(cls, mm, outer, params, a, "cg", damping=d, damping_mode="absolute",
                                            scalar_tol=0.0, maxiter=jnp.asarray(k), report_residual=False)
        assert res.value.shape == (3,)
        assert np.max(np.abs(np.asarray(res.value) - ref)) <= float(res.info["bound"]) * (1 + 1e-8) + 1e-12
    res = hypergrad.alpha_hypergradient(cls, mm, outer, params, a, "cg", damping=d, damping_mode="absolute",
                                        scalar_tol=1e-6)
    assert bool(res.ok)
    np.testing.assert_allclose(np.asarray(res.value), ref, rtol=1e-6)
    # P + 1 right-hand sides an iteration, two HVPs each, + H g + the reported residual's HVP
    assert int(res.info["hvp_count"]) == 2 * 4 * int(res.info["iterations"]) + 2


def resnet_pair_problem():
    """Two tiny ResNets (BatchNorm in evaluation mode after a few training-mode passes), concat fusion."""
    rng = np.random.default_rng(0)
    net = lambda m: ResNet(depths=(1, 1), hidden_sizes=(2, 4), embedding_size=3, num_channels=1, modality=m)
    model = MultimodalClassifier(("a", "v"), {"a": net("a"), "v": net("v")}, ConcatFusion(3, ("a", "v")))
    batch = lambda k: {"a": jnp.asarray(rng.standard_normal((k, 12, 8, 1))),
                       "v": jnp.asarray(rng.standard_normal((k, 8, 8, 1))), "label": jnp.asarray(rng.integers(0, 3, k))}
    inner, outer = batch(6), batch(6)
    variables = init_variables(model, jax.random.PRNGKey(0), inner)
    variables = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), variables)
    model = with_dtype(model, jnp.float64)  # computed in float64, not only stored
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    for _ in range(3):  # running averages away from their initial 0 / 1
        _, state = model.apply({"params": params, **state}, inner, train=True, mutable=list(state))
    fwd = lambda p, b: model.apply({"params": p, **state}, b, train=False)
    cls = lambda p: losses.cross_entropy(fwd(p, inner)["logits"], inner["label"])
    mm = lambda p: losses.modality_matching([fwd(p, inner)["features"][m] for m in ("a", "v")], 0.5)
    outer_loss = lambda p: losses.cross_entropy(fwd(p, outer)["logits"], outer["label"])
    return cls, mm, outer_loss, params


def test_certified_bound_holds_on_a_resnet_pair():
    cls, mm, outer, params = resnet_pair_problem()
    a = 0.5
    H, g, u = _flat_problem(cls, mm, outer, params, a)
    assert H.shape[0] > 700  # a network, not a toy: its Hessian is indefinite and sharp
    eig = np.linalg.eigvalsh(0.5 * (H + H.T))
    assert eig[0] < 0 < eig[-1]
    d = (1e-2 * np.max(np.abs(eig))) ** 2
    ref = float(_numpy_value(0.5 * (H + H.T), g, u, d)[0])
    values, bounds = _history(cls, mm, outer, params, a, d, 150)
    errs = np.abs(values - ref)
    assert np.all(errs <= bounds * (1 + 1e-6) + 1e-12 * abs(ref)), np.max(errs / bounds)
    # the stopping rule (bound <= scalar_tol |estimate|; `cg` applies it to this history, as on the MLP above) stops
    # at an estimate within 1e-2 of the dense value, and not long after the true error first meets it
    stop = int(np.argmax(bounds <= 1e-2 * np.abs(values)))
    assert bounds[stop] <= 1e-2 * abs(values[stop]) and errs[stop] <= 1e-2 * abs(ref)
    assert stop - int(np.argmax(errs <= 1e-2 * abs(ref))) <= 30


def test_scalar_tol_options_are_checked_by_name():
    with pytest.raises(hypergrad.OptionError, match="scalar_tol.*'normal' or 'gauss_newton'"):
        hypergrad.make_method("cg", operator="damped", damping=1.0, scalar_tol=1e-2)
    with pytest.raises(hypergrad.OptionError, match="scalar_tol.*needs `damping` > 0"):
        hypergrad.make_method("cg", operator="normal", damping=0.0, scalar_tol=1e-2)
    with pytest.raises(hypergrad.OptionError, match="`scalar_tol` must be >= 0"):
        hypergrad.make_method("cg", scalar_tol=-1.0)
    with pytest.raises(ValueError, match=r"config.alpha.hypergrad.options.scalar_atol"):
        hypergrad.method_from_config({"method": "cg", "options": {"scalar_tol": 1e-2, "scalar_atol": -1.0}})
    assert hypergrad.make_method("cg", scalar_tol=1e-2).scalar_tol == 1e-2


def test_a_warm_start_at_the_solution_stops_at_once():
    cls, mm, outer, params = mlp_problem()
    a = 0.3
    H, g, u = _flat_problem(cls, mm, outer, params, a)
    d = 1e-2
    x = np.linalg.solve(H @ H + d * np.eye(len(g)), H @ g)
    _, unravel = jax.flatten_util.ravel_pytree(params)
    kw = dict(damping=d, damping_mode="absolute", scalar_tol=1e-6, maxiter=500)
    warm = hypergrad.alpha_hypergradient(cls, mm, outer, params, a, "cg", x0=unravel(jnp.asarray(x)), **kw)
    cold = hypergrad.alpha_hypergradient(cls, mm, outer, params, a, "cg", **kw)
    assert int(warm.info["iterations"]) == 0 and bool(warm.ok) and int(cold.info["iterations"]) > 10
    np.testing.assert_allclose(float(warm.value), float(_numpy_value(H, g, u, d)[0]), rtol=1e-9)
    # a start from another system's solution, scaled, is never worse than a cold one
    other = hypergrad.alpha_hypergradient(cls, mm, outer, params, a, "cg", x0=unravel(jnp.asarray(-3.0 * x[::-1])),
                                          **kw)
    assert bool(other.ok) and int(other.info["iterations"]) <= int(cold.info["iterations"]) + 2
