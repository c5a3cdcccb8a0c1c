"""Algorithm 1 end to end on tiny generated records: every method, resume, selection, bad input."""
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import mfeat as mfeat_config  # noqa: E402
from dyngap_jax.data.records import RecordError  # noqa: E402
from dyngap_jax.train import Checkpointer, TrainingDiverged, train  # noqa: E402
from dyngap_jax.train.evaluation import evaluate_checkpoint  # noqa: E402
from tiny_data import make_tiny_records, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


METHODS = ["concat", "constant:0.5", "stepwise:0.05", "ours_h", "ours_lb", "ours_lb_vector", "lfm_code", "unimodal:a"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_two_epochs(tiny_records, tmp_path, method):
    cfg = tiny_config(tiny_records, method)
    summary = train(cfg, str(tmp_path))
    hist = summary["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    for split in ("validation", "test"):
        for k in ("acc", "map", "f1"):
            assert 0.0 <= summary["best"][split][k] <= 1.0
    for f in ("metrics.jsonl", "alpha.png", "modalities.png", "summary.json"):
        assert os.path.isfile(tmp_path / f), f
    assert os.listdir(tmp_path / "tensorboard")
    alphas = [np.asarray(h["alpha"], float) for h in hist]
    if method in ("concat", "unimodal:a"):
        assert all(np.all(a == 0) for a in alphas)
    elif method == "constant:0.5":
        assert all(np.all(a == 0.5) for a in alphas)
    elif method == "stepwise:0.05":
        np.testing.assert_allclose([a.item() for a in alphas], [0.05, 0.95])
    elif method == "ours_h":
        np.testing.assert_allclose([a.item() for a in alphas], [1 - math.exp(-1), 1 - math.exp(-0.5)], rtol=1e-6)
    else:
        lo, hi = (0.05, 0.95) if method == "lfm_code" else (0.0, 1.0)
        init = 0.95 if method == "lfm_code" else 0.5
        assert all(np.all((a >= lo) & (a <= hi)) for a in alphas)
        records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"split": "train"' in l]
        assert all("hypergrad_iterations" in r for r in records)
        if method != "lfm_code":  # the authors' lr is 1e-4: it moves, but by little
            assert not np.allclose(alphas[-1], init), "learned alpha did not move"
        if method == "ours_lb_vector":
            assert alphas[-1].shape == (1,)  # two modalities: one pair


def test_interrupt_and_resume_equals_uninterrupted(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "ours_lb")
    full = train(cfg, str(tmp_path / "full"))
    part = train(cfg, str(tmp_path / "resumed"), max_steps=4)  # 3 steps an epoch: stops inside epoch 2
    assert part["stopped_at"] == 4
    # asking again for the same stop trains nothing more
    assert train(cfg, str(tmp_path / "resumed"), max_steps=4)["stopped_at"] == 4
    # the workdir refuses another config rather than mixing two runs
    other = tiny_config(tiny_records, "ours_h")
    with pytest.raises(ValueError, match="holds a run of another config.*alpha.strategy"):
        train(other, str(tmp_path / "resumed"))
    resumed = train(cfg, str(tmp_path / "resumed"))
    for h_full, h_res in zip(full["history"], resumed["history"]):
        assert h_full.keys() == h_res.keys()
        for k in h_full:
            np.testing.assert_allclose(h_res[k], h_full[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(resumed["final_alpha"], full["final_alpha"], rtol=1e-6)
    a = Checkpointer(str(tmp_path / "full" / "checkpoints"))
    b = Checkpointer(str(tmp_path / "resumed" / "checkpoints"))
    assert a.latest_step() == b.latest_step() == 6
    assert a.restore_extra(6)["history"] == b.restore_extra(6)["history"]


def test_best_epoch_is_chosen_on_validation_only(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "ours_h", epochs=3)
    summary = train(cfg, str(tmp_path))
    val = [h["validation/acc"] for h in summary["history"]]
    assert summary["best"]["epoch"] == int(np.argmax(val)) + 1  # first maximum, ties to the earliest
    assert summary["best"]["metric"] == "validation/acc"
    best = summary["history"][summary["best"]["epoch"] - 1]
    assert summary["best"]["test"]["acc"] == best["test/acc"]
    # scripts/evaluate.py's path: the best checkpoint reproduces the test metrics recorded at that epoch
    step, res = evaluate_checkpoint(cfg, str(tmp_path), "test", "best")
    assert step == 3 * summary["best"]["epoch"]
    for k in ("acc", "map", "f1", "gap_acc"):
        assert res[k] == pytest.approx(summary["best"]["test"][k], abs=1e-6), k


def test_nan_loss_stops_naming_the_step(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "concat")
    with cfg.unlocked():
        cfg.train.learning_rate = 1e30
        cfg.train.checkpoint_every_steps = 1
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step \d+ \(epoch 1, batch \d\)"):
        train(cfg, str(tmp_path))


def test_config_errors_name_the_field(tiny_records, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'newton'"):
        mfeat_config.get_config("newton")
    with pytest.raises(ValueError, match="unknown views"):
        mfeat_config.get_config("ours_lb/abc")
    cfg = tiny_config(tiny_records, "concat")
    with cfg.unlocked():
        cfg.dataset = "cremad"
    with pytest.raises(RecordError, match="records are of data set 'tiny', the config says 'cremad'"):
        train(cfg, str(tmp_path / "a"))
    cfg = tiny_config(tiny_records, "concat")
    with cfg.unlocked():
        cfg.train.batch_size = 100
    with pytest.raises(ValueError, match="config.train.batch_size=100 is larger than the training split"):
        train(cfg, str(tmp_path / "b"))
    cfg = tiny_config(tiny_records, "ours_lb")
    with cfg.unlocked():
        cfg.train.optimizer = "lion"
    with pytest.raises(ValueError, match="config.train.optimizer: unknown 'lion'"):
        train(cfg, str(tmp_path / "c"))


def test_alpha_step_on_a_smaller_batch(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "ours_lb")
    with cfg.unlocked():
        cfg.alpha.batch_size = 8
    summary = train(cfg, str(tmp_path / "a"))
    assert not np.isclose(summary["final_alpha"], 0.5)
    with cfg.unlocked():
        cfg.alpha.batch_size = 32
    with pytest.raises(ValueError, match="config.alpha.batch_size=32 must be at most the per-process batch 16"):
        train(cfg, str(tmp_path / "b"))
