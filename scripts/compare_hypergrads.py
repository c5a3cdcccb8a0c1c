"""Exact against approximate alpha hypergradients at chosen points of training.

    python -m scripts.compare_hypergrads --config configs/mfeat.py:ours_lb --workdir runs/cmp --out_dir cmp \\
        --points 20,100 --batches 4 [--nosweep] [--train_each]

At each point (a number of training steps; the run in --workdir is trained up to it, or resumed),
every method estimates d L_CLS(val) / d alpha on the same inner (train) and outer (validation)
batches. The reference is CG on the normal equations at a tight tolerance in float64 with the
config's damping (see ``dyngap_jax/studies/compare.py`` for why a network's undamped H^-1 g is
ill-posed); where the model is small, ``dense`` solves the same system directly to check it, and the
exact undamped solve shows what the damping changes. Per method: value, relative error, sign
agreement, the rate of sign agreement, mean error and spread over --batches batch pairs, HVPs, run
time, compile time and XLA's memory estimate. --sweep plots error against cost for CG iterations,
Neumann terms and unrolled steps; --train_each trains with several methods and compares final
metrics and alpha trajectories. Output: results.md, results.json and PNGs in --out_dir.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from dyngap_jax.studies import compare
from scripts import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "(required) configs/<dataset>.py:<method>.", lock_config=False)
flags.DEFINE_string("workdir", None, "(required) Run folder trained up to each point (resumed if it exists).")
flags.DEFINE_string("out_dir", None, "(required) Where results.md, results.json and the PNGs go.")
flags.DEFINE_list("points", ["20"], "Training steps at which to compare.")
flags.DEFINE_integer("batches", 3, "Inner/outer batch pairs for the agreement statistics.")
flags.DEFINE_integer("dense_max_params", 3000, "Run `dense` only up to this many parameters.")
flags.DEFINE_enum("reference_dtype", "float64", ["float64", "float32"], "Dtype of the reference and dense solves.")
flags.DEFINE_float("reference_damping", None, "Damping of the reference's normal equations (default: the config's).")
flags.DEFINE_float("reference_tol", 1e-10, "Relative residual the reference CG stops at.")
flags.DEFINE_integer("reference_maxiter", 10_000, "Iterations the reference CG may take.")
flags.DEFINE_list("methods", None, "Approximations to compare (default all): " + ", ".join(compare.APPROXIMATIONS))
flags.DEFINE_bool("sweep", True, "Error against cost for CG iterations, Neumann terms, unrolled steps.")
flags.DEFINE_bool("train_each", False, "Also train with each of several methods and compare the runs.")
flags.mark_flags_as_required(["config", "workdir", "out_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    points = []
    for p in FLAGS.points:
        if not p.strip().isdigit() or int(p) < 1:
            raise app.UsageError(f"--points: training steps must be positive integers, got {p!r}")
        points.append(int(p))
    reference = compare.Reference(damping=FLAGS.reference_damping, tol=FLAGS.reference_tol,
                                  maxiter=FLAGS.reference_maxiter, dtype=FLAGS.reference_dtype)
    compare.run_comparison(_CONFIG.value, FLAGS.workdir, FLAGS.out_dir, points, batches=FLAGS.batches,
                           reference=reference, dense_max_params=FLAGS.dense_max_params,
                           sweep_budgets=compare.SWEEP_BUDGETS if FLAGS.sweep else None, train_methods=FLAGS.train_each,
                           methods=FLAGS.methods)
    with open(os.path.join(FLAGS.out_dir, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    common.run(main)
