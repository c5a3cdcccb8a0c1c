"""An epoch with the learned alpha (default CG settings) over an epoch with the heuristic, side by side.

    python -m scripts.bench_alpha_overhead [--config configs/mfeat.py] [--epochs 3]

Both runs train the same config from scratch; the first epoch (compilation) is left out and the
steady epochs' wall times compared. Rows: the default alpha step (CG on the normal equations, 30
iterations = 64 HVPs, inner and outer batch = the train batch), the same with MINRES (one HVP an
iteration), and the alpha step once an epoch on --alpha_batch examples (the authors use 8).
Target <= 1.15. The profile (scripts/bench_alpha_overhead.py's docs in docs/benchmarks.md): the
alpha step is its HVPs; each costs about a train step on these small MLPs.
"""
import json
import os
import tempfile

import jax
from absl import app, flags

from configs import mfeat as mfeat_config
from dyngap_jax.train import train

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 4, "Epochs per run (the first is left out).")
flags.DEFINE_integer("alpha_batch", 8, "Examples in the cheap alpha step's batches.")
flags.DEFINE_string("data_dir", "data/mfeat", "Prepared mfeat records (python -m data_prep.mfeat --out_dir ...).")


def epoch_seconds(method, **alpha):
    cfg = mfeat_config.get_config(method)
    with cfg.unlocked():
        cfg.data_dir = FLAGS.data_dir
        cfg.progress = False
        cfg.train.num_epochs = FLAGS.epochs
        for k, v in alpha.items():
            cfg.alpha[k] = v if k != "hypergrad" else type(cfg.alpha.hypergrad)(v)
    with tempfile.TemporaryDirectory() as d:
        train(cfg, d)
        recs = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if '"split": "train"' in line]
    # steps_per_s covers the train loop of an epoch (train and alpha steps), not evaluation
    steady = recs[1:]
    return sum(r["step"] - p["step"] for r, p in zip(steady, recs)) / sum(
        (r["step"] - p["step"]) / r["steps_per_s"] for r, p in zip(steady, recs)), recs


def main(argv):
    del argv
    base, _ = epoch_seconds("ours_h")
    rows = [("heuristic (ours_h)", base, 1.0)]
    minres = {"method": "minres", "options": {"tol": 1e-3, "maxiter": 30}, "require_converged": False}
    for label, kw in (("learned, alpha step every 7 steps, train batch", {}),
                      ("  same, MINRES 30 iterations (1 HVP each)", {"hypergrad": minres}),
                      ("learned, once an epoch, train batch", {"inner_iters": 0}),
                      (f"learned, every 7 steps, {FLAGS.alpha_batch} examples", {"batch_size": FLAGS.alpha_batch}),
                      (f"learned, once an epoch, {FLAGS.alpha_batch} examples", {"inner_iters": 0,
                                                                                "batch_size": FLAGS.alpha_batch}),
                      ("  same, MINRES 30 iterations", {"inner_iters": 0, "batch_size": FLAGS.alpha_batch,
                                                        "hypergrad": minres}),
                      ("  same, MINRES 10 iterations", {"inner_iters": 0, "batch_size": FLAGS.alpha_batch,
                                                        "hypergrad": {**minres, "options": {"tol": 1e-3, "maxiter": 10}}})):
        rate, _ = epoch_seconds("ours_lb", **kw)
        rows.append((label, rate, base / rate))
    dev = jax.devices()[0]
    print(f"\nmfeat (fou+pix MLPs), {dev.platform}; steady epochs' train-loop throughput (train + alpha steps)")
    print(f"{'run':<50} {'steps/s':>9} {'epoch time / heuristic':>23}")
    for label, rate, ratio in rows:
        print(f"{label:<50} {rate:>9.1f} {ratio:>23.2f}")


if __name__ == "__main__":
    app.run(main)
