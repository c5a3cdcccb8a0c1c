"""What each training method's step costs against concat's, side by side in one run (issue 23).

    python -m scripts.bench_methods                                   # CPU: the CREMA-D pair at 32 px, batch 8
    python -m scripts.bench_methods --size=224 --batch=64 --steps=20  # on a GPU: the paper's frames

The CREMA-D config's model (a ResNet-18 on the spectrogram, one on 3 frames with a temporal mean, concat), each
method by its config name (``configs/cremad.py:<name>``), on the same synthetic batches. Per method: the train
step's time (the median of ``--rounds`` rounds of ``--steps`` steps; the methods take turns within a round so
drift falls on all alike), its compiled FLOPs and XLA's memory estimate (arguments, outputs and temporaries),
each also as a multiple of concat's: the extra forward and backward passes a method makes show in the FLOPs.
"""
from __future__ import annotations

import platform
import time

import jax
import numpy as np
from absl import app, flags

from configs import cremad
from dyngap_jax.train import setup

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", ["concat", "ours_h", "ogm_ge", "agm", "pmr", "gblending", "mla", "mmpareto", "mslr"],
                  "Config names (configs/cremad.py:<name>).")
flags.DEFINE_integer("size", 32, "Spectrogram and frame height and width.")
flags.DEFINE_integer("batch", 8, "Train batch.")
flags.DEFINE_integer("steps", 3, "Timed steps a round.")
flags.DEFINE_integer("rounds", 3, "Rounds (the methods take turns within each).")


# what a method does outside its train step (its parts), which the table does not time
OUTSIDE = {"ours_lb": "the alpha step (a CG solve on Hessian-vector products) every alpha.inner_iters steps",
           "pmr": "before each epoch, an evaluation-mode forward pass over a tenth of the epoch's batches (prototypes)",
           "gblending": "every super_epoch (10) epochs, M + 1 copies trained for super_epoch epochs each: about M + 1 "
                        "times the training on top",
           "mslr": "nothing (the rates move with the validation accuracy the loop computes anyway)"}


def synthetic(classes, size, n, seed):
    rng = np.random.default_rng(seed)
    return {"audio": rng.standard_normal((n, size, size, 1)).astype(np.float32),
            "video": rng.standard_normal((n, 3, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32)}


def prepare(name: str):
    """``(train step, state, batches, flops, bytes)`` of method ``name``, its step compiled."""
    cfg = cremad.get_config(name)
    with cfg.unlocked():
        cfg.train.batch_size = FLAGS.batch
        cfg.data.frames = {}  # the synthetic batches are the model's inputs already
    batches = [synthetic(cfg.model.num_classes, FLAGS.size, FLAGS.batch, s) for s in range(2)]
    run = setup(cfg, data=False, example=batches[0], steps_per_epoch=100)
    state = run.create_train_state()
    step = run.train_step(state, donate=True)
    compiled = step.lower(state, batches[0]).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    nbytes = sum(int(getattr(mem, k, 0)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                    "output_size_in_bytes"))
    return step, state, batches, float(cost.get("flops", float("nan"))), nbytes


def main(argv):
    del argv
    if "concat" not in FLAGS.methods:
        raise app.UsageError("--methods must include concat (every row is a multiple of its)")
    parts = {}
    for name in FLAGS.methods:
        t0 = time.perf_counter()
        parts[name] = list(prepare(name))
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    times = {name: [] for name in parts}
    for r in range(FLAGS.rounds + 1):  # round 0 warms up
        for name, p in parts.items():
            step, state, batches = p[0], p[1], p[2]
            t0 = time.perf_counter()
            for i in range(FLAGS.steps):
                state, metrics = step(state, batches[i % 2])
            jax.block_until_ready(state.params)
            p[1] = state
            if r:
                times[name].append((time.perf_counter() - t0) / FLAGS.steps)
    dev = jax.devices()[0]
    print(f"\n{dev.platform} ({dev.device_kind}; {platform.processor() or platform.machine()}), the CREMA-D pair at "
          f"{FLAGS.size} px, batch {FLAGS.batch}; median of {FLAGS.rounds} rounds of {FLAGS.steps} steps\n")
    base = {"time": np.median(times["concat"]), "flops": parts["concat"][3], "bytes": parts["concat"][4]}
    print("| method | step ms | x concat | GFLOP | x concat | memory MiB (XLA) | x concat |")
    print("|---|---|---|---|---|---|---|")
    for name, p in parts.items():
        t = np.median(times[name])
        print(f"| {name} | {1e3 * t:.1f} | {t / base['time']:.2f} | {p[3] / 1e9:.2f} | {p[3] / base['flops']:.2f} | "
              f"{p[4] / 2**20:.1f} | {p[4] / base['bytes']:.2f} |")
    outside = [f"  {name}: {OUTSIDE[name.partition(':')[0]]}" for name in parts if name.partition(":")[0] in OUTSIDE]
    if outside:
        print("\nwork outside the train step (not in the table):\n" + "\n".join(outside))


if __name__ == "__main__":
    app.run(main)
