"""A tiny generated two-view data set (3 classes) and a config for it, shared by the training, comparison and report tests."""
import json
import os

import numpy as np

from configs import mfeat as mfeat_config
from data_prep.common import convert
from dyngap_jax.data.records import FeatureSpec
from dyngap_jax.io import json_differences


def make_tiny_records(out: str, splits=("train", "validation", "test")) -> str:
    """Two views of 3 classes: 'a' informative, 'b' weakly informative; 48 / 24 / 24 examples (``splits``: which
    of train, validation and test to write)."""
    rng = np.random.default_rng(0)
    centers_a, centers_b = rng.standard_normal((3, 6)) * 2.0, rng.standard_normal((3, 5)) * 0.5

    def examples(n, offset):
        out = []
        for i in range(n):
            y = (i + offset) % 3
            out.append({"a": (centers_a[y] + rng.standard_normal(6)).astype(np.float32),
                        "b": (centers_b[y] + rng.standard_normal(5)).astype(np.float32), "label": np.int32(y)})
        return out

    made = {"train": examples(48, 0), "validation": examples(24, 1), "test": examples(24, 2)}
    convert(name="tiny", version="1", out_dir=out, splits={k: v for k, v in made.items() if k in splits},
            load=lambda ex: ex, features={"a": FeatureSpec("float32", [6]), "b": FeatureSpec("float32", [5]),
                                          "label": FeatureSpec("int32", [])},
            class_names=["x", "y", "z"], params={})
    return out


def tiny_config(data_dir, method="ours_lb", epochs=2):
    c = mfeat_config.get_config(method.replace(":a", ":fou").replace(":b", ":pix"))
    views = {"fou": "a", "pix": "b"}
    with c.unlocked():
        c.dataset = "tiny"
        c.data_dir = data_dir
        c.progress = False
        c.data.standardize = False
        mods = [views[m] for m in c.model.modalities]
        c.model.modalities = mods
        c.model.num_classes = 3
        c.model.encoders = {m: {"name": "mlp", "hidden": [16], "out_features": 8, "in_features": 6 if m == "a" else 5}
                            for m in mods}
        c.train.num_epochs = epochs
        c.train.batch_size = 16
        c.train.eval_batch_size = 16
        if c.alpha.strategy == "learned" and c.alpha.when == "after_steps":
            c.alpha.inner_iters = 1
    return c


def flip_byte(path: str) -> None:
    """Damage a file as a bad disk or copy would: one bit flipped in its middle byte."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))


def summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(workdir: str, reference: str, epochs: int, rtol: float = 1e-6) -> None:
    """The run in ``workdir`` ended as the one in ``reference``: its whole ``summary.json`` (every number within
    ``rtol``; what each process compiled left out) and its metrics log's records."""
    a, b = summary(workdir), summary(reference)
    for s in (a, b):  # what each process compiled, and the wall time it measured, left out
        s.pop("compilations", None), s.pop("timing", None)
    assert len(a["history"]) == len(b["history"]) == epochs
    assert json_differences(a, b, rtol) == []
    # one record per epoch and split, in order, as the uninterrupted run logged them
    key = lambda r: (r["epoch"], r["split"], r["step"])
    assert [key(r) for r in records(workdir)] == [key(r) for r in records(reference)]
