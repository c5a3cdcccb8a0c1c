"""Train-step and alpha-step throughput against device count: strong and weak scaling, a table and a PNG.

    python -m scripts.bench_scaling                    # CPU: 4 simulated devices (correctness, not speed)
    python -m scripts.bench_scaling --devices=1,2,4,8  # on a machine with that many accelerators

On CPU the "devices" share the same cores, so the efficiencies say nothing about real scaling;
on GPUs the target is >= 90 % weak-scaling efficiency at 8 devices. The model is the mfeat
configuration (six MLP views) on synthetic inputs, built by ``dyngap_jax.train.setup`` like a run's.
"""
import os
import sys

if "--devices" not in " ".join(sys.argv) or "cpu" in os.environ.get("JAX_PLATFORMS", ""):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import time  # noqa: E402  (jax reads XLA_FLAGS when it is imported)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from configs import mfeat as mfeat_config  # noqa: E402
from dyngap_jax import parallel  # noqa: E402
from dyngap_jax.io import new_figure, save_figure  # noqa: E402
from dyngap_jax.train import setup  # noqa: E402
from scripts import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("devices", None, "Device counts to measure (default 1, 2, 4 up to what there is).")
flags.DEFINE_integer("per_device_batch", 64, "Weak scaling: examples per device.")
flags.DEFINE_integer("global_batch", 256, "Strong scaling: the fixed global batch.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_string("png", "scaling.png", "Where the plot goes.")


def build(n_devices):
    config = mfeat_config.get_config("ours_lb/all")
    with config.unlocked():
        config.parallel.data = n_devices
    rng = np.random.default_rng(0)
    views = {v: config.model.encoders[v].in_features for v in config.model.modalities}

    def batch(n):
        b = {v: rng.standard_normal((n, d)).astype(np.float32) for v, d in views.items()}
        b["label"] = (np.arange(n) % 10).astype(np.int32)
        return b

    run = setup(config, data=False, example=batch(2), steps_per_epoch=10)
    state = run.create_train_state(jax.random.PRNGKey(0))
    state = jax.device_put(state, run.shardings(state)[0])
    train_step, _, alpha_step = run.compile_steps(state, donate=False)
    return run.mesh, state, (train_step, alpha_step), batch


def timed(fn, n):
    out = fn()
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def main(argv):
    del argv
    available = jax.device_count()
    counts = [int(c) for c in FLAGS.devices] if FLAGS.devices else [c for c in (1, 2, 4, 8) if c <= available]
    rows = []
    for n in counts:
        mesh, state, (train_step, alpha_step), batch = build(n)
        for mode, size in (("strong", FLAGS.global_batch), ("weak", FLAGS.per_device_batch * n)):
            b = parallel.shard_batch(batch(size), mesh)
            t_train = timed(lambda: train_step(state, b), FLAGS.steps)
            t_alpha = timed(lambda: alpha_step(state, b, b), max(2, FLAGS.steps // 5))
            rows.append((mode, n, size, size / t_train, size / t_alpha))
    dev = jax.devices()[0]
    print(f"\n{dev.platform} ({dev.device_kind}); {available} devices visible; {os.cpu_count()} CPU cores")
    print(f"{'scaling':<7} {'devices':>7} {'global batch':>12} {'train ex/s':>11} {'eff.':>6} {'alpha ex/s':>11} {'eff.':>6}")
    base = {}
    for mode, n, size, tr, al in rows:
        if n == counts[0]:
            base[mode] = (tr / counts[0], al / counts[0]) if mode == "weak" else (tr, al)
        if mode == "weak":  # ideal: n times the one-device throughput
            eff_t, eff_a = tr / (base[mode][0] * n), al / (base[mode][1] * n)
        else:  # ideal: also n times faster on the same global batch
            eff_t, eff_a = tr / (base[mode][0] * n / counts[0]), al / (base[mode][1] * n / counts[0])
        print(f"{mode:<7} {n:>7} {size:>12} {tr:>11.0f} {eff_t:>6.0%} {al:>11.0f} {eff_a:>6.0%}")
    fig, ax = new_figure(figsize=(5, 3.5))
    for mode in ("strong", "weak"):
        sel = [r for r in rows if r[0] == mode]
        ax.plot([r[1] for r in sel], [r[3] for r in sel], "o-", label=f"train step, {mode}")
        ax.plot([r[1] for r in sel], [r[4] for r in sel], "s--", label=f"alpha step, {mode}")
    ax.set_xlabel("devices")
    ax.set_ylabel("examples / s")
    ax.set_title(f"scaling on {dev.platform}")
    ax.legend(fontsize=7)
    save_figure(fig, FLAGS.png)
    print(f"plot: {FLAGS.png}")


if __name__ == "__main__":
    common.run(main)
