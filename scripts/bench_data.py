"""Loader throughput per worker process, per data set, beside what a training step consumes and what the
device's frame augmentation costs in it, measured side by side.

For each data set, synthetic records of the real record shapes (what its converter writes) go to a
temporary folder. Timed there:

* the training loader (grain: shuffle, decode, draw each example's crop box and flip, batch), with
  ``--workers`` worker processes (0: in the training process), as examples/s and examples/s per
  process;
* the same loader with the host path it replaced (PIL's random resized crop, example by example and
  channel by channel, then normalisation: what ``dyngap_jax/data/loader.py`` did before the
  augmentation moved to the device), for the ratio new / old;
* the jit-compiled training step of the data set's architecture (forward + backward of Eq. 1 and an
  SGD update) on the loader's batches, and the same step on batches prepared beforehand: the
  difference is the share of the step that the crop, resize, flip and normalisation take on the
  device ("augment in step"; target < 10 %), beside the preparation compiled and timed alone
  ("augment alone", over the step's time).

    python -m scripts.bench_data                                   # every data set
    python -m scripts.bench_data --datasets=cremad,kinetics_sounds --workers=0,2

Targets (issue 15): per process >= 5x the old host path for CREMA-D and Kinetics-Sounds, and enough
that 16 processes feed twice an H100's train step (1,627 ex/s CREMA-D, 781 Kinetics-Sounds, batch 64).
"""
from __future__ import annotations

import os
import tempfile
import time

import grain
import jax
import numpy as np
from absl import flags

from dyngap_jax.data import augment, loader, records
from dyngap_jax.train import base_config, make_train_step, setup
from scripts import common

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["mfeat", "cremad", "kinetics_sounds", "sarcasm", "twitter2015", "nvgesture"], "Which.")
flags.DEFINE_integer("examples", 192, "Synthetic records per data set.")
flags.DEFINE_list("workers", ["0"], "grain worker processes of the loader (each value timed).")
flags.DEFINE_integer("loader_batch", 64, "Loader batch size (the H100 figures are at 64).")
flags.DEFINE_float("seconds", 3.0, "Seconds each loader is timed for.")
flags.DEFINE_integer("step_batch", 4, "Batch size of the timed training step (CPU: keep small).")
flags.DEFINE_integer("steps", 3, "Timed training steps after compilation.")
flags.DEFINE_bool("legacy", True, "Also time the old host path (PIL crops in the loader).")

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
H100_STEP = {"cremad": 1627, "kinetics_sounds": 781}  # ex/s of the train step at batch 64 (the figures)


def spec(dataset):
    """(record features, frame modalities, model config) per data set, as the converters write them."""
    av = lambda audio_frames: (
        {"audio": ("float32", [257, audio_frames, 1]), "video": ("uint8", [3, 224, 224, 3])},
        {"video": augment.FrameAugment(size=(224, 224))},
        {"num_classes": 31 if audio_frames == 1004 else 6, "modalities": ["audio", "video"],
         "encoders": {"audio": {"name": "resnet18", "num_channels": 1},
                      "video": {"name": "video_resnet18", "num_frames": 3}},
         "fusion": {"name": "concat"}},
    )
    ti = lambda classes: (
        {"image": ("uint8", [224, 224, 3]), "text": ("int32", [128]), "text_mask": ("int32", [128])},
        {"image": augment.FrameAugment(size=(224, 224))},
        {"num_classes": classes, "modalities": ["image", "text"], "projection_dim": 256,
         "encoders": {"image": {"name": "resnet50"}, "text": {"name": "bert", "max_length": 128, **BERT_BASE}},
         "fusion": {"name": "concat"}},
    )
    views = (("fou", 76), ("fac", 216), ("kar", 64), ("pix", 240), ("zer", 47), ("mor", 6))
    table = {
        "mfeat": ({v: ("float32", [d]) for v, d in views}, {},
                  {"num_classes": 10, "modalities": [v for v, _ in views],
                   "encoders": {v: {"name": "mlp", "hidden": [256], "out_features": 128, "in_features": d} for v, d in views},
                   "fusion": {"name": "concat"}}),
        "cremad": av(299),
        "kinetics_sounds": av(1004),
        "sarcasm": ti(2),
        "twitter2015": ti(3),
        "nvgesture": ({"rgb": ("uint8", [8, 112, 112, 3]), "depth": ("uint8", [8, 112, 112, 1]),
                       "flow": ("float32", [8, 112, 112, 2])},
                      {m: augment.FrameAugment(size=(112, 112), normalize=(m == "rgb")) for m in ("rgb", "depth", "flow")},
                      {"num_classes": 25, "modalities": ["rgb", "depth", "flow"],
                       "encoders": {m: {"name": "video_resnet18", "num_frames": 8, "num_channels": c}
                                    for m, c in (("rgb", 3), ("depth", 1), ("flow", 2))},
                       "fusion": {"name": "concat"}}),
    }
    return table[dataset]


def synthetic_example(feats, rng, label):
    ex = {}
    for k, (dtype, shape) in feats.items():
        if k.endswith("_mask"):
            ex[k] = np.ones(shape, np.int32)
        elif dtype == "uint8":
            ex[k] = rng.integers(0, 256, shape, np.uint8)
        elif dtype == "int32":
            ex[k] = rng.integers(1, 1000, shape).astype(np.int32)
        else:
            ex[k] = rng.standard_normal(shape).astype(np.float32)
    ex["label"] = np.int32(label)
    return ex


def write_synthetic(folder, name, feats, n, num_classes):
    rng = np.random.default_rng(0)
    file = records.shard_names("train", 1)[0]
    count, digest = records.write_shard(os.path.join(folder, file),
                                        (synthetic_example(feats, rng, i % num_classes) for i in range(n)))
    features = {k: records.FeatureSpec(d, s) for k, (d, s) in feats.items()}
    features["label"] = records.FeatureSpec("int32", [])
    records.Manifest(name=name, converter_version="bench", features=features,
                     class_names=[str(i) for i in range(num_classes)],
                     splits={"train": {"num_examples": count, "shards": [{"file": file, "num_examples": count,
                                                                           "sha256": digest}]}}).save(folder)


class HostFrames(grain.transforms.RandomMap):
    """The old host path: the random resized crop resized with PIL, channel by channel, then normalised."""

    def __init__(self, specs):
        self.specs = dict(specs)

    def random_map(self, ex, rng):
        ex = dict(ex)
        for m, sp in self.specs.items():
            clip = ex[m][None] if ex[m].ndim == 3 else ex[m]
            h, w = clip.shape[1:3]
            box = augment.sample_crop(rng, h, w, sp.scale, sp.ratio)
            out = loader.host_crop_resize(clip, box, sp.size, bool(rng.random() < 0.5)).astype(np.float32)
            out = out / 255.0 if ex[m].dtype == np.uint8 else out
            if sp.normalize and out.shape[-1] == 3:
                out = (out - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
            ex[m] = out[0] if ex[m].ndim == 3 else out
        return ex


def legacy_loader(folder, frames, batch, workers):
    source, _ = loader.open_split(folder, "train")
    ops = [loader.Decode(None), HostFrames(frames), grain.transforms.Batch(batch, drop_remainder=True)]
    sampler = grain.samplers.IndexSampler(len(source), shuffle=True, num_epochs=None, seed=0)
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops, worker_count=workers)


def loader_rate(ld, seconds):
    it = iter(ld)
    next(it)  # start-up (worker spawn, the first read) is not throughput
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["label"])
    return n / (time.perf_counter() - t0)


def step_rates(name, model_cfg, feats, frames, batch_size, steps):
    """(train step ex/s on loader batches, the share of the step the frame preparation takes inside it,
    the share the preparation alone takes, compile s).

    The step on the loader's batches (frames prepared inside it) and the step on prepared batches
    run alternately, ``steps`` times each; their fastest times are compared.
    """
    c = base_config(name, "/nonexistent")
    c.model = model_cfg
    c.data.frames = {m: {"size": list(sp.size), "normalize": sp.normalize} for m, sp in frames.items()}
    c.train.update({"num_epochs": 1, "batch_size": batch_size, "learning_rate": 1e-2, "weight_decay": 1e-4,
                    "schedule": "constant"})
    c.alpha.strategy = "constant:0.5"
    rng = np.random.default_rng(1)
    drawn = [loader.TrainFrames(frames).random_map(synthetic_example(feats, rng, i % model_cfg["num_classes"]), rng)
             for i in range(batch_size)]
    raw = jax.device_put({k: np.stack([d[k] for d in drawn]) for k in drawn[0]})
    run = setup(c, data=False, example={k: v[:2] for k, v in raw.items()})
    prepare = jax.jit(run.prepare)
    prepared = jax.block_until_ready(prepare(raw))
    state = run.create_train_state(jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    with_prep = make_train_step(model=run.model, tx=run.tx, method=run.method, prepare=run.prepare).lower(state, raw).compile()
    compile_s = time.perf_counter() - t0
    without = make_train_step(model=run.model, tx=run.tx, method=run.method).lower(state, prepared).compile()
    times = {"raw": [], "prepared": [], "prepare": []}
    for i in range(steps + 1):
        for label, fn, batch in (("raw", with_prep, raw), ("prepared", without, prepared)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, batch)[1]["loss"])
            if i:  # the first call of each warms up
                times[label].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(prepare(raw))
        times["prepare"].append(time.perf_counter() - t0)
    t_raw, t_prep, t_alone = min(times["raw"]), min(times["prepared"]), min(times["prepare"])
    return batch_size / t_raw, max(0.0, (t_raw - t_prep) / t_raw), t_alone / t_raw, compile_s


def main(argv):
    del argv
    workers = [int(w) for w in FLAGS.workers]
    rows = []
    for name in FLAGS.datasets:
        feats, frames, model_cfg = spec(name)
        with tempfile.TemporaryDirectory() as folder:
            write_synthetic(folder, name, feats, FLAGS.examples, model_cfg["num_classes"])
            for w in workers:
                new = loader_rate(loader.make_loader(folder, "train", batch_size=FLAGS.loader_batch, train=True, seed=0,
                                                     frames=frames, worker_count=w, num_epochs=None), FLAGS.seconds)
                old = (loader_rate(legacy_loader(folder, frames, FLAGS.loader_batch, w), FLAGS.seconds)
                       if frames and FLAGS.legacy else None)
                rows.append([name, w, new, old])
        consume, share, alone, compile_s = step_rates(name, model_cfg, feats, frames, FLAGS.step_batch, FLAGS.steps)
        for r in rows:
            if r[0] == name:
                r += [consume, share, alone, compile_s]
        print(f"  measured {name}", flush=True)
    dev = jax.devices()[0]
    print(f"\ndevice: {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU cores; loader batch {FLAGS.loader_batch}, "
          f"train step batch {FLAGS.step_batch}; {FLAGS.examples} synthetic records of the converters' shapes")
    print(f"{'data set':<16} {'workers':>7} {'loader ex/s':>12} {'per process':>12} {'old host path':>14} {'new/old':>8} "
          f"{'step ex/s':>10} {'loader/step':>12} {'augment in step':>16} {'augment alone':>14} "
          f"{'16 procs / 2x H100 step':>24}")
    for name, w, new, old, consume, share, alone, _ in rows:
        per = new / max(w, 1)
        feed = (f"{16 * per / (2 * H100_STEP[name]):.1f}x" if name in H100_STEP else "")
        old_per = "" if old is None else f"{old / max(w, 1):.1f}"
        print(f"{name:<16} {w:>7} {new:>12.1f} {per:>12.1f} {old_per:>14} "
              f"{'' if old is None else f'{new / old:.1f}x':>8} {consume:>10.2f} {new / consume:>12.1f} "
              f"{'' if not spec(name)[1] else f'{share:.1%}':>16} {'' if not spec(name)[1] else f'{alone:.1%}':>14} "
              f"{feed:>24}")


if __name__ == "__main__":
    common.run(main)
