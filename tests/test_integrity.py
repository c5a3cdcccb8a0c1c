"""What is verified when records are opened: shards hashed against the manifest, errors naming the file."""
import os
import shutil

import pytest
from tiny_data import flip_byte, make_tiny_records, tiny_config

from dyngap_jax.data import RecordError, loader, make_loader
from dyngap_jax.train import train


@pytest.fixture()
def records(tmp_path):
    return make_tiny_records(str(tmp_path / "rec"))


def shard(folder, split):
    return os.path.join(folder, f"{split}-00000-of-00001.array_record")


def swap(folder):
    """A valid shard of the same size in place of another: validation becomes test."""
    shutil.copyfile(shard(folder, "test"), shard(folder, "validation"))


def flip(folder):
    flip_byte(shard(folder, "validation"))


def truncate(folder):
    path = shard(folder, "validation")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("damage", [swap, flip, truncate])
def test_a_damaged_shard_is_named_when_opened(records, damage):
    damage(records)
    with pytest.raises(RecordError, match=r"validation-00000-of-00001\.array_record: checksum differs from manifest\.json"):
        make_loader(records, "validation", batch_size=8, train=False)
    # the other splits open
    make_loader(records, "test", batch_size=8, train=False)


def test_training_refuses_a_swapped_shard_unless_told_not_to_check(records, tmp_path):
    swap(records)  # the same record count: before the checksum, this trained and evaluated on test as validation
    cfg = tiny_config(records, "concat", epochs=1)
    with pytest.raises(RecordError, match="validation-00000-of-00001.array_record: checksum differs"):
        train(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "config.json")  # nothing recorded for a run that could not start
    with cfg.unlocked():
        cfg.data.verify_checksums = False  # the documented way out, for data too big to hash at every start
    assert train(cfg, str(tmp_path / "unchecked"))["best"]["epoch"] == 1


def test_a_split_is_hashed_once_a_process(records, monkeypatch):
    calls = []
    real = loader.verify_shards
    monkeypatch.setattr(loader, "verify_shards", lambda *a: (calls.append(a[2]), real(*a)))
    for _ in range(3):
        make_loader(records, "train", batch_size=8, train=True)
    make_loader(records, "test", batch_size=8, train=False)
    make_loader(records, "test", batch_size=8, train=False, verify=False)
    assert calls == ["train", "test"]


def test_a_start_without_its_data_writes_nothing(records, tmp_path):
    cfg = tiny_config(str(tmp_path / "missing"), "concat", epochs=1)
    with pytest.raises(RecordError, match=r"missing'? does not exist"):
        train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # no config.json to lock the folder to this mistaken start
