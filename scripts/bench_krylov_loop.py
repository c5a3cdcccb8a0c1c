"""A Krylov solve's iterations inside an XLA while loop against the same iterations driven from the host.

    python -m scripts.bench_krylov_loop --solve_cases=mfeat,avmnist --iterations=3

Every solver of the alpha step (CG, the certified CG, the power iteration) runs its iterations in a
``jax.lax.while_loop``. On XLA:CPU the HVP graph runs several times slower inside a while body than
alone (``scripts.bench_hvp``'s loop row); this measures what that costs a solve: the certified CG of
``dyngap_jax.hypergrad.certified`` (primal and dual through one vmapped HVP of the damped normal
operator, ``--iterations`` iterations, no early stop) against the same CG recurrence with one
compiled iteration a call and the loop in Python (the recurrence only: no bound, which costs no HVP).
The batches are arguments of every compiled function, never constants XLA could fold. Prints a
table: compile (with the first call) and the time of one solve, and their ratio.
"""

import jax
import jax.numpy as jnp
from absl import flags

from dyngap_jax import hypergrad
from dyngap_jax.hypergrad.certified import bilinear_cg, column_dots, scale_columns
from dyngap_jax.methods.alpha_step import alpha_losses
from dyngap_jax.train import setup
from scripts import common
from scripts.bench_alpha_overhead import STEPS_PER_EPOCH, case, timed

FLAGS = flags.FLAGS
# (named apart from scripts.bench_alpha_overhead's flags, whose synthetic cases this reuses)
flags.DEFINE_list("solve_cases", ["mfeat", "avmnist"], "mfeat (the MLPs) and/or avmnist (the narrow ResNet-18 pair).")
flags.DEFINE_integer("iterations", 3, "CG iterations a solve (4 HVPs each: primal and dual, two a normal-operator product).")
flags.DEFINE_integer("batch", 8, "Examples in the inner (and outer) batch.")
flags.DEFINE_integer("solve_repeats", 2, "Timed solves after a warm-up (besides the first, timed with its compilation).")

MU = 1e-4  # the absolute damping: its value does not change the cost


def solvers(run, state):
    mm = run.method.mm_loss

    def problem(params, inner):
        cls, mml, out = alpha_losses(run.model, mm, state, inner, inner, False)
        return hypergrad.Problem(cls, mml, out, params, jnp.asarray(0.5), "forward_over_reverse")

    def operator(p):
        hvp = p.hvp()
        return lambda v: jax.tree_util.tree_map(lambda x, y: x + MU * y, hvp(hvp(v)), v)

    @jax.jit
    def in_loop(params, inner):
        p = problem(params, inner)
        return bilinear_cg(operator(p), p.hvp()(p.outer_grad()), p.cross_vectors(), MU, tol=0.0,
                           maxiter=FLAGS.iterations)[1]

    @jax.jit
    def start(params, inner):
        p = problem(params, inner)
        cols = jax.tree_util.tree_map(lambda f, r: jnp.concatenate([f[None], r]), p.hvp()(p.outer_grad()),
                                      p.cross_vectors())
        return jax.tree_util.tree_map(jnp.zeros_like, cols), cols, cols

    @jax.jit
    def iteration(params, inner, X, R, P):
        AP = jax.vmap(operator(problem(params, inner)))(P)
        rr = column_dots(R, R)
        gamma = rr / column_dots(P, AP)
        X = jax.tree_util.tree_map(jnp.add, X, scale_columns(gamma, P))
        R = jax.tree_util.tree_map(jnp.subtract, R, scale_columns(gamma, AP))
        return X, R, jax.tree_util.tree_map(jnp.add, R, scale_columns(column_dots(R, R) / rr, P))

    def host(params, inner):
        X, R, P = start(params, inner)
        for _ in range(FLAGS.iterations):
            X, R, P = iteration(params, inner, X, R, P)
        return X

    return {"while loop (today)": in_loop, "host-driven": host}


def first_and_solve(fn, *args):
    """``(seconds of the first call, with its compilation; seconds a call after it)``."""
    return timed(lambda: fn(*args), 0)[0], timed(lambda: fn(*args), FLAGS.solve_repeats)[0]


def main(argv):
    del argv
    print("| case | params | batch | iterations | solve | compile + first s | solve s | x host-driven |")
    print("|---|---|---|---|---|---|---|---|")
    for name in FLAGS.solve_cases:
        cfg, batch = case(name)
        run = setup(cfg, data=False, example=batch(2, 0), steps_per_epoch=STEPS_PER_EPOCH[name])
        state = run.create_train_state()
        inner = run.prepare_batch(batch(FLAGS.batch, 1))
        n = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
        times = {label: first_and_solve(fn, state.params, inner) for label, fn in solvers(run, state).items()}
        host = times["host-driven"][1]
        for label, (first, solve) in times.items():
            print(f"| {name} | {n:,} | {FLAGS.batch} | {FLAGS.iterations} | {label} | {first:.1f} | {solve:.3f} | "
                  f"{solve / host:.1f} |", flush=True)
    dev = jax.devices()[0]
    print(f"\n{dev.platform} ({dev.device_kind})")


if __name__ == "__main__":
    common.run(main)
