"""CREMA-D -> ArrayRecord: audio spectrograms + video frames, six emotions.

Raw layout as distributed (github.com/CheyneyComputerScience/CREMA-D)::

    <raw_dir>/AudioWAV/1001_DFA_ANG_XX.wav
    <raw_dir>/VideoFlash/1001_DFA_ANG_XX.flv

The emotion is the third field of the file name (ANG, DIS, FEA, HAP, NEU, SAD). Splits: with
``--split_dir`` holding the field's ``train.csv`` / ``test.csv`` (lines ``<clip>,<EMO>``, as
OGM-GE distributes; 6,698 / 744), those; otherwise a seeded stratified split with the same
sizes' ratio. A validation split is carved from train with ``--seed`` (``--val_fraction``).

Audio (the authors' front end): 22,050 Hz, tiled, STFT n_fft 512, hop 353, log(|S| + 1e-7):
257 x 299. Video: frames at ``--fps`` (1), ``--num_frames`` (3) sampled evenly, resized to
``--frame_size`` (224), stored as uint8.

    python -m data_prep.cremad --raw_dir /data/CREMA-D --out_dir data/cremad --workers 8
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
    load_wav_spectrogram,
    video_frames,
)
from dyngap_jax.data.records import FeatureSpec

NAME = "cremad"
VERSION = "1.0.0"
CLASS_NAMES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # the order of the field's CREMA-D loaders
TEST_FRACTION = 744 / 7442

FLAGS = flags.FLAGS


def parse_name(name: str, where: str) -> int:
    parts = name.split("_")
    if len(parts) != 4 or parts[2] not in CLASS_NAMES:
        raise BadInput(where, f"file name {name!r} is not <actor>_<sentence>_<EMOTION>_<level> with EMOTION in {CLASS_NAMES}")
    return CLASS_NAMES.index(parts[2])


def list_clips(raw_dir: str, skip_bad: bool, bad: list) -> dict[str, int]:
    require_dir(raw_dir)
    audio_dir, video_dir = os.path.join(raw_dir, "AudioWAV"), os.path.join(raw_dir, "VideoFlash")
    for d in (audio_dir, video_dir):
        if not os.path.isdir(d):
            raise BadInput(d, "missing: CREMA-D's layout is <raw_dir>/AudioWAV/*.wav and <raw_dir>/VideoFlash/*.flv")
    clips = {}
    for fname in sorted(os.listdir(audio_dir)):
        if not fname.endswith(".wav"):
            continue
        name, where = fname[:-4], os.path.join(audio_dir, fname)
        try:
            label = parse_name(name, where)
            if not os.path.isfile(os.path.join(video_dir, name + ".flv")):
                raise BadInput(os.path.join(video_dir, name + ".flv"), "missing video for this clip")
        except BadInput as e:
            if not skip_bad:
                raise
            bad.append({"file": e.path, "reason": e.reason})
            continue
        clips[name] = label
    if not clips:
        raise BadInput(audio_dir, "no .wav files")
    return clips


def read_split_file(path: str, clips: dict[str, int]) -> list[str]:
    if not os.path.isfile(path):
        raise BadInput(path, "missing split file")
    names = []
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 2:
                raise BadInput(f"{path}:{line_no}", f"expected '<clip>,<EMOTION>', got {row}")
            name, emo = row[0].strip(), row[1].strip()
            if emo not in CLASS_NAMES:
                raise BadInput(f"{path}:{line_no}", f"label {emo!r} is outside the class list {CLASS_NAMES}")
            if name not in clips:
                raise BadInput(f"{path}:{line_no}", f"clip {name!r} is not in AudioWAV/VideoFlash")
            if CLASS_NAMES[clips[name]] != emo:
                raise BadInput(f"{path}:{line_no}", f"label {emo} contradicts the file name {name}")
            names.append(name)
    return names


def load_example(item, *, spec: SpectrogramParams, num_frames: int, fps: float, size: int):
    wav, flv, label = item
    return {
        "audio": load_wav_spectrogram(wav, spec),
        "video": video_frames(flv, num_frames=num_frames, size=size, fps=fps),
        "label": np.int32(label),
    }


def run(raw_dir, out_dir, *, split_dir=None, seed=0, val_fraction=0.1, num_frames=3, fps=1.0, frame_size=224,
        spec=SpectrogramParams(), workers=0, skip_bad=False):
    bad: list = []
    clips = list_clips(raw_dir, skip_bad, bad)
    names = sorted(clips)
    labels = np.asarray([clips[n] for n in names])
    if split_dir:
        train = read_split_file(os.path.join(split_dir, "train.csv"), clips)
        test = read_split_file(os.path.join(split_dir, "test.csv"), clips)
    else:
        idx = stratified_split(labels, {"train": 1 - TEST_FRACTION, "test": TEST_FRACTION}, seed)
        train, test = [names[i] for i in idx["train"]], [names[i] for i in idx["test"]]
    tr_labels = np.asarray([clips[n] for n in train])
    carve = stratified_split(tr_labels, {"train": 1 - val_fraction, "validation": val_fraction}, seed + 1)
    split_names = {"train": [train[i] for i in carve["train"]], "validation": [train[i] for i in carve["validation"]],
                   "test": test}
    item = lambda n: (os.path.join(raw_dir, "AudioWAV", n + ".wav"), os.path.join(raw_dir, "VideoFlash", n + ".flv"), clips[n])
    features = {"audio": FeatureSpec("float32", spec.shape),
                "video": FeatureSpec("uint8", [num_frames, frame_size, frame_size, 3]),
                "label": FeatureSpec("int32", [])}
    manifest = convert(
        name=NAME, version=VERSION, out_dir=out_dir, splits={s: [item(n) for n in ns] for s, ns in split_names.items()},
        load=functools.partial(load_example, spec=spec, num_frames=num_frames, fps=fps, size=frame_size),
        features=features, class_names=CLASS_NAMES,
        params={"split": "split_dir" if split_dir else f"stratified seed {seed}", "seed": seed, "val_fraction": val_fraction,
                "num_frames": num_frames, "fps": fps, "frame_size": frame_size, "sample_rate": spec.sample_rate,
                "n_fft": spec.n_fft, "hop": spec.hop, "spec_frames": spec.num_frames, "log_offset": 1e-7},
        examples_per_shard=256, workers=workers, skip_bad=skip_bad,
    )
    if bad:
        manifest.skipped = bad + manifest.skipped
        manifest.save(out_dir)
    return manifest


def main(argv):
    del argv
    run(FLAGS.raw_dir, FLAGS.out_dir, split_dir=FLAGS.split_dir, seed=FLAGS.seed, val_fraction=FLAGS.val_fraction,
        workers=FLAGS.workers, skip_bad=FLAGS.skip_bad, **audio_video_from_flags(FLAGS))


def define_flags():
    """The command-line flags (defined only when run as a script, so converters can be imported together)."""
    define_io_flags("CREMA-D folder with AudioWAV/ and VideoFlash/.", "clips")
    define_audio_video_flags(SpectrogramParams())
    flags.DEFINE_string("split_dir", None, "Folder with train.csv and test.csv (<clip>,<EMO> lines); default a seeded split.")
    flags.DEFINE_integer("seed", 0, "Seed for the validation carve (and the split without --split_dir).")
    flags.DEFINE_float("val_fraction", 0.1, "Fraction of train per class held out for validation.")
    flags.adopt_module_key_flags(common)  # --help lists the shared flags too
    flags.adopt_module_key_flags(media)  # --help lists the shared flags too


if __name__ == "__main__":
    define_flags()
    common.run(main)
