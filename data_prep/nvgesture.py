"""NVGesture (Molchanov et al., CVPR 2016) -> ArrayRecord: RGB, depth and optical flow, 25 classes.

Raw layout as distributed (``nvgesture_arch``)::

    <raw_dir>/nvgesture_train_correct_cvpr2016_v2.lst
    <raw_dir>/nvgesture_test_correct_cvpr2016_v2.lst
        lines "path:./Video_data/class_01/subject1_r0 depth:sk_depth:138:218 color:sk_color:138:218
               duo_left:duo_left:161:248 label:1"
    <raw_dir>/Video_data/class_XX/<session>/sk_color.avi, sk_depth.avi

The gesture is frames [start, end) of each sensor stream. ``--num_frames`` (8) are sampled evenly
from it; optical flow is computed (OpenCV Farneback) from each sampled colour frame to the next
one. Stored: rgb uint8 [T, S, S, 3], depth uint8 [T, S, S, 1], flow float32 [T, S, S, 2] with
S = ``--frame_size`` (112). 1,050 train (a validation split carved with ``--seed``) / 482 test.

    python -m data_prep.nvgesture --raw_dir /data/nvgesture_arch --out_dir data/nvgesture --workers 8
"""
from __future__ import annotations

import functools
import os

import numpy as np
from absl import flags

from data_prep import common
from data_prep.common import BadInput, convert, define_io_flags, require_dir, stratified_split
from data_prep.media import read_video
from dyngap_jax.data.records import FeatureSpec

NAME = "nvgesture"
VERSION = "1.0.0"
NUM_CLASSES = 25
LISTS = {"train": "nvgesture_train_correct_cvpr2016_v2.lst", "test": "nvgesture_test_correct_cvpr2016_v2.lst"}

FLAGS = flags.FLAGS


def parse_list(path: str, raw_dir: str) -> list:
    if not os.path.isfile(path):
        raise BadInput(path, "missing list file (NVGesture's layout has the two .lst files in nvgesture_arch)")
    items = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            try:
                session = os.path.normpath(os.path.join(raw_dir, fields["path"]))
                streams = {}
                for key in ("color", "depth"):
                    name, start, end = fields[key].split(":")
                    streams[key] = (os.path.join(session, name + ".avi"), int(start), int(end))
                    if not 0 <= int(start) < int(end):
                        raise ValueError(f"{key} frames {start}:{end} are not a range")
                label = int(fields["label"]) - 1
            except (KeyError, ValueError) as e:
                raise BadInput(where, f"malformed list line ({e}): {line.strip()[:120]}") from None
            if not 0 <= label < NUM_CLASSES:
                raise BadInput(where, f"label {label + 1} is outside the class list 1..{NUM_CLASSES}")
            items.append((streams["color"], streams["depth"], label))
    if not items:
        raise BadInput(path, "no gestures listed")
    return items


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR)


def _segment(path: str, start: int, end: int) -> np.ndarray:
    frames = read_video(path, fps=None)
    if end > len(frames):
        raise BadInput(path, f"gesture frames {start}:{end} but the video has {len(frames)} frames")
    return frames[start:end]


def load_example(item, *, num_frames: int, size: int):
    import cv2

    (color_path, c0, c1), (depth_path, d0, d1), label = item
    color, depth = _segment(color_path, c0, c1), _segment(depth_path, d0, d1)
    ci = np.linspace(0, len(color) - 1, num_frames).round().astype(int)
    di = np.linspace(0, len(depth) - 1, num_frames).round().astype(int)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in color]
    flows = []
    for i in ci:
        j = min(i + 1, len(color) - 1)
        flow = cv2.calcOpticalFlowFarneback(gray[i], gray[j], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        scale = np.asarray([size / flow.shape[1], size / flow.shape[0]], np.float32)
        flows.append(_resize(flow, size) * scale)
    return {
        "rgb": np.stack([_resize(color[i], size) for i in ci]).astype(np.uint8),
        "depth": np.stack([_resize(depth[i][..., 0], size)[..., None] for i in di]).astype(np.uint8),
        "flow": np.stack(flows).astype(np.float32),
        "label": np.int32(label),
    }


def run(raw_dir, out_dir, *, seed=0, val_fraction=0.1, num_frames=8, frame_size=112, workers=0, skip_bad=False):
    require_dir(raw_dir)
    lists = {s: parse_list(os.path.join(raw_dir, f), raw_dir) for s, f in LISTS.items()}
    labels = np.asarray([y for *_, y in lists["train"]])
    carve = stratified_split(labels, {"train": 1 - val_fraction, "validation": val_fraction}, seed)
    splits = {"train": [lists["train"][i] for i in carve["train"]],
              "validation": [lists["train"][i] for i in carve["validation"]], "test": lists["test"]}
    s, t = frame_size, num_frames
    features = {"rgb": FeatureSpec("uint8", [t, s, s, 3]), "depth": FeatureSpec("uint8", [t, s, s, 1]),
                "flow": FeatureSpec("float32", [t, s, s, 2]), "label": FeatureSpec("int32", [])}
    return convert(
        name=NAME, version=VERSION, out_dir=out_dir, splits=splits,
        load=functools.partial(load_example, num_frames=num_frames, size=frame_size), features=features,
        class_names=[f"class_{i:02d}" for i in range(1, NUM_CLASSES + 1)],
        params={"seed": seed, "val_fraction": val_fraction, "num_frames": num_frames, "frame_size": frame_size,
                "flow": "opencv farneback(0.5, 3, 15, 3, 5, 1.2) colour frame t -> t+1"},
        examples_per_shard=128, workers=workers, skip_bad=skip_bad,
    )


def main(argv):
    del argv
    run(FLAGS.raw_dir, FLAGS.out_dir, seed=FLAGS.seed, val_fraction=FLAGS.val_fraction, num_frames=FLAGS.num_frames,
        frame_size=FLAGS.frame_size, workers=FLAGS.workers, skip_bad=FLAGS.skip_bad)


def define_flags():
    """The command-line flags (defined only when run as a script, so converters can be imported together)."""
    define_io_flags("The nvgesture_arch folder.", "sessions")
    flags.DEFINE_integer("seed", 0, "Seed of the validation carve.")
    flags.DEFINE_float("val_fraction", 0.1, "Fraction of train per class held out for validation.")
    flags.DEFINE_integer("num_frames", 8, "Frames per gesture.")
    flags.DEFINE_integer("frame_size", 112, "Stored frame height and width.")
    flags.adopt_module_key_flags(common)  # --help lists the shared flags too


if __name__ == "__main__":
    define_flags()
    common.run(main)
