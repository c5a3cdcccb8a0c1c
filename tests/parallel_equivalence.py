"""Run by tests/test_parallel.py in a subprocess with 4 simulated CPU devices (XLA_FLAGS set before jax loads).

Trains the same tiny config (learned alpha with a CG alpha step each train step) on a 1-device
and a 4-device mesh and prints, as JSON, the largest relative differences of the losses,
validation metrics, alpha and final parameters.
"""
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from tiny_data import tiny_config  # this file's folder is on sys.path: it runs as a script

from data_prep.common import convert
from dyngap_jax.data.records import FeatureSpec
from dyngap_jax.train import Checkpointer, train


def records(folder):
    rng = np.random.default_rng(0)
    ca, cb = rng.standard_normal((3, 6)) * 2.0, rng.standard_normal((3, 5)) * 0.5

    def ex(n, off):
        return [{"a": (ca[(i + off) % 3] + rng.standard_normal(6)).astype(np.float32),
                 "b": (cb[(i + off) % 3] + rng.standard_normal(5)).astype(np.float32),
                 "label": np.int32((i + off) % 3)} for i in range(n)]

    convert(name="tiny", version="1", out_dir=folder, splits={"train": ex(48, 0), "validation": ex(22, 1), "test": ex(21, 2)},
            load=lambda e: e, features={"a": FeatureSpec("float32", [6]), "b": FeatureSpec("float32", [5]),
                                        "label": FeatureSpec("int32", [])}, class_names=["x", "y", "z"], params={})


def main(out_dir, method="ours_lb", dropout=None):
    assert jax.device_count() == 4, jax.devices()
    data = os.path.join(out_dir, "rec")
    records(data)
    results = {}
    for n in (1, 4):
        cfg = tiny_config(data, method, epochs=2)
        with cfg.unlocked():
            if dropout is not None:
                for m in cfg.model.modalities:
                    cfg.model.encoders[m].dropout = dropout
            cfg.parallel = {"data": n, "model": 1}
            cfg.train.eval_batch_size = 10  # uneven last batches exercise the padding
            # a converged, well-conditioned solve: what is compared is the sharding, not CG's float sensitivity
            cfg.alpha.hypergrad.options.update({"operator": "damped", "damping_mode": "absolute",
                                                "damping": float(os.environ.get("EQ_DAMPING", "10.0")),
                                                "tol": 1e-6, "maxiter": 100})
            cfg.alpha.learned.learning_rate = 0.05
        workdir = os.path.join(out_dir, f"run{n}")
        summary = train(cfg, workdir)
        ck = Checkpointer(os.path.join(workdir, "checkpoints"))
        restored = ck.manager.restore(ck.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        params = restored["state"]["params"]
        results[n] = (summary, np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(params)]))

    def rel(a, b):
        a, b = np.asarray(a, float), np.asarray(b, float)
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))

    s1, p1 = results[1]
    s4, p4 = results[4]
    diffs = {
        "train_loss": max(rel(h4["train_loss"], h1["train_loss"]) for h1, h4 in zip(s1["history"], s4["history"])),
        "validation/acc": max(abs(h4["validation/acc"] - h1["validation/acc"]) for h1, h4 in zip(s1["history"], s4["history"])),
        "validation/l_cls": max(rel(h4["validation/l_cls"], h1["validation/l_cls"]) for h1, h4 in zip(s1["history"], s4["history"])),
        "alpha": rel(s4["final_alpha"], s1["final_alpha"]),
        "alpha_moved": abs(float(np.mean(s1["final_alpha"])) - 0.5),
        "params": float(np.max(np.abs(p4 - p1)) / np.max(np.abs(p1))),
    }
    print("RESULT " + json.dumps(diffs))


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3]), *[float(x) for x in sys.argv[3:4]])
