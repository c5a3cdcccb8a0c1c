"""Hessian-vector product cost over one gradient's: time and XLA's memory estimate, both HVP modes, side by side.

    python -m scripts.bench_hvp                       # mfeat MLPs and the CREMA-D ResNet18 pair (small batch on CPU)
    python -m scripts.bench_hvp --models=cremad --batch=32

The function is L_total (Eq. 1: cross-entropy + InfoNCE) of the model in training mode, the same
closure the alpha step differentiates. Targets: HVP <= 2.5x a gradient's time and <= 2x its memory.
Memory is XLA's compiled estimate (temporaries + arguments + outputs), available on CPU and GPU.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dyngap_jax import losses, models
from dyngap_jax.hypergrad.hvp import hvp_forward_over_reverse, hvp_reverse_over_reverse

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mfeat", "cremad"], "Which architectures.")
flags.DEFINE_integer("batch", 8, "Batch size (CPU: keep small for cremad).")
flags.DEFINE_integer("repeats", 5, "Timed calls after compilation.")

SPECS = {
    "mfeat": ({"num_classes": 10, "modalities": ["fou", "pix"], "fusion": {"name": "concat"},
               "encoders": {"fou": {"name": "mlp", "hidden": [256], "out_features": 128},
                            "pix": {"name": "mlp", "hidden": [256], "out_features": 128}}},
              {"fou": [76], "pix": [240]}),
    "cremad": ({"num_classes": 6, "modalities": ["audio", "video"], "fusion": {"name": "concat"},
                "encoders": {"audio": {"name": "resnet18", "num_channels": 1},
                             "video": {"name": "video_resnet18", "num_frames": 3}}},
               {"audio": [257, 299, 1], "video": [3, 224, 224, 3]}),
}


def measure(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    bytes_ = sum(int(getattr(mem, k, 0)) for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"))
    jax.block_until_ready(compiled(*args))
    t0 = time.perf_counter()
    for _ in range(FLAGS.repeats):
        out = compiled(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / FLAGS.repeats, bytes_


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    print(f"{'model':<8} {'params':>10} {'grad ms':>9} {'fwd-rev x':>10} {'rev-rev x':>10} {'grad MiB':>9} "
          f"{'fwd-rev mem x':>14} {'rev-rev mem x':>14}")
    for name in FLAGS.models:
        mcfg, shapes = SPECS[name]
        model, _ = models.build_model(mcfg)
        batch = {m: jnp.asarray(rng.standard_normal([FLAGS.batch] + s), jnp.float32) for m, s in shapes.items()}
        batch["label"] = jnp.asarray(np.arange(FLAGS.batch) % mcfg["num_classes"], jnp.int32)
        variables = models.init_variables(model, jax.random.PRNGKey(0), batch)
        params = variables.pop("params")

        def total(p, batch=batch, variables=variables, model=model, mods=mcfg["modalities"]):
            out = model.apply({"params": p, **variables}, batch, train=True, mutable=list(variables))[0]
            return losses.total(losses.cross_entropy(out["logits"], batch["label"]),
                                losses.modality_matching([out["features"][m] for m in mods], 0.1), 0.5)

        v = jax.tree_util.tree_map(jnp.ones_like, params)
        t_g, m_g = measure(jax.grad(total), params)
        t_f, m_f = measure(lambda p, v: hvp_forward_over_reverse(total, p, v), params, v)
        t_r, m_r = measure(lambda p, v: hvp_reverse_over_reverse(total, p, v), params, v)
        n = sum(x.size for x in jax.tree_util.tree_leaves(params))
        print(f"{name:<8} {n:>10,} {1e3 * t_g:>9.1f} {t_f / t_g:>10.2f} {t_r / t_g:>10.2f} {m_g / 2**20:>9.1f} "
              f"{m_f / m_g:>14.2f} {m_r / m_g:>14.2f}")
    dev = jax.devices()[0]
    print(f"\n{dev.platform} ({dev.device_kind}), batch {FLAGS.batch}; targets: time <= 2.5x, memory <= 2x a gradient's")


if __name__ == "__main__":
    app.run(main)
