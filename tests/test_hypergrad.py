"""Hypergradient estimators against independent references (float64).

References: the quadratic problem's closed form (written here in NumPy), ridge regression's
closed-form d theta*/d lambda, finite differences of an inner problem re-solved by SciPy, and a
dense Hessian solve in NumPy.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from dyngap_jax import hypergrad, losses
from dyngap_jax.hypergrad.quadratic import QuadraticBilevel

pytestmark = pytest.mark.usefixtures("x64")

# CG on H v = g itself (these problems' Hessians are positive definite); the library's default is the
# damped normal system, for the indefinite Hessians of networks
PLAIN = {"operator": "plain", "tol": 1e-6, "maxiter": 100}


def rel_err(got, ref):
    return float(np.max(np.abs(np.asarray(got) - np.asarray(ref))) / np.max(np.abs(np.asarray(ref))))


def quadratic_reference(P: QuadraticBilevel, a: float) -> float:
    """d/da of 1/2 (x*-t)^T C (x*-t), x*(a) = M^-1 ((1-a) A c + a B m), by differentiating M x* = r."""
    M = (1 - a) * P.A + a * P.B
    x = np.linalg.solve(M, (1 - a) * P.A @ P.c + a * P.B @ P.m)
    dx = np.linalg.solve(M, P.B @ P.m - P.A @ P.c - (P.B - P.A) @ x)
    return float((P.C @ (x - P.t)) @ dx)


def quad_call(P, a, method, **opts):
    return hypergrad.alpha_hypergradient(P.cls_loss, P.mm_loss, P.outer_loss, P.pack(P.solution(a)), a, method, **opts)


# ----------------------------------------------------------------------------- quadratic


def test_quadratic_closed_form_is_right():
    P = QuadraticBilevel.random(10, seed=3)
    a, h = 0.4, 1e-5
    f = lambda a: 0.5 * (P.solution(a) - P.t) @ P.C @ (P.solution(a) - P.t)
    np.testing.assert_allclose(quadratic_reference(P, a), (f(a + h) - f(a - h)) / (2 * h), rtol=1e-7)
    np.testing.assert_allclose(P.hypergradient(a), quadratic_reference(P, a), rtol=1e-12)


@pytest.mark.parametrize("a", [0.0, 0.3, 0.9])
@pytest.mark.parametrize(
    "method,opts",
    [
        ("cg", PLAIN),
        ("cg", {"operator": "normal", "damping": 0.0, "tol": 1e-6, "maxiter": 200}),
        ("cg", {**PLAIN, "tol": 1e-10, "x0": None}),
        ("dense", {}),
    ],
)
def test_exact_methods_match_closed_form(a, method, opts):
    P = QuadraticBilevel.random(12, seed=0)
    res = quad_call(P, a, method, **opts)
    ref = quadratic_reference(P, a)
    assert rel_err(res.value, ref) < 1e-6
    assert np.sign(res.value) == np.sign(ref)
    assert bool(res.ok)
    assert float(res.info["hessian_residual"]) < 1e-5


def test_cg_gauss_newton_equals_hessian_for_quadratic_heads():
    # For L = l(o(theta)) with linear o and quadratic l, the Gauss-Newton matrix is the Hessian.
    P = QuadraticBilevel.random(8, seed=1)
    gn_model = (P.unpack, lambda x: P.cls_loss(P.pack(x)), lambda x: P.mm_loss(P.pack(x)))
    res = quad_call(P, 0.5, "cg", operator="gauss_newton", gn_model=gn_model, tol=1e-6, maxiter=100)
    assert rel_err(res.value, quadratic_reference(P, 0.5)) < 1e-6


def test_cg_warm_start_and_info():
    P = QuadraticBilevel.random(12, seed=0)
    cold = quad_call(P, 0.3, "cg", **PLAIN)
    params = P.pack(P.solution(0.3))
    M = 0.7 * P.A + 0.3 * P.B
    v = np.linalg.solve(M, P.C @ (P.solution(0.3) - P.t))
    warm = hypergrad.alpha_hypergradient(P.cls_loss, P.mm_loss, P.outer_loss, params, 0.3, hypergrad.CG(**PLAIN), x0=P.pack(v))
    assert int(warm.info["iterations"]) <= 1 < int(cold.info["iterations"])
    np.testing.assert_allclose(warm.value, cold.value, rtol=1e-6)
    # HVPs: one per CG iteration, one for the final true residual, one for hessian_residual
    assert int(cold.info["hvp_count"]) == int(cold.info["iterations"]) + 2


def test_cg_maxiter_reports_not_converged():
    P = QuadraticBilevel.random(12, seed=0, condition=1e3)
    res = quad_call(P, 0.3, "cg", operator="plain", maxiter=2)
    assert int(res.info["iterations"]) == 2
    assert not bool(res.info["converged"]) and not bool(res.ok)
    assert float(res.info["residual"]) > 1e-6


def test_cg_restarts_continue_an_unconverged_solve_from_its_iterate():
    P = QuadraticBilevel.random(12, seed=0, condition=1e3)
    ref = quadratic_reference(P, 0.3)
    more = quad_call(P, 0.3, "cg", operator="plain", maxiter=10, restarts=30, tol=1e-10)
    one = quad_call(P, 0.3, "cg", operator="plain", tol=1e-6, maxiter=10)
    assert not bool(one.ok) and bool(more.ok)
    assert rel_err(more.value, ref) < 1e-6
    # each restart recomputes the true residual (one HVP) before iterating; iterations add up
    assert int(more.info["iterations"]) > 10
    with pytest.raises(ValueError, match="restarts"):
        quad_call(P, 0.3, "cg", restarts=-1)


def test_finite_difference_matches_closed_form():
    P = QuadraticBilevel.random(8, seed=4)
    res = quad_call(P, 0.6, "finite_difference", eps=1e-4)
    assert bool(res.info["converged"])
    assert rel_err(res.value, quadratic_reference(P, 0.6)) < 1e-6


def test_unrolled_approaches_ift_as_steps_grow():
    P = QuadraticBilevel.random(8, seed=5, condition=4.0)
    ref = quadratic_reference(P, 0.5)
    errs = [rel_err(quad_call(P, 0.5, "unrolled", num_steps=k, inner_lr=0.2).value, ref) for k in (2, 10, 60)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-4


def test_identity_is_not_exact():
    P = QuadraticBilevel.random(12, seed=0)
    res = quad_call(P, 0.3, "identity")
    assert rel_err(res.value, quadratic_reference(P, 0.3)) > 0.1
    assert float(res.info["hessian_residual"]) > 0.1


def test_eq3_cross_term_is_g_mm_minus_g_cls():
    P = QuadraticBilevel.random(8, seed=6)
    params = P.pack(P.solution(0.2))
    v = P.pack(np.linspace(-1.0, 1.0, 8))
    x = P.solution(0.2)
    g_cls, g_mm = P.A @ (x - P.c), P.B @ (x - P.m)
    expected = -(g_mm - g_cls) @ np.linspace(-1.0, 1.0, 8)
    for mode in ("forward_over_reverse", "reverse_over_reverse"):
        got = hypergrad.implicit_hypergradient(P.cls_loss, P.mm_loss, params, 0.2, v, mode)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


# ----------------------------------------------------------------------------- ridge


def ridge_setup(seed=0, n=30, d=5):
    rng = np.random.default_rng(seed)
    X, Xv = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y, yv = X @ w + 0.3 * rng.standard_normal(n), Xv @ w + 0.3 * rng.standard_normal(n)
    return X, y, Xv, yv


def test_ridge_closed_form_dtheta_dlambda():
    # (1-a) 1/2|X w - y|^2 + a 1/2|w|^2 is ridge with lambda = a / (1 - a): w* = (X^T X + lambda I)^-1 X^T y,
    # d w*/d lambda = -(X^T X + lambda I)^-1 w*, d lambda / d a = 1 / (1 - a)^2.
    X, y, Xv, yv = ridge_setup()
    a = 0.2
    lam = a / (1 - a)
    K = X.T @ X + lam * np.eye(X.shape[1])
    w_star = np.linalg.solve(K, X.T @ y)
    dw_da = -np.linalg.solve(K, w_star) / (1 - a) ** 2
    ref = (Xv.T @ (Xv @ w_star - yv)) @ dw_da

    cls = lambda p: 0.5 * jnp.sum((X @ p["w"] - y) ** 2)
    reg = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
    outer = lambda p: 0.5 * jnp.sum((Xv @ p["w"] - yv) ** 2)
    params = {"w": jnp.asarray(w_star)}
    for method in (hypergrad.CG(**PLAIN), "dense", "finite_difference"):
        res = hypergrad.alpha_hypergradient(cls, reg, outer, params, a, method)
        assert rel_err(res.value, ref) < 1e-6, method


# ----------------------------------------------------------------------------- logistic


def logistic_setup(seed=0, n=60, d=4):
    rng = np.random.default_rng(seed)
    X, Xv = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y = (X @ w + 0.5 * rng.standard_normal(n) > 0).astype(float)
    yv = (Xv @ w + 0.5 * rng.standard_normal(n) > 0).astype(float)
    nll = lambda X, y: (lambda p: jnp.mean(jnp.logaddexp(0.0, X @ p["w"] + p["b"]) - y * (X @ p["w"] + p["b"])))
    cls = nll(X, y)
    reg = lambda p: 0.5 * (jnp.sum(p["w"] ** 2) + p["b"] ** 2)
    outer = nll(Xv, yv)

    Xb = np.hstack([X, np.ones((n, 1))])

    def np_total(theta, a):  # NumPy copy of L_total and its gradient, for SciPy's independent inner solve
        z = Xb @ theta
        value = (1 - a) * np.mean(np.logaddexp(0.0, z) - y * z) + a * 0.5 * np.sum(theta**2)
        grad = (1 - a) * Xb.T @ (1 / (1 + np.exp(-z)) - y) / n + a * theta
        return value, grad

    def np_outer(theta):
        z = Xv @ theta[:-1] + theta[-1]
        return np.mean(np.logaddexp(0.0, z) - yv * z)

    def solve(a):
        r = scipy.optimize.minimize(np_total, np.zeros(d + 1), args=(a,), jac=True, method="BFGS", options={"gtol": 1e-13})
        return r.x

    return cls, reg, outer, np_outer, solve


def test_logistic_against_finite_differences_of_resolved_inner():
    cls, reg, outer, np_outer, solve = logistic_setup()
    a, h = 0.3, 1e-4
    ref = (np_outer(solve(a + h)) - np_outer(solve(a - h))) / (2 * h)
    theta = solve(a)
    params = {"w": jnp.asarray(theta[:-1]), "b": jnp.asarray(theta[-1])}
    res = hypergrad.alpha_hypergradient(cls, reg, outer, params, a, "cg", operator="plain", tol=1e-10, maxiter=100)
    assert rel_err(res.value, ref) < 1e-5 and bool(res.ok)


def test_neumann_error_decreases_with_terms():
    cls, reg, outer, _, solve = logistic_setup(seed=1)
    a = 0.02  # weak regularisation: a spread-out spectrum, so the series needs many terms
    theta = solve(a)
    params = {"w": jnp.asarray(theta[:-1]), "b": jnp.asarray(theta[-1])}
    ref = hypergrad.alpha_hypergradient(cls, reg, outer, params, a, "cg", operator="plain", tol=1e-12, maxiter=100).value
    errs = []
    for k in (2, 8, 32, 64):
        res = hypergrad.alpha_hypergradient(cls, reg, outer, params, a, "neumann", num_terms=k)
        assert not bool(res.info["diverged"])
        errs.append(rel_err(res.value, ref))
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[0] > 0.1 and errs[-1] < 1e-8


def test_neumann_flags_divergence():
    P = QuadraticBilevel.random(8, seed=0)
    res = quad_call(P, 0.3, "neumann", num_terms=30, eta=1.0)  # eta * lambda_max ~ 8 > 2
    assert bool(res.info["diverged"]) and not bool(res.ok)


def test_ghadimi_wang_is_the_randomised_neumann_series():
    P = QuadraticBilevel.random(6, seed=2)
    a, b, eta = 0.4, 6, 0.1
    params = P.pack(P.solution(a))
    H = (1 - a) * P.A + a * P.B
    g = P.C @ (P.solution(a) - P.t)
    cross = P.B @ (P.solution(a) - P.m) - P.A @ (P.solution(a) - P.c)  # g_MM - g_CLS
    sampler = lambda key: (P.cls_loss, P.mm_loss)  # a deterministic "batch": H_k = H
    draw = lambda key: hypergrad.alpha_hypergradient(
        P.cls_loss, P.mm_loss, P.outer_loss, params, a, "ghadimi_wang", sampler=sampler, key=key, num_terms=b, eta=eta
    )
    res = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.PRNGKey(0), 60))
    seen = {}
    for value, p in zip(np.asarray(res.value), np.asarray(res.info["p"])):
        expected = -cross @ (b * eta * np.linalg.matrix_power(np.eye(6) - eta * H, int(p)) @ g)
        np.testing.assert_allclose(value, expected, rtol=1e-10)
        seen[int(p)] = float(value)
    assert sorted(seen) == list(range(b))  # p ~ U{0..b-1}
    # its expectation over p is the b-term Neumann series with the same eta
    neumann = quad_call(P, a, "neumann", num_terms=b, eta=eta)
    np.testing.assert_allclose(np.mean(list(seen.values())), neumann.value, rtol=1e-10)


def test_ghadimi_wang_fresh_minibatches_under_jit():
    rng = np.random.default_rng(0)
    X, y = jnp.asarray(rng.standard_normal((40, 3))), jnp.asarray(rng.standard_normal(40))
    mse = lambda idx: (lambda p: 0.5 * jnp.mean((X[idx] @ p["w"] - y[idx]) ** 2))
    reg = lambda p: 0.5 * jnp.sum(p["w"] ** 2)

    def sampler(key):
        idx = jax.random.choice(key, 40, (8,), replace=False)
        return mse(idx), reg

    @jax.jit
    def run(params, key):
        return hypergrad.alpha_hypergradient(
            mse(jnp.arange(40)), reg, mse(jnp.arange(40)), params, 0.5, "ghadimi_wang",
            sampler=sampler, key=key, num_terms=10, eta=0.5,
        )

    res = run({"w": jnp.zeros(3)}, jax.random.PRNGKey(3))
    assert bool(res.info["finite"]) and 0 <= int(res.info["p"]) < 10


# ----------------------------------------------------------------------------- non-convex MLP


def mlp_setup(seed=0):
    rng = np.random.default_rng(seed)
    n, d, h, c = 12, 3, 4, 3
    xa, xb = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    y = rng.integers(0, c, n)
    init = lambda *s: jnp.asarray(0.5 * rng.standard_normal(s))
    params = {"enc_a": init(d, h), "enc_b": init(d, h), "head": init(2 * h, c), "bias": init(c)}

    def forward(p):
        za, zb = jnp.tanh(xa @ p["enc_a"]), jnp.tanh(xb @ p["enc_b"])
        return za, zb, jnp.concatenate([za, zb], 1) @ p["head"] + p["bias"]

    # a little weight decay: softmax's shift invariance would otherwise leave H exactly singular
    decay = lambda p: 0.5 * 0.05 * sum(jnp.sum(w**2) for w in jax.tree_util.tree_leaves(p))
    cls = lambda p: losses.cross_entropy(forward(p)[2], jnp.asarray(y)) + decay(p)
    mm = lambda p: losses.modality_matching(forward(p)[:2], 0.5)
    return params, cls, mm


def test_mlp_damped_cg_equals_damped_dense_solve():
    params, cls, mm = mlp_setup()
    a = 0.3
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda f: losses.total(cls(unravel(f)), mm(unravel(f)), a)))(flat))
    eig = np.linalg.eigvalsh(H)
    assert eig[0] < 0 < eig[-1]  # the MLP's Hessian is indefinite here
    damping = -eig[0] + 0.5
    # independent reference: NumPy dense solve with the damped Hessian, then Eq. 3
    g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(cls)(params))[0])
    g_mm = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(mm)(params))[0])
    ref = -(g_mm - g) @ np.linalg.solve(H + damping * np.eye(H.shape[0]), g)
    dense = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "dense", damping=damping)
    cg = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", operator="damped", damping=damping,
                                       damping_mode="absolute", tol=1e-12, maxiter=500)
    assert rel_err(dense.value, ref) < 1e-8
    assert rel_err(cg.value, ref) < 1e-6 and bool(cg.ok)
    np.testing.assert_allclose(dense.info["min_eigenvalue"], eig[0], rtol=1e-8)
    np.testing.assert_allclose(dense.info["min_abs_eigenvalue"], np.min(np.abs(eig)), rtol=1e-6)


def test_dense_normal_operator_is_the_tikhonov_filtered_solve_cg_normal_converges_to():
    params, cls, mm = mlp_setup()
    a, damping = 0.3, 1e-2
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda f: losses.total(cls(unravel(f)), mm(unravel(f)), a)))(flat))
    g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(cls)(params))[0])
    g_mm = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(mm)(params))[0])
    # independent reference through the eigendecomposition: v = sum_i lam_i / (lam_i^2 + d) (u_i . g) u_i
    lam, U = np.linalg.eigh(H)
    ref = -(g_mm - g) @ (U @ (lam / (lam**2 + damping) * (U.T @ g)))
    dense = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "dense", operator="normal", damping=damping)
    cg = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", operator="normal", damping=damping, damping_mode="absolute",
                                       tol=1e-12, maxiter=1000)
    assert rel_err(dense.value, ref) < 1e-8
    assert rel_err(cg.value, ref) < 1e-6 and bool(cg.ok)
    with pytest.raises(ValueError, match="dense: `operator` must be"):
        hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "dense", operator="gauss_newton")


def test_minres_solves_the_indefinite_mlp_hessian_with_one_hvp_an_iteration():
    params, cls, mm = mlp_setup()
    a = 0.3
    dense = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "dense")
    assert float(dense.info["min_eigenvalue"]) < 0  # indefinite: plain CG is not applicable
    res = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "minres", tol=1e-12, maxiter=500)
    assert bool(res.ok) and rel_err(res.value, dense.value) < 1e-7
    # HVPs: one per iteration, one for the true residual, one for hessian_residual
    assert int(res.info["hvp_count"]) == int(res.info["iterations"]) + 2
    damped = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "minres", damping=0.7, tol=1e-12, maxiter=500)
    dense_damped = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "dense", damping=0.7)
    assert rel_err(damped.value, dense_damped.value) < 1e-7
    truncated = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "minres", maxiter=2)
    assert int(truncated.info["iterations"]) == 2 and not bool(truncated.ok)


def test_minres_solver_against_scipy_on_an_indefinite_matrix():
    import scipy.sparse.linalg

    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    lam = np.concatenate([-np.logspace(-2, 1, 12), np.logspace(-2, 1, 18)])
    A, b = q @ np.diag(lam) @ q.T, rng.standard_normal(30)
    x, info = hypergrad.minres(lambda v: {"w": jnp.asarray(A) @ v["w"]}, {"w": jnp.asarray(b)}, tol=1e-12, maxiter=300)
    ref, code = scipy.sparse.linalg.minres(A, b, rtol=1e-12, maxiter=300)
    assert code == 0 and bool(info["converged"])
    assert rel_err(x["w"], np.linalg.solve(A, b)) < 1e-9 and rel_err(x["w"], ref) < 1e-6


def test_dense_solves_an_exactly_singular_hessian_on_its_range():
    params, cls, mm = mlp_setup()
    a = 0.3
    exact = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "dense")
    # a parameter no loss reads: its Hessian rows are exactly 0, np.linalg.solve would give inf/nan
    padded = {**params, "unused": jnp.ones(3)}
    drop = lambda f: (lambda p: f({k: v for k, v in p.items() if k != "unused"}))
    sing = hypergrad.alpha_hypergradient(drop(cls), drop(mm), drop(cls), padded, a, "dense")
    assert int(sing.info["null_dimensions"]) == 3 and int(exact.info["null_dimensions"]) == 0
    assert bool(sing.ok) and rel_err(sing.value, exact.value) < 1e-8


def test_mlp_plain_cg_flags_negative_curvature_and_normal_equations_solve_it():
    params, cls, mm = mlp_setup()
    a = 0.3
    plain = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", operator="plain", maxiter=500, tol=1e-12)
    dense = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "dense")
    # plain CG on an indefinite Hessian: either it breaks down (flagged) or it still converges
    if bool(plain.info["breakdown"]):
        assert bool(plain.info["negative_curvature"]) and not bool(plain.ok)
    else:
        assert rel_err(plain.value, dense.value) < 1e-5
    normal = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", operator="normal", damping=0.0, maxiter=2000,
                                           tol=1e-13)
    assert rel_err(normal.value, dense.value) < 1e-4


# ----------------------------------------------------------------------------- lfm_code


def test_lfm_code_is_hessian_times_gradient():
    params, cls, mm = mlp_setup(1)
    a = 0.95
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda f: losses.total(cls(unravel(f)), mm(unravel(f)), a)))(flat))
    g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(cls)(params))[0])
    g_mm = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(mm)(params))[0])
    hg = H @ g
    first = jax.tree_util.tree_leaves(params)[0].size  # "bias" sorts first
    for reduction, ref in [("cross", -(g_mm - g) @ hg), ("first_tensor_mean", hg[:first].mean()), ("mean", hg.mean())]:
        res = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "lfm_code", reduction=reduction)
        np.testing.assert_allclose(res.value, ref, rtol=1e-8, err_msg=reduction)
        assert int(res.info["hvp_count"]) == 1


# ----------------------------------------------------------------------------- vector alpha


def vector_problem(seed=0, n=6, pairs=3):
    rng = np.random.default_rng(seed)
    spd = lambda: (lambda q: q @ q.T + n * np.eye(n))(rng.standard_normal((n, n)))
    A, Bs, C = spd(), [spd() for _ in range(pairs)], spd()
    c, ms, t = rng.standard_normal(n), [rng.standard_normal(n) for _ in range(pairs)], rng.standard_normal(n)
    cls = lambda p: 0.5 * (p["x"] - c) @ A @ (p["x"] - c)
    mm = lambda p: jnp.stack([0.5 * (p["x"] - m) @ B @ (p["x"] - m) for B, m in zip(Bs, ms)])
    outer = lambda p: 0.5 * (p["x"] - t) @ C @ (p["x"] - t)

    def solution(a):  # (1 - mean a) A + mean_p a_p B_p
        M = (1 - np.mean(a)) * A + sum(ap * B for ap, B in zip(a, Bs)) / pairs
        r = (1 - np.mean(a)) * A @ c + sum(ap * B @ m for ap, B, m in zip(a, Bs, ms)) / pairs
        return np.linalg.solve(M, r)

    def reference(a):  # d outer / d a_p by differentiating M x = r in each a_p
        M = (1 - np.mean(a)) * A + sum(ap * B for ap, B in zip(a, Bs)) / pairs
        x = solution(a)
        out = []
        for B, m in zip(Bs, ms):
            dx = np.linalg.solve(M, (B @ m - A @ c) / pairs - ((B - A) / pairs) @ x)
            out.append((C @ (x - t)) @ dx)
        return np.asarray(out)

    return cls, mm, outer, solution, reference


@pytest.mark.parametrize("method", [hypergrad.CG(**PLAIN), "dense", "finite_difference"], ids=["cg", "dense", "fd"])
def test_vector_alpha_matches_closed_form(method):
    cls, mm, outer, solution, reference = vector_problem()
    a = np.asarray([0.2, 0.5, 0.8])
    res = hypergrad.alpha_hypergradient(cls, mm, outer, {"x": jnp.asarray(solution(a))}, a, method)
    assert res.value.shape == (3,)
    # finite differences carry O(eps^2) truncation and the inner solves' tolerance
    assert rel_err(res.value, reference(a)) < (1e-5 if method == "finite_difference" else 1e-6)


def test_vector_alpha_with_equal_weights_sums_to_scalar():
    cls, mm, outer, solution, _ = vector_problem(1)
    a = 0.4
    params = {"x": jnp.asarray(solution(np.full(3, a)))}
    vec = hypergrad.alpha_hypergradient(cls, mm, outer, params, jnp.full(3, a), "cg", **PLAIN)
    scalar = hypergrad.alpha_hypergradient(cls, lambda p: jnp.mean(mm(p)), outer, params, a, "cg", **PLAIN)
    np.testing.assert_allclose(jnp.sum(vec.value), scalar.value, rtol=1e-8)
    unrolled = hypergrad.alpha_hypergradient(cls, mm, outer, params, jnp.full(3, a), "unrolled", num_steps=3, inner_lr=0.01)
    assert unrolled.value.shape == (3,)
    with pytest.raises(ValueError, match="reduction='cross'"):
        hypergrad.alpha_hypergradient(cls, mm, outer, params, jnp.full(3, a), "lfm_code", reduction="mean")


# ----------------------------------------------------------------------------- HVPs, jit, errors


def test_hvp_matches_dense_hessian_and_custom_vjp_falls_back():
    rng = np.random.default_rng(0)
    x = {"u": jnp.asarray(rng.standard_normal(4)), "v": jnp.asarray(rng.standard_normal(3))}
    W = jnp.asarray(rng.standard_normal((4, 3)))
    f = lambda p: jnp.sum(jnp.sin(p["u"]) ** 2) + jnp.tanh(p["u"] @ W @ p["v"])
    v = {"u": jnp.ones(4), "v": jnp.arange(3.0)}
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    H = jax.hessian(lambda z: f(unravel(z)))(flat)
    ref = H @ jax.flatten_util.ravel_pytree(v)[0]
    got = hypergrad.hvp(f, x, v)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(got)[0], ref, rtol=1e-10)

    # A custom_vjp has no jvp rule. Forward-over-reverse HVPs still work when its backward rule is
    # plain jnp, but the forward-mode cross term (a jvp of the primal) does not; a backward rule that
    # itself calls a custom_vjp stops the forward-over-reverse HVP as well.
    @jax.custom_vjp
    def sigmoid(z):
        return jax.nn.sigmoid(z)

    sigmoid.defvjp(lambda z: (jax.nn.sigmoid(z), z), lambda z, ct: (ct * jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z)),))

    @jax.custom_vjp
    def softplus(z):
        return jnp.logaddexp(z, 0.0)

    softplus.defvjp(lambda z: (jnp.logaddexp(z, 0.0), z), lambda z, ct: (ct * sigmoid(z),))
    g = lambda p: jnp.sum(softplus(p["u"] @ W) ** 2) + jnp.sum(p["v"] ** 2)
    g_ref = lambda p: jnp.sum(jnp.logaddexp(p["u"] @ W, 0.0) ** 2) + jnp.sum(p["v"] ** 2)
    with pytest.raises(TypeError, match="custom_vjp"):
        hypergrad.hvp(g, x, v, mode="forward_over_reverse")
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(hypergrad.hvp(g, x, v))[0],
        jax.flatten_util.ravel_pytree(hypergrad.hvp(g_ref, x, v))[0],
        rtol=1e-10,
    )
    # the whole estimator goes through the fallbacks too
    mm = lambda p: jnp.sum(p["u"] ** 2)
    res = hypergrad.alpha_hypergradient(g, mm, g_ref, x, 0.5, "cg", operator="damped", damping=1.0)
    res_ref = hypergrad.alpha_hypergradient(g_ref, mm, g_ref, x, 0.5, "cg", operator="damped", damping=1.0)
    assert not bool(res.info["hvp_forward_over_reverse"]) and not bool(res.info["cross_forward_over_reverse"])
    assert bool(res_ref.info["hvp_forward_over_reverse"]) and bool(res_ref.info["cross_forward_over_reverse"])
    np.testing.assert_allclose(res.value, res_ref.value, rtol=1e-8)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_rematerialised_hvps_are_the_dense_hessian_product_and_give_the_same_hypergradient(x64, remat):
    params, cls, mm = mlp_setup()
    a = 0.3
    total = lambda p: losses.total(cls(p), mm(p), a)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = np.asarray(jax.hessian(lambda z: total(unravel(z)))(flat))
    v = jax.tree_util.tree_map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), params)
    ref = H @ np.asarray(jax.flatten_util.ravel_pytree(v)[0])
    for mode in ("forward_over_reverse", "reverse_over_reverse"):
        hv, _ = hypergrad.make_hvp(total, params, mode, remat)
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(hv(v))[0], ref, rtol=1e-10, atol=1e-12)
    base = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", operator="damped", damping=1.0)
    again = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", operator="damped", damping=1.0, hvp_remat=remat)
    np.testing.assert_allclose(again.value, base.value, rtol=1e-10)
    assert int(again.info["iterations"]) == int(base.info["iterations"])
    with pytest.raises(ValueError, match="`hvp_remat` must be one of"):
        hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", hvp_remat="some")


def test_cg_under_jit_equals_eager():
    P = QuadraticBilevel.random(12, seed=0)
    params = P.pack(P.solution(0.3))
    eager = hypergrad.alpha_hypergradient(P.cls_loss, P.mm_loss, P.outer_loss, params, 0.3, "cg")
    jitted = jax.jit(lambda p, a: hypergrad.alpha_hypergradient(P.cls_loss, P.mm_loss, P.outer_loss, p, a, "cg"))(params, 0.3)
    np.testing.assert_allclose(jitted.value, eager.value, rtol=1e-12)
    assert set(jitted.info) == set(eager.info)


def test_nonfinite_is_flagged_never_a_silent_zero():
    P = QuadraticBilevel.random(6, seed=0)
    params = P.pack(P.solution(0.3))
    bad = lambda p: P.outer_loss(p) * jnp.nan
    res = hypergrad.alpha_hypergradient(P.cls_loss, P.mm_loss, bad, params, 0.3, "cg")
    assert not bool(res.info["finite"]) and not bool(res.ok)
    res = hypergrad.alpha_hypergradient(P.cls_loss, P.mm_loss, bad, params, 0.3, "dense")
    assert not bool(res.ok)


def test_bad_input_names_the_argument():
    P = QuadraticBilevel.random(6, seed=0)
    params = P.pack(P.solution(0.3))
    call = lambda **kw: hypergrad.alpha_hypergradient(
        kw.pop("cls", P.cls_loss), kw.pop("mm", P.mm_loss), kw.pop("outer", P.outer_loss),
        kw.pop("params", params), kw.pop("a", 0.3), kw.pop("method", "cg"), **kw,
    )
    with pytest.raises(ValueError, match="known methods: cg, minres, dense, identity, neumann"):
        call(method="newton")
    with pytest.raises(ValueError, match=r"`a` must lie in \[0, 1\]"):
        call(a=1.2)
    with pytest.raises(ValueError, match="`a` must be a scalar or a vector"):
        call(a=jnp.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="`x0`"):
        call(x0={"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"`x0` leaf \['w'\] has shape"):
        call(x0={"w": jnp.zeros(4), "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match="`cls_loss` must return a scalar"):
        call(cls=lambda p: p["w"] ** 2)
    with pytest.raises(ValueError, match="`outer_loss` must return a scalar"):
        call(outer=lambda p: jnp.stack([P.outer_loss(p)] * 2))
    with pytest.raises(ValueError, match="`mm_loss` must return shape"):
        call(a=jnp.full(3, 0.5))
    with pytest.raises(TypeError, match="unknown: \\['num_terms'\\]"):
        call(num_terms=3)
    with pytest.raises(ValueError, match="operator='damped'"):
        call(operator="plain", damping=0.1)
    with pytest.raises(ValueError, match="max_params"):
        call(method="dense", max_params=3)
    with pytest.raises(ValueError, match="sampler"):
        call(method="ghadimi_wang")
    with pytest.raises(TypeError, match="floating point"):
        call(params={"w": jnp.zeros(3, jnp.int32), "b": jnp.zeros(3)})
    with pytest.raises(TypeError, match="`mm_loss` must be a callable"):
        call(mm=3.0)
    with pytest.raises(ValueError, match="`v`"):
        hypergrad.hvp(P.cls_loss, params, {"w": jnp.zeros(3)})


# ----------------------------------------------------------------------------- the training default (issue 13)


def _numpy_normal_solve(cls, mm, outer, params, a, damping):
    """Independent reference: Eq. 3 with v from (H^2 + d I) v = H g solved densely in NumPy."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = np.asarray(jax.hessian(lambda f: losses.total(cls(unravel(f)), mm(unravel(f)), a))(flat))
    g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(outer)(params))[0])
    g_cls = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(cls)(params))[0])
    g_mm = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(mm)(params))[0])
    v = np.linalg.solve(H @ H + damping * np.eye(len(g)), H @ g)
    return -(g_mm - g_cls) @ v, H, v, unravel


@pytest.mark.parametrize("problem", ["quadratic", "mlp"])
def test_default_solve_converges_to_its_stated_system(problem):
    """CG's defaults: the normal equations damped by (0.1 |lambda|_max)^2, solved to the 1e-3 residual."""
    if problem == "quadratic":
        P = QuadraticBilevel.random(12, seed=0, condition=1e3)
        cls, mm, outer, params, a = P.cls_loss, P.mm_loss, P.outer_loss, P.pack(P.solution(0.3)), 0.3
    else:
        params, cls, mm = mlp_setup()
        outer, a = cls, 0.3
    res = hypergrad.alpha_hypergradient(cls, mm, outer, params, a)  # all defaults
    info = res.info
    assert bool(res.ok) and float(info["residual"]) <= 1e-3
    ref, H, v, unravel = _numpy_normal_solve(cls, mm, outer, params, a, float(info["damping"]))
    lam = np.max(np.abs(np.linalg.eigvalsh(H)))
    # the stated system: d = (rho |lambda|_max)^2, |lambda|_max from at most 20 power iterations, stopped when it
    # changes by less than 5 % (a Rayleigh quotient: never above the top |eigenvalue|)
    assert 0.5 * lam <= float(info["lambda_max"]) <= lam * (1 + 1e-5)
    assert 2 <= int(info["power_iterations"]) <= 20
    np.testing.assert_allclose(float(info["damping"]), (0.1 * float(info["lambda_max"])) ** 2, rtol=1e-12)
    # solved to the tolerance: the value is that system's, to the accuracy a 1e-3 residual allows
    cond = (lam**2 + float(info["damping"])) / float(info["damping"])
    assert abs(float(res.value) - ref) <= 1e-3 * cond * abs(ref)
    assert abs(float(res.value) - ref) <= 2e-2 * abs(ref)
    # and `dense` on the same system agrees with the NumPy solve
    dense = hypergrad.alpha_hypergradient(cls, mm, outer, params, a, "dense", operator="normal", damping=float(info["damping"]))
    np.testing.assert_allclose(float(dense.value), ref, rtol=1e-8)
    # the solution it returns (for a warm start) solves that system to the tolerance, checked in NumPy
    got = np.asarray(jax.flatten_util.ravel_pytree(res.solution)[0])
    g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(outer)(params))[0])
    d = float(info["damping"])
    assert np.linalg.norm((H @ H + d * np.eye(len(g))) @ got - H @ g) <= 1.001e-3 * np.linalg.norm(H @ g)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_warm_start_at_the_solution_takes_at_most_one_iteration(method):
    params, cls, mm = mlp_setup()
    a, opts = 0.3, ({"damping_mode": "absolute", "damping": 1e-2, "tol": 1e-6} if method == "cg"
                    else {"damping": 2.0, "tol": 1e-6, "maxiter": 500})
    cold = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, method, **opts)
    assert bool(cold.ok) and int(cold.info["iterations"]) > 5
    if method == "cg":
        _, _, v, unravel = _numpy_normal_solve(cls, mm, cls, params, a, 1e-2)
        exact = unravel(jnp.asarray(v))
    else:
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        H = np.asarray(jax.hessian(lambda f: losses.total(cls(unravel(f)), mm(unravel(f)), a))(flat))
        g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(cls)(params))[0])
        exact = unravel(jnp.asarray(np.linalg.solve(H + 2.0 * np.eye(len(g)), g)))
    warm = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, method, x0=exact, **opts)
    assert bool(warm.ok) and int(warm.info["iterations"]) <= 1
    np.testing.assert_allclose(float(warm.value), float(cold.value), rtol=1e-5)
    # from the last (cold) solution, too
    again = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, method, x0=cold.solution, **opts)
    assert int(again.info["iterations"]) <= 1


def test_an_exhausted_budget_is_reported_not_converged():
    params, cls, mm = mlp_setup()
    res = hypergrad.alpha_hypergradient(cls, mm, cls, params, 0.3, "cg", maxiter=3)
    assert int(res.info["iterations"]) == 3 and not bool(res.info["converged"]) and not bool(res.ok)
    assert float(res.info["residual"]) > 1e-3


def test_power_iteration_warm_start_and_tolerance():
    """A tolerance stops the power iteration on the Rayleigh quotient's change; a warm start from its own last
    iterate stops after two steps with the same |lambda|_max within that tolerance (against eigvalsh)."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    eigs = np.concatenate([np.linspace(-2.0, 3.0, 28), [-4.0, 5.0]])
    A = (q * eigs) @ q.T
    like = {"u": jnp.zeros(12), "w": jnp.zeros((3, 6))}
    flat = lambda t: jnp.concatenate([t["u"], t["w"].ravel()])
    unflat = lambda f: {"u": f[:12], "w": f[12:].reshape(3, 6)}
    matvec = lambda t: unflat(jnp.asarray(A, jnp.float32) @ flat(t))
    key = jax.random.PRNGKey(0)
    fixed, info = hypergrad.power_iteration(matvec, like, key, 7)
    assert int(info["matvecs"]) == 7
    cold, info = hypergrad.power_iteration(matvec, like, key, 1000, tol=1e-6)
    top = np.max(np.abs(np.linalg.eigvalsh(A)))
    assert 2 < int(info["matvecs"]) < 1000 and abs(abs(float(cold)) - top) < 1e-4 * top
    warm, winfo = hypergrad.power_iteration(matvec, like, key, 1000, v0=info["vector"], tol=1e-6)
    assert int(winfo["matvecs"]) == 2 and abs(float(warm) - float(cold)) <= 1e-6 * abs(float(cold)) + 1e-6
    # a zero (or non-finite) start is the cold one
    zero, zinfo = hypergrad.power_iteration(matvec, like, key, 1000, v0=jax.tree_util.tree_map(jnp.zeros_like, like),
                                            tol=1e-6)
    assert float(zero) == float(cold) and int(zinfo["matvecs"]) == int(info["matvecs"])
    # through CG: the carried vector warm-starts the next solve's power iteration
    params, cls, mm = mlp_setup()
    opts = {"power_iters": 200, "power_tol": 1e-3}
    first = hypergrad.alpha_hypergradient(cls, mm, cls, params, 0.3, "cg", **opts)
    second = hypergrad.alpha_hypergradient(cls, mm, cls, params, 0.3, "cg", v0=first.carry["power_vector"], **opts)
    assert int(second.info["power_iterations"]) == 2 < int(first.info["power_iterations"])
    # the HVPs saved are the power iterations saved, give or take the CG iterations (two HVPs each on the normal
    # equations) a slightly different |lambda|_max makes
    saved = int(first.info["hvp_count"]) - int(second.info["hvp_count"])
    cg_change = 2 * (int(first.info["iterations"]) - int(second.info["iterations"]))
    assert saved == int(first.info["power_iterations"]) - 2 + cg_change and abs(cg_change) <= 4
    np.testing.assert_allclose(float(second.info["lambda_max"]), float(first.info["lambda_max"]), rtol=2e-3)
    assert bool(first.ok) and bool(second.ok)
    np.testing.assert_allclose(float(second.value), float(first.value), rtol=1e-2)


def test_cg_top_ritz_value_is_the_krylov_rayleigh_ritz_one():
    """``info["ritz_max"]`` from CG's own coefficients equals the largest eigenvalue of ``A`` projected on the Krylov
    space (numpy: an orthonormal basis of ``[b, A b, ..., A^(k-1) b]`` by QR, float64), stays below ``lambda_max``
    and reaches it; a breakdown's iteration is left out."""
    rng = np.random.default_rng(11)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    eigs = np.concatenate([np.geomspace(1e-2, 2.0, 38), [3.0, 4.0]])
    A = (q * eigs) @ q.T
    b = rng.standard_normal(40)
    with jax.enable_x64(True):
        mv = lambda v: jnp.asarray(A) @ v
        for k in (1, 2, 3, 5, 8):
            _, info = hypergrad.conjugate_gradient(mv, jnp.asarray(b), tol=0.0, maxiter=k)
            basis, _ = np.linalg.qr(np.stack([np.linalg.matrix_power(A, i) @ b for i in range(k)], 1))
            ref = np.linalg.eigvalsh(basis.T @ A @ basis)[-1]
            assert int(info["iterations"]) == k
            np.testing.assert_allclose(float(info["ritz_max"]), ref, rtol=1e-9)
            assert float(info["ritz_max"]) <= 4.0 * (1 + 1e-12)
        _, info = hypergrad.conjugate_gradient(mv, jnp.asarray(b), tol=0.0, maxiter=30)
        np.testing.assert_allclose(float(info["ritz_max"]), 4.0, rtol=1e-8)
        # an indefinite operator breaks down; the Ritz value keeps only the iterations before it
        B = (q * np.concatenate([[-1.0], np.ones(39)])) @ q.T
        _, info = hypergrad.conjugate_gradient(lambda v: jnp.asarray(B) @ v, jnp.asarray(b), tol=0.0, maxiter=30)
        assert bool(info["breakdown"]) and np.isfinite(float(info["ritz_max"])) and float(info["ritz_max"]) <= 1.0 + 1e-9


def test_cg_reuses_a_given_lambda_max_and_returns_the_next_one():
    """The normal system's CG returns ``|lambda|_max`` of H from its top Ritz value (against the dense Hessian's
    eigenvalues); given back as ``lambda_max`` no power iteration runs and the damping is stated with it; a zero
    ``lambda_max`` (none kept) is the power iteration's solve."""
    params, cls, mm = mlp_setup()
    a = 0.3
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda f: losses.total(cls(unravel(f)), mm(unravel(f)), a)))(flat))
    top = np.max(np.abs(np.linalg.eigvalsh(H)))
    opts = {"power_iters": 200, "power_tol": 1e-3, "tol": 1e-5}
    first = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", **opts)
    ritz = float(first.carry["ritz_lambda_max"])
    np.testing.assert_allclose(ritz, top, rtol=1e-3)
    np.testing.assert_allclose(float(first.info["lambda_max"]), top, rtol=1e-2)  # the power iteration's, to 1e-3
    second = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", lambda_max=ritz, **opts)
    assert int(second.info["power_iterations"]) == 0 and float(second.info["lambda_max"]) == pytest.approx(ritz, rel=1e-7)
    np.testing.assert_allclose(float(second.info["damping"]), (0.1 * ritz) ** 2, rtol=1e-6)
    saved = int(first.info["hvp_count"]) - int(second.info["hvp_count"])
    cg_change = 2 * (int(first.info["iterations"]) - int(second.info["iterations"]))
    assert saved == int(first.info["power_iterations"]) + cg_change and abs(cg_change) <= 4
    assert bool(second.ok)
    np.testing.assert_allclose(float(second.value), float(first.value), rtol=1e-2)
    none_kept = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", lambda_max=0.0, **opts)
    assert int(none_kept.info["power_iterations"]) == int(first.info["power_iterations"])
    assert float(none_kept.value) == float(first.value)
    # a solve of a few iterations (here none: a warm start at its own solution) has no Ritz value to hand on
    at_solution = hypergrad.alpha_hypergradient(cls, mm, cls, params, a, "cg", lambda_max=ritz, x0=second.solution,
                                                **opts)
    assert int(at_solution.info["iterations"]) < 5 and np.isnan(float(at_solution.carry["ritz_lambda_max"]))


def test_iterative_refinement_reaches_the_stated_precision_from_a_coarse_operator():
    """CG's iterations on a bfloat16-rounded operator (a reduced precision a CPU does not have) with the residuals
    at float32 (``true_matvec``): each restart is a round of iterative refinement, and the solve meets a tolerance
    the coarse operator alone cannot (against numpy's float64 solve)."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    A = (q * np.geomspace(1e-2, 1.0, 60)) @ q.T
    b = rng.standard_normal(60)
    exact = jnp.asarray(A, jnp.float32)
    coarse = jnp.asarray(A, jnp.bfloat16)
    true_mv = lambda v: exact @ v
    fast_mv = lambda v: (coarse @ v.astype(jnp.bfloat16)).astype(jnp.float32)
    bj = jnp.asarray(b, jnp.float32)
    x_ref = np.linalg.solve(A, b)
    alone, info = hypergrad.conjugate_gradient(fast_mv, bj, tol=1e-5, maxiter=500)
    true_res = np.linalg.norm(b - A @ np.asarray(alone, np.float64)) / np.linalg.norm(b)
    assert true_res > 1e-3  # the coarse operator's own solution is not the stated system's
    x, info = hypergrad.conjugate_gradient(fast_mv, bj, tol=1e-5, maxiter=500, restarts=8, true_matvec=true_mv)
    assert bool(info["converged"]) and float(info["residual"]) <= 1e-5 * 1.001
    np.testing.assert_allclose(float(info["residual"]), np.linalg.norm(b - A @ np.asarray(x, np.float64))
                               / np.linalg.norm(b), rtol=1e-2, atol=1e-7)
    np.testing.assert_allclose(np.asarray(x), x_ref, rtol=0, atol=1e-3 * np.abs(x_ref).max())
    # through CG's option: a refined solve equals the one at the caller's precision within the tolerance
    params, cls, mm = mlp_setup()
    plain = hypergrad.alpha_hypergradient(cls, mm, cls, params, 0.3, "cg", tol=1e-5)
    refined = hypergrad.alpha_hypergradient(cls, mm, cls, params, 0.3, "cg", tol=1e-5, krylov_precision="default")
    assert bool(plain.ok) and bool(refined.ok)
    np.testing.assert_allclose(float(refined.value), float(plain.value), rtol=1e-3)
    with pytest.raises(ValueError, match="krylov_precision"):
        hypergrad.make_method("cg", krylov_precision="float16")
    with pytest.raises(ValueError, match="krylov_precision"):
        hypergrad.make_method("cg", krylov_precision="default", scalar_tol=0.1)
