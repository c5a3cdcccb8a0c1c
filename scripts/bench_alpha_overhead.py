"""What the exact alpha step costs: its time in train steps and the epoch time it adds, cold and warm.

    python -m scripts.bench_alpha_overhead --cases=mfeat                     # CPU: mfeat (~10 min)
    python -m scripts.bench_alpha_overhead --cases=cremad --av_size=16 --alpha_repeats=0 --trained_steps=100
                                             # CPU: does the default converge at the CREMA-D architecture (~1 h)
    python -m scripts.bench_alpha_overhead --cases=cremad --av_size=224 --av_batch=64    # on a GPU: the paper's shapes
    python -m scripts.bench_alpha_overhead --cases=cremad --av_size=224 --av_batch=64 --precisions=highest,refined \
        --frontier=False                     # on a GPU: the refined step (CG's iterations at TF32) beside highest
    python -m scripts.bench_alpha_overhead --cases=avmnist --points=initialisation --alpha_repeats=0 --repeats=1
                                             # CPU: the exact step at AV-MNIST's narrow variant, as it is today
    python -m scripts.bench_alpha_overhead --cases=avmnist --points=initialisation --config_batch=False \
        --alpha_repeats=2 --repeats=1 --frontier=False --programs --nocompilation_cache
                                             # CPU: what each of its programs costs to compile (~2 min)

For each case the config's ``ours_lb`` (the training default: CG on the normal equations damped by
``(0.1 |lambda|_max)^2``, solved to the 1e-3 relative residual, warm start available) runs on synthetic
batches with a class signal, at initialisation and after ``--trained_steps`` train steps:

* the train step's time (batch ``B``), and the alpha step's on 8 + 8 examples (the authors' setting)
  and on the config's alpha batch, cold (started at 0) and warm (started from the solution of the
  previous alpha step, on other batches, as training does); iterations, HVPs, converged;
* the alpha step's compile time (``--programs``: each program of a host-driven step, the CPU's, with
  its convolutions and compile time);
* the epoch time over the heuristic's (which has no alpha step), from the measured step times:
  ``(S t_train + k t_alpha) / (S t_train)`` with ``S`` steps an epoch (mfeat 21 of 64; CREMA-D 105
  of 64) and ``k`` alpha steps (once an epoch, or the config's ``inner_iters``); data loading and
  evaluation, the same for both, are left out.

``--frontier`` adds, for mfeat, the iteration budget against the relative error to the float64
reference of the same system (and the overhead it costs), with the default and the pre-issue-13
truncated default on it, and the relative damping rho of the stated system against the iterations
it takes and the value it gives. Targets on a GPU: <= 1.15x the heuristic's epoch at CREMA-D shapes once an
epoch, compiling in under 30 s.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import flags

from configs import avmnist, cremad, mfeat
from dyngap_jax.studies.estimator import Estimator, relative_error
from dyngap_jax.train import setup
from scripts import common

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["mfeat", "cremad"], "mfeat (fou+pix MLPs), cremad (ResNet18 audio + video) and/or avmnist "
                  "(the narrow ResNet-18 pair at AV-MNIST's shapes: 129 x 101 spectrogram, 112 px image, batch 64).")
flags.DEFINE_list("points", ["initialisation", "after training"], "Where the alpha step is measured.")
flags.DEFINE_bool("config_batch", True, "Also measure at the config's alpha batch (besides the authors' 8 + 8).")
flags.DEFINE_integer("trained_steps", 40, "Train steps before the 'after training' point.")
flags.DEFINE_integer("repeats", 2, "Timed train steps and alpha steps per measurement (after a warm-up).")
flags.DEFINE_integer("alpha_repeats", 1, "Timed alpha steps per measurement (after a warm-up); 0: one call, "
                     "no warm-up (the alpha step is compiled ahead; for convergence at CREMA-D shapes on a CPU).")
flags.DEFINE_integer("av_size", 64, "CREMA-D case: spectrogram and frame height/width (the paper: 257x299, 224).")
flags.DEFINE_integer("av_batch", 8, "CREMA-D case: the train batch (the paper: 64; CPU: keep small).")
flags.DEFINE_bool("frontier", True, "mfeat: error against the float64 reference over iteration budgets.")
flags.DEFINE_bool("programs", False, "List each program of a host-driven alpha step with its compile time.")
flags.DEFINE_list("precisions", ["config"], "alpha.hypergrad.precision of the measured alpha steps, side by side "
                  "(config: the case's; e.g. highest,refined on a GPU: refined runs CG's iterations at TF32).")

STEPS_PER_EPOCH = {"mfeat": 21, "cremad": 105, "avmnist": 38}


def case(name: str):
    """``(config, batch(n, seed))`` of a case, batches with a class signal so that training learns."""
    if name == "mfeat":
        cfg, shapes, batch_size = mfeat.get_config("ours_lb"), {"fou": (76,), "pix": (240,)}, 64
    elif name == "avmnist":  # the model's inputs: the image after the frames path's resize to 112 px
        cfg, shapes, batch_size = avmnist.get_config("ours_lb/narrow"), {"audio": (129, 101, 1), "image": (112, 112, 1)}, 64
    else:
        cfg, s = cremad.get_config("ours_lb"), FLAGS.av_size
        shapes, batch_size = {"audio": (s, s, 1), "video": (3, s, s, 3)}, FLAGS.av_batch
    with cfg.unlocked():
        cfg.train.batch_size = batch_size
        cfg.data.frames = {}  # the synthetic batches below are the model's inputs already (no crop, no resize)
    classes = cfg.model.num_classes
    centres = {m: np.random.default_rng(1).standard_normal((classes,) + shape).astype(np.float32) for m, shape in shapes.items()}

    def batch(n, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, classes, n).astype(np.int32)
        b = {m: (0.5 * centres[m][y] + rng.standard_normal((n,) + shape)).astype(np.float32) for m, shape in shapes.items()}
        return {**b, "label": y}

    return cfg, batch


def timed(fn, repeats):
    """``(seconds a call, output)``: the mean of ``repeats`` calls after a warm-up; ``repeats=0``: one call, timed."""
    if repeats == 0:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        return time.perf_counter() - t0, out
    out = jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / repeats, out


def measure(name: str, precision: str = "config") -> list[dict]:
    cfg, batch = case(name)
    with cfg.unlocked():
        cfg.alpha.hypergrad.warm_start = True  # measured against cold starts below
        if precision != "config":
            cfg.alpha.hypergrad.precision = precision
    run = setup(cfg, data=False, example=batch(2, 0), steps_per_epoch=STEPS_PER_EPOCH[name])
    B = run.batch.train
    state = run.create_train_state(jax.random.PRNGKey(0))
    state = jax.device_put(state, run.shardings(state)[0])
    train_step, _, alpha_step = run.compile_steps(state, donate=False)
    inner_iters = run.cfg.alpha.inner_iters
    k_default = run.steps_per_epoch // inner_iters if inner_iters else 1
    rows, seed = [], 100
    compile_s = {}
    earlier = None
    for point in FLAGS.points:
        if point == "after training":
            for i in range(FLAGS.trained_steps):
                if i == FLAGS.trained_steps - 7:
                    earlier = state  # 7 train steps before: where the alpha step before this one ran (mfeat)
                state, _ = train_step(state, batch(B, i))
        t_train, _ = timed(lambda: train_step(state, batch(B, 0)), FLAGS.repeats)
        sizes = [(8, "8 + 8")] + ([(run.batch.alpha, f"{run.batch.alpha} + {run.batch.alpha} (config)")]
                                  if run.batch.alpha != 8 and FLAGS.config_batch else [])
        for n, label in sizes:
            if n not in compile_s:
                t0 = time.perf_counter()
                lowered = alpha_step.lower(state, batch(n, 1), batch(n, 2))
                traced_s = time.perf_counter() - t0
                if FLAGS.programs and hasattr(lowered, "labels"):  # host-driven: each program timed
                    for what, program in zip(lowered.labels, lowered.programs):
                        t1 = time.perf_counter()
                        program.compile()
                        rows.append({"case": "programs", "label": f"{name}, {n} + {n}: {what}",
                                     "convolutions": program.as_text().count("stablehlo.convolution"),
                                     "seconds": time.perf_counter() - t1})
                    rows.append({"case": "programs", "label": f"{name}, {n} + {n}: tracing and lowering",
                                 "convolutions": 0, "seconds": traced_s})
                else:
                    lowered.compile()
                compile_s[n] = time.perf_counter() - t0
            zeros = jax.tree_util.tree_map(np.zeros_like, state.alpha_solution)
            cold_state = state.replace(alpha_solution=zeros)
            # warm: from the solution of the alpha step before, on other batches (what training passes on)
            prev, _, _ = alpha_step(cold_state, batch(n, seed + 1), batch(n, seed + 2))
            seed += 10
            inner, outer = batch(n, seed), batch(n, seed + 1)
            starts = [("cold", cold_state), ("warm", state.replace(alpha_solution=prev.alpha_solution))]
            if earlier is not None:  # warm, same batches 7 train steps before (a fixed alpha batch, as the authors')
                same, _, _ = alpha_step(earlier.replace(alpha_solution=zeros), inner, outer)
                starts.append(("warm, same batches", state.replace(alpha_solution=same.alpha_solution)))
            for start, st in starts:
                t_alpha, (_, res, applied) = timed(lambda: alpha_step(st, inner, outer), FLAGS.alpha_repeats)
                info = jax.device_get(res.info)
                k = k_default if n == run.batch.alpha else 1
                rows.append({"case": name, "precision": cfg.alpha.hypergrad.precision, "point": point, "alpha batch": label, "start": start,
                             "converged": bool(info["converged"]), "iterations": int(info["iterations"]),
                             "HVPs": int(info["hvp_count"]), "residual": float(info["residual"]),
                             "alpha step s": t_alpha, "train steps": t_alpha / t_train, "k": k,
                             "epoch ratio": 1 + k * t_alpha / (run.steps_per_epoch * t_train),
                             "compile s": compile_s[n], "train step s": t_train})
    if name == "mfeat" and FLAGS.frontier and precision == FLAGS.precisions[0]:
        rows += frontier(run, state, batch, t_train)
    return rows


def frontier(run, state, batch, t_train) -> list[dict]:
    """The default system solved with growing budgets: relative error to its float64 solution, and cost."""
    method, mm_loss = run.method.estimator, run.method.mm_loss
    inner, outer = batch(8, 7), batch(8, 8)
    config = Estimator(run.model, mm_loss, state, "cg", method.options())(inner, outer)
    d = config["info"]["damping"]
    ref = Estimator(run.model, mm_loss, state, "cg", {"operator": "normal", "damping_mode": "absolute",
                                                          "tol": 1e-10, "maxiter": 20000, "restarts": 3}, "float64")
    reference = ref(inner, outer, dynamic={"damping": d})
    out = []
    budget = Estimator(run.model, mm_loss, state, "cg", {**method.options(), "damping_mode": "absolute", "tol": 0.0})
    for maxiter in (3, 10, 30, 100, 300, 1000):
        r = budget(inner, outer, repeats=FLAGS.repeats, dynamic={"damping": d, "maxiter": np.int32(maxiter)})
        out.append({"case": "mfeat frontier", "budget": f"{maxiter} iterations", "residual": r["info"]["residual"],
                    "HVPs": int(r["info"]["hvp_count"]), "rel. error": relative_error(r["value"], reference["value"]),
                    "epoch ratio": 1 + r["run_s"] / (run.steps_per_epoch * t_train)})
    out.append({"case": "mfeat frontier", "budget": f"default (tol 1e-3): {config['info']['iterations']:.0f} iterations",
                "residual": config["info"]["residual"], "HVPs": int(config["info"]["hvp_count"]),
                "rel. error": relative_error(config["value"], reference["value"]),
                "epoch ratio": 1 + config["run_s"] / (run.steps_per_epoch * t_train)})
    # the system: the relative damping rho, d = (rho |lambda|_max)^2, each solved to 1e-3 and in float64
    for rho in (0.1, 0.03, 0.01, 0.003):
        r = Estimator(run.model, mm_loss, state, "cg", {**method.options(), "damping": rho})(inner, outer)
        rho_ref = ref(inner, outer, dynamic={"damping": r["info"]["damping"]})
        out.append({"case": "mfeat damping", "rho": rho, "iterations": int(r["info"]["iterations"]),
                    "converged": r["ok"], "rel. error": relative_error(r["value"], rho_ref["value"]),
                    "value": float(np.mean(rho_ref["value"])), "reference iterations": int(rho_ref["info"]["iterations"])})
    old = Estimator(run.model, mm_loss, state, "cg", {"operator": "normal", "damping": 1e-4,
                                                          "damping_mode": "absolute", "tol": 1e-3, "maxiter": 30})
    o = old(inner, outer, repeats=FLAGS.repeats)
    old_ref = ref(inner, outer, dynamic={"damping": 1e-4})
    out.append({"case": "mfeat frontier", "budget": "pre-issue-13 default: d 1e-4, 30 iterations",
                "residual": o["info"]["residual"], "HVPs": int(o["info"]["hvp_count"]),
                "rel. error": relative_error(o["value"], old_ref["value"]),
                "epoch ratio": 1 + o["run_s"] / (run.steps_per_epoch * t_train)})
    return out


def main(argv):
    del argv
    rows = []
    unknown = sorted(set(FLAGS.points) - {"initialisation", "after training"})
    if unknown:
        raise SystemExit(f"--points: {unknown} are not 'initialisation' or 'after training'")
    for name in FLAGS.cases:
        for precision in FLAGS.precisions:
            rows += measure(name, precision)
    dev = jax.devices()[0]
    print(f"\n{dev.platform} ({dev.device_kind}); CREMA-D case at {FLAGS.av_size} px, batch {FLAGS.av_batch}; "
          f"epoch ratio = (S train steps + k alpha steps) / S train steps, S = {STEPS_PER_EPOCH}")
    head = (f"{'case':<7} {'precision':<9} {'point':<15} {'alpha batch':<16} {'start':<18} {'conv.':<5} {'iter.':>6} {'HVPs':>6} "
            f"{'residual':>9} {'alpha s':>8} {'x train step':>12} {'k':>3} {'epoch ratio':>11} {'compile s':>9}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "point" in r:
            print(f"{r['case']:<7} {r['precision']:<9} {r['point']:<15} {r['alpha batch']:<16} {r['start']:<18} {str(r['converged']):<5} "
                  f"{r['iterations']:>6} {r['HVPs']:>6} {r['residual']:>9.2e} {r['alpha step s']:>8.3f} "
                  f"{r['train steps']:>12.1f} {r['k']:>3} {r['epoch ratio']:>11.2f} {r['compile s']:>9.1f}")
    section(rows, "mfeat damping", "mfeat, 8 + 8 examples after training: the relative damping rho of the stated "
            "system, each solved to 1e-3 (float32) and to 1e-10 (float64)",
            lambda r: f"rho {r['rho']:<6g} iterations {r['iterations']:>5}  converged {str(r['converged']):<5}  rel. "
                      f"error to float64 {r['rel. error']:>9.2e}  value {r['value']:+.5f}  "
                      f"(float64: {r['reference iterations']} iterations)")
    section(rows, "programs", "the alpha step's programs (host-driven loops): compile time, in the order they run",
            lambda r: f"{r['label']:<60} convolutions {r['convolutions']:>5}  {r['seconds']:>6.1f} s")
    section(rows, "mfeat frontier", "mfeat, 8 + 8 examples after training: iteration budget against the error to the "
            "float64 solution of the same system (epoch ratio once an epoch)",
            lambda r: f"{r['budget']:<46} residual {r['residual']:>9.2e}  HVPs {r['HVPs']:>6}  rel. error "
                      f"{r['rel. error']:>9.2e}  epoch ratio {r['epoch ratio']:.2f}")


def section(rows, case_name, title, line):
    """Print the rows of ``case_name`` under ``title``, one ``line(row)`` each (nothing when there are none)."""
    chosen = [r for r in rows if r["case"] == case_name]
    if chosen:
        print("\n" + title)
        for r in chosen:
            print("  " + line(r))

if __name__ == "__main__":
    common.run(main)
