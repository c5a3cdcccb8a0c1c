"""Kinetics-Sounds -> ArrayRecord: audio spectrograms + video frames, 31 classes.

Kinetics-Sounds is the subset of Kinetics' classes with audible actions; users download the
clips (YouTube / the CVDF Kinetics mirror) and the field's split lists. Raw layout read here::

    <raw_dir>/train.csv  <raw_dir>/test.csv  [<raw_dir>/val.csv]
        lines "<clip path relative to raw_dir>,<class name>" (an optional "path,label" header)
    <raw_dir>/<clip path>.mp4     (video with its audio track)

The class list is the sorted set of train labels and must have ``--num_classes`` (31) entries;
a val/test label outside it is an error. Without ``val.csv`` a validation split is carved from
train with ``--seed``. Audio: the clip's own track, 22,050 Hz, 10 s tiled, STFT n_fft 512, hop
220: 257 x 1004 (the paper's size). Video: 1 fps, 3 frames evenly, 224 x 224 uint8.

    python -m data_prep.kinetics_sounds --raw_dir /data/ks --out_dir data/kinetics_sounds --workers 8
"""
from __future__ import annotations

import csv
import functools
import os

import numpy as np
from absl import flags

from data_prep import common, media
from data_prep.common import BadInput, convert, define_io_flags, require_dir, stratified_split
from data_prep.media import (
    SpectrogramParams,
    audio_video_from_flags,
    define_audio_video_flags,
    read_video,
    spectrogram,
    video_frames,
)
from dyngap_jax.data.records import FeatureSpec

NAME = "kinetics_sounds"
VERSION = "1.0.0"
DEFAULT_SPEC = SpectrogramParams(sample_rate=22050, n_fft=512, hop=220, num_frames=1004)

FLAGS = flags.FLAGS


def read_list(path: str, raw_dir: str) -> list[tuple[str, str, str]]:
    """``(clip path, label, where)`` per line of a split list."""
    if not os.path.isfile(path):
        raise BadInput(path, "missing split list")
    rows = []
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or (line_no == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise BadInput(f"{path}:{line_no}", f"expected '<clip path>,<class name>', got {row}")
            rows.append((os.path.join(raw_dir, row[0].strip()), row[1].strip(), f"{path}:{line_no}"))
    if not rows:
        raise BadInput(path, "no clips listed")
    return rows


def load_example(item, *, spec: SpectrogramParams, num_frames: int, fps: float, size: int):
    import librosa

    path, label = item
    samples, rate = read_video(path, stream="audio")
    if rate != spec.sample_rate:
        samples = librosa.resample(samples, orig_sr=rate, target_sr=spec.sample_rate)
    return {
        "audio": spectrogram(samples, spec, path),
        "video": video_frames(path, num_frames=num_frames, size=size, fps=fps),
        "label": np.int32(label),
    }


def run(raw_dir, out_dir, *, num_classes=31, seed=0, val_fraction=0.1, num_frames=3, fps=1.0, frame_size=224,
        spec=DEFAULT_SPEC, workers=0, skip_bad=False):
    require_dir(raw_dir)
    lists = {"train": read_list(os.path.join(raw_dir, "train.csv"), raw_dir),
             "test": read_list(os.path.join(raw_dir, "test.csv"), raw_dir)}
    if os.path.isfile(os.path.join(raw_dir, "val.csv")):
        lists["validation"] = read_list(os.path.join(raw_dir, "val.csv"), raw_dir)
    class_names = sorted({label for _, label, _ in lists["train"]})
    if len(class_names) != num_classes:
        raise BadInput(os.path.join(raw_dir, "train.csv"), f"{len(class_names)} classes, expected {num_classes}")
    items = {}
    for split, rows in lists.items():
        for _, label, where in rows:
            if label not in class_names:
                raise BadInput(where, f"label {label!r} is outside the class list (the train labels)")
        items[split] = [(p, class_names.index(label)) for p, label, _ in rows]
    if "validation" not in items:
        labels = np.asarray([y for _, y in items["train"]])
        carve = stratified_split(labels, {"train": 1 - val_fraction, "validation": val_fraction}, seed)
        items = {"train": [items["train"][i] for i in carve["train"]],
                 "validation": [items["train"][i] for i in carve["validation"]], "test": items["test"]}
    features = {"audio": FeatureSpec("float32", spec.shape),
                "video": FeatureSpec("uint8", [num_frames, frame_size, frame_size, 3]),
                "label": FeatureSpec("int32", [])}
    return convert(
        name=NAME, version=VERSION, out_dir=out_dir, splits=items,
        load=functools.partial(load_example, spec=spec, num_frames=num_frames, fps=fps, size=frame_size),
        features=features, class_names=class_names,
        params={"seed": seed, "val_fraction": val_fraction, "num_frames": num_frames, "fps": fps, "frame_size": frame_size,
                "sample_rate": spec.sample_rate, "n_fft": spec.n_fft, "hop": spec.hop, "spec_frames": spec.num_frames},
        examples_per_shard=128, workers=workers, skip_bad=skip_bad,
    )


def main(argv):
    del argv
    run(FLAGS.raw_dir, FLAGS.out_dir, num_classes=FLAGS.num_classes, seed=FLAGS.seed, val_fraction=FLAGS.val_fraction,
        workers=FLAGS.workers, skip_bad=FLAGS.skip_bad, **audio_video_from_flags(FLAGS))


def define_flags():
    """The command-line flags (defined only when run as a script, so converters can be imported together)."""
    define_io_flags("Folder with train.csv, test.csv (val.csv) and the clips.", "clips")
    define_audio_video_flags(DEFAULT_SPEC)
    flags.DEFINE_integer("num_classes", 31, "Expected number of classes in train.csv.")
    flags.DEFINE_integer("seed", 0, "Seed of the validation carve when there is no val.csv.")
    flags.DEFINE_float("val_fraction", 0.1, "Fraction of train held out for validation without val.csv.")
    flags.adopt_module_key_flags(common)  # --help lists the shared flags too
    flags.adopt_module_key_flags(media)  # --help lists the shared flags too


if __name__ == "__main__":
    define_flags()
    common.run(main)
