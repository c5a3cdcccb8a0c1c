"""Hessian-vector product cost over one gradient's: time and XLA's memory estimate, both HVP modes and
each rematerialisation policy, side by side.

    python -m scripts.bench_hvp                       # mfeat MLPs and the CREMA-D ResNet18 pair (small batch on CPU)
    python -m scripts.bench_hvp --models=cremad --batch=32 --repeats=0    # memory only (compiles, runs nothing)
    python -m scripts.bench_hvp --models=avmnist --remat=none --repeats=2  # AV-MNIST's narrow ResNet-18 pair

The function is L_total (Eq. 1: cross-entropy + InfoNCE) of the model in training mode, the same
closure the alpha step differentiates. Rows: forward-over-reverse (the default) with
``--remat`` policies (``config.alpha.hypergrad.remat``: none keeps every activation for the
backward pass, dots only matrix products and convolutions, full nothing), reverse-over-reverse,
and the default HVP applied ``--loop`` times inside a ``jax.lax.fori_loop`` (per HVP), as a Krylov
solve applies it: the batch is an argument of every compiled function, never a constant XLA could fold.
Targets: HVP <= 2.5x a gradient's time and <= 2x its memory. Memory is XLA's compiled estimate
(temporaries + arguments + outputs), available on CPU and GPU.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dyngap_jax import losses, models
from dyngap_jax.hypergrad.hvp import hvp_forward_over_reverse, hvp_reverse_over_reverse
from scripts import common

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mfeat", "cremad"], "Which architectures.")
flags.DEFINE_integer("batch", 8, "Batch size (CPU: keep small for cremad).")
flags.DEFINE_integer("repeats", 5, "Timed calls after compilation (0: memory only).")
flags.DEFINE_list("remat", ["none", "dots", "full"], "Rematerialisation policies of the forward-over-reverse rows.")
flags.DEFINE_integer("loop", 4, "HVPs in the while-loop row (0: no such row).")

SPECS = {
    "mfeat": ({"num_classes": 10, "modalities": ["fou", "pix"], "fusion": {"name": "concat"},
               "encoders": {"fou": {"name": "mlp", "hidden": [256], "out_features": 128},
                            "pix": {"name": "mlp", "hidden": [256], "out_features": 128}}},
              {"fou": [76], "pix": [240]}),
    "cremad": ({"num_classes": 6, "modalities": ["audio", "video"], "fusion": {"name": "concat"},
                "encoders": {"audio": {"name": "resnet18", "num_channels": 1},
                             "video": {"name": "video_resnet18", "num_frames": 3}}},
               {"audio": [257, 299, 1], "video": [3, 224, 224, 3]}),
    # configs/avmnist.py's /narrow encoders at the model's input shapes (the image after the 112 px resize)
    "avmnist": ({"num_classes": 10, "modalities": ["audio", "image"], "fusion": {"name": "concat"},
                 "encoders": {m: {"name": "resnet18", "num_channels": 1, "hidden_sizes": [16, 32, 64, 128],
                                  "depths": [1, 1, 1, 1], "embedding_size": 16} for m in ("audio", "image")}},
                {"audio": [129, 101, 1], "image": [112, 112, 1]}),
}


def measure(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    bytes_ = sum(int(getattr(mem, k, 0)) for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"))
    if not FLAGS.repeats:
        return float("nan"), bytes_
    jax.block_until_ready(compiled(*args))
    t0 = time.perf_counter()
    for _ in range(FLAGS.repeats):
        out = compiled(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / FLAGS.repeats, bytes_


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    print(f"{'model':<8} {'params':>10} {'batch':>5} {'grad ms':>9} {'grad MiB':>9}  {'HVP':<26} {'time x':>7} {'memory x':>9}")
    for name in FLAGS.models:
        mcfg, shapes = SPECS[name]
        model, _ = models.build_model(mcfg)
        batch = {m: jnp.asarray(rng.standard_normal([FLAGS.batch] + s), jnp.float32) for m, s in shapes.items()}
        batch["label"] = jnp.asarray(np.arange(FLAGS.batch) % mcfg["num_classes"], jnp.int32)
        variables = models.init_variables(model, jax.random.PRNGKey(0), batch)
        params = variables.pop("params")

        def total(p, batch, variables=variables, model=model, mods=mcfg["modalities"]):
            out = model.apply({"params": p, **variables}, batch, train=True, mutable=list(variables))[0]
            return losses.total(losses.cross_entropy(out["logits"], batch["label"]),
                                losses.modality_matching([out["features"][m] for m in mods], 0.1), 0.5)

        v = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 1e-2), params)
        t_g, m_g = measure(jax.grad(total), params, batch)
        n = sum(x.size for x in jax.tree_util.tree_leaves(params))
        rows = [(f"forward-over-reverse, remat {r}", lambda p, v, b, r=r: hvp_forward_over_reverse(lambda q: total(q, b), p, v, r), 1)
                for r in FLAGS.remat]
        rows.append(("reverse-over-reverse", lambda p, v, b: hvp_reverse_over_reverse(lambda q: total(q, b), p, v), 1))
        if FLAGS.loop:
            def looped(p, v, b):
                hv = lambda u: jax.tree_util.tree_map(lambda x: 1e-3 * x, hvp_forward_over_reverse(lambda q: total(q, b), p, u))
                return jax.lax.fori_loop(0, FLAGS.loop, lambda i, u: hv(u), v)

            rows.append(("in a while loop, per HVP", looped, FLAGS.loop))
        for label, fn, per in rows:
            t, m = measure(fn, params, v, batch)
            t = t / per
            print(f"{name:<8} {n:>10,} {FLAGS.batch:>5} {1e3 * t_g:>9.1f} {m_g / 2**20:>9.1f}  {label:<26} "
                  f"{t / t_g:>7.2f} {m / m_g:>9.2f}", flush=True)
    dev = jax.devices()[0]
    print(f"\n{dev.platform} ({dev.device_kind}), batch {FLAGS.batch}; targets: time <= 2.5x, memory <= 2x a gradient's")


if __name__ == "__main__":
    common.run(main)
