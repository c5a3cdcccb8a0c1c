"""The alpha step's error budget: solver against sampling error, total error against HVPs (issue 25).

    python -m scripts.hypergrad_frontier --config configs/mfeat.py:ours_lb --workdir runs/frontier \\
        --out_dir reports/frontier --points 20,200 [--batch_sizes 8,16,32,64,128,256] [--pairs 4]

At each point (training steps; the run in --workdir is trained up to it, or resumed), the config's
exact alpha step (CG on the normal equations) is measured on --pairs (inner, outer) pairs for each
alpha batch size: stopped after each of --budgets CG iterations and by the config's own rule (primal
estimate, the one training applies), and after each of --corrected_budgets iterations with the
adjoint-corrected estimate. Each is compared with its pair's converged float64 solve (solver error)
and with the large-sample float64 reference, the same system on --reference_inner train examples and
the whole validation split (total error); the pair's converged solve against the reference is the
sampling error. --other_dampings solves the large-sample reference of other relative dampings rho too, to set
the config's damping against: how far the stated system moves the value, beside how far the batch does.
Output: results.md (a table per point), results.json, frontier_step<N>.png.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from dyngap_jax.studies import frontier
from scripts import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "(required) configs/<dataset>.py:<method>.", lock_config=False)
flags.DEFINE_string("workdir", None, "(required) Run folder trained up to each point (resumed if it exists).")
flags.DEFINE_string("out_dir", None, "(required) Where results.md, results.json and the PNGs go.")
flags.DEFINE_list("points", ["20", "200"], "Training steps at which to measure.")
flags.DEFINE_list("batch_sizes", ["8", "16", "32", "64", "128", "256"], "Alpha batch sizes (inner = outer).")
flags.DEFINE_integer("pairs", 4, "Inner/outer pairs per batch size.")
flags.DEFINE_list("budgets", ["3", "10", "30", "100"], "CG iterations of the primal estimate.")
flags.DEFINE_list("corrected_budgets", ["3", "10", "30"], "CG iterations of the adjoint-corrected estimate.")
flags.DEFINE_integer("reference_inner", 1024, "Train examples in the large-sample reference.")
flags.DEFINE_list("other_dampings", [], "Relative dampings rho of other systems: their large-sample value beside "
                  "the config's (how far the stated system moves it).")
flags.mark_flags_as_required(["config", "workdir", "out_dir"])
FLAGS = flags.FLAGS


def _ints(name):
    values = getattr(FLAGS, name) or []
    for v in values:
        if not v.strip().isdigit() or int(v) < 1:
            raise app.UsageError(f"--{name}: positive integers, got {v!r}")
    return tuple(int(v) for v in values)


def _floats(name):
    try:
        return [float(v) for v in getattr(FLAGS, name) or []]
    except ValueError:
        raise app.UsageError(f"--{name}: numbers, got {getattr(FLAGS, name)}") from None


def main(argv):
    del argv
    spec = frontier.FrontierSpec(batch_sizes=_ints("batch_sizes"), pairs=FLAGS.pairs, budgets=_ints("budgets"),
                                 corrected_budgets=_ints("corrected_budgets"), reference_inner=FLAGS.reference_inner,
                                 other_dampings=tuple(_floats("other_dampings")))
    try:
        spec.validate()
    except ValueError as e:
        raise app.UsageError(str(e).replace("frontier: `", "--").replace("`", ""))
    frontier.run_frontier(_CONFIG.value, FLAGS.workdir, FLAGS.out_dir, _ints("points"), spec)
    with open(os.path.join(FLAGS.out_dir, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    common.run(main)
