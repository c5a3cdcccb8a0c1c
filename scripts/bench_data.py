"""Loader throughput per data set next to what a training step consumes, measured side by side.

For each data set, synthetic records with the real record shapes (what its converter writes)
are written to a temporary folder; the grain training loader (shuffle, decode, frame
augmentation, batching) is timed over them, and so is a jit-compiled training step of the
paper's architecture for that data set (forward + backward of L_total = (1-a) CE + a InfoNCE and
an SGD update) on the same machine. The ratio loader / step is the headroom (target >= 5x).

    python -m scripts.bench_data                      # every data set
    python -m scripts.bench_data --datasets=cremad,mfeat --workers=2
"""
from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from dyngap_jax import losses, models
from dyngap_jax.data import loader, records

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["mfeat", "cremad", "kinetics_sounds", "sarcasm", "twitter2015", "nvgesture"], "Which.")
flags.DEFINE_integer("examples", 96, "Synthetic records per data set.")
flags.DEFINE_integer("workers", 0, "grain worker processes for the loader.")
flags.DEFINE_integer("step_batch", 4, "Batch size of the timed training step (CPU: keep small).")
flags.DEFINE_integer("steps", 3, "Timed training steps after compilation.")

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def spec(dataset):
    """(record features, frame modalities, model config, loader batch) per data set, as the converters write them."""
    av = lambda audio_frames: (
        {"audio": ("float32", [257, audio_frames, 1]), "video": ("uint8", [3, 224, 224, 3])},
        {"video": loader.FrameAugment(size=(224, 224))},
        {"num_classes": 31 if audio_frames == 1004 else 6, "modalities": ["audio", "video"],
         "encoders": {"audio": {"name": "resnet18", "num_channels": 1},
                      "video": {"name": "video_resnet18", "num_frames": 3}},
         "fusion": {"name": "concat"}},
    )
    ti = lambda classes: (
        {"image": ("uint8", [224, 224, 3]), "text": ("int32", [128]), "text_mask": ("int32", [128])},
        {"image": loader.FrameAugment(size=(224, 224))},
        {"num_classes": classes, "modalities": ["image", "text"], "projection_dim": 256,
         "encoders": {"image": {"name": "resnet50"}, "text": {"name": "bert", "max_length": 128, **BERT_BASE}},
         "fusion": {"name": "concat"}},
    )
    table = {
        "mfeat": ({v: ("float32", [d]) for v, d in (("fou", 76), ("fac", 216), ("kar", 64), ("pix", 240), ("zer", 47), ("mor", 6))},
                  {}, {"num_classes": 10, "modalities": ["fou", "fac", "kar", "pix", "zer", "mor"],
                       "encoders": {v: {"name": "mlp", "hidden": [256], "out_features": 128}
                                    for v in ("fou", "fac", "kar", "pix", "zer", "mor")},
                       "fusion": {"name": "concat"}}),
        "cremad": av(299),
        "kinetics_sounds": av(1004),
        "sarcasm": ti(2),
        "twitter2015": ti(3),
        "nvgesture": ({"rgb": ("uint8", [8, 112, 112, 3]), "depth": ("uint8", [8, 112, 112, 1]),
                       "flow": ("float32", [8, 112, 112, 2])},
                      {m: loader.FrameAugment(size=(112, 112), normalize=(m == "rgb")) for m in ("rgb", "depth", "flow")},
                      {"num_classes": 25, "modalities": ["rgb", "depth", "flow"],
                       "encoders": {m: {"name": "video_resnet18", "num_frames": 8, "num_channels": c}
                                    for m, c in (("rgb", 3), ("depth", 1), ("flow", 2))},
                       "fusion": {"name": "concat"}}),
    }
    return table[dataset]


def write_synthetic(folder, name, feats, n, num_classes):
    rng = np.random.default_rng(0)

    def example(i):
        ex = {}
        for k, (dtype, shape) in feats.items():
            if dtype == "uint8":
                ex[k] = rng.integers(0, 256, shape, np.uint8)
            elif dtype == "int32":
                ex[k] = rng.integers(0, 1000, shape).astype(np.int32)
            else:
                ex[k] = rng.standard_normal(shape).astype(np.float32)
        ex["label"] = np.int32(i % num_classes)
        return ex

    file = records.shard_names("train", 1)[0]
    count, digest = records.write_shard(os.path.join(folder, file), (example(i) for i in range(n)))
    features = {k: records.FeatureSpec(d, s) for k, (d, s) in feats.items()}
    features["label"] = records.FeatureSpec("int32", [])
    records.Manifest(name=name, converter_version="bench", features=features,
                     class_names=[str(i) for i in range(num_classes)],
                     splits={"train": {"num_examples": count, "shards": [{"file": file, "num_examples": count,
                                                                           "sha256": digest}]}}).save(folder)


def loader_rate(folder, frames, batch, workers):
    ld = loader.make_loader(folder, "train", batch_size=batch, train=True, seed=0, frames=frames, worker_count=workers,
                            num_epochs=None)  # small tabular splits take the in-memory path, as in training
    it = iter(ld)
    next(it)  # start-up (worker spawn) is not throughput
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:
        n += len(next(it)["label"])
    return n / (time.perf_counter() - t0)


def step_rate(model_cfg, feats, batch, steps):
    model, _ = models.build_model(model_cfg)
    rng = np.random.default_rng(0)
    ex = {}
    for k, (dtype, shape) in feats.items():
        if k.endswith("_mask"):
            ex[k] = np.ones([batch] + shape, np.int32)
        elif dtype == "int32":
            ex[k] = rng.integers(1, 1000, [batch] + shape).astype(np.int32)
        else:
            ex[k] = rng.standard_normal([batch] + shape).astype(np.float32)
    labels = jnp.asarray(np.arange(batch) % model_cfg["num_classes"], jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), ex, train=False)
    params, state = variables["params"], {k: v for k, v in variables.items() if k not in ("params", "perturbations")}
    tx = optax.sgd(1e-2, momentum=0.9)
    opt_state = tx.init(params)
    mods = model_cfg["modalities"]

    @jax.jit
    def step(params, state, opt_state, batch, a):
        def loss_fn(p):
            out, new_state = model.apply({"params": p, **state}, batch, train=True, mutable=list(state),
                                         rngs={"dropout": jax.random.PRNGKey(1)})
            l_cls = losses.cross_entropy(out["logits"], labels)
            l_mm = losses.modality_matching([out["features"][m] for m in mods], 0.1)
            return losses.total(l_cls, l_mm, a), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    t0 = time.perf_counter()
    params, state, opt_state, loss = jax.block_until_ready(step(params, state, opt_state, ex, 0.5))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        params, state, opt_state, loss = step(params, state, opt_state, ex, 0.5)
    jax.block_until_ready(loss)
    return steps * batch / (time.perf_counter() - t0), compile_s


def main(argv):
    del argv
    rows = []
    for name in FLAGS.datasets:
        feats, frames, model_cfg = spec(name)
        with tempfile.TemporaryDirectory() as folder:
            write_synthetic(folder, name, feats, FLAGS.examples, model_cfg["num_classes"])
            # tabular views are cheap per example: time them at a realistic batch
            batch = 64 if name == "mfeat" else FLAGS.step_batch
            load = loader_rate(folder, frames, max(batch, 16), FLAGS.workers)
        consume, compile_s = step_rate(model_cfg, feats, batch, FLAGS.steps)
        rows.append((name, load, consume, load / consume, compile_s))
        print(f"  measured {name}", flush=True)
    dev = jax.devices()[0]
    print(f"\ndevice: {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU cores, loader workers: {FLAGS.workers}")
    print(f"{'data set':<16} {'loader ex/s':>12} {'train step ex/s':>16} {'ratio':>8} {'step compile s':>15}")
    for name, load, consume, ratio, compile_s in rows:
        flag = "" if ratio >= 5 else "  < 5x target"
        print(f"{name:<16} {load:>12.1f} {consume:>16.2f} {ratio:>8.1f} {compile_s:>15.1f}{flag}")


if __name__ == "__main__":
    app.run(main)
