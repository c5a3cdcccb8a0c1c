"""Algorithm 1 end to end on tiny generated records: every method, resume, selection, bad input."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_data import make_tiny_records, tiny_config

from configs import mfeat as mfeat_config
from dyngap_jax.data.records import RecordError
from dyngap_jax.train import Checkpointer, TrainingDiverged, evaluate_checkpoint, load_run_state, train


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


METHODS = ["concat", "constant:0.5", "stepwise:0.05", "ours_h", "ours_lb", "ours_lb_vector", "lfm_code", "unimodal:a",
           "ours_lb+adam", "ours_lb+minres"]
VARIANTS = {"adam": ("alpha.learned.optimizer", "adam"),  # the alpha optimiser's state is a different tree
            "minres": ("alpha.hypergrad.method", "minres")}  # alone: MINRES with its own defaults


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_restores(tiny_records, tmp_path, method):
    method, _, variant = method.partition("+")
    cfg = tiny_config(tiny_records, method)
    if variant:
        with cfg.unlocked():
            cfg.update_from_flattened_dict({VARIANTS[variant][0]: VARIANTS[variant][1]})
    summary = train(cfg, str(tmp_path))
    # restored through evaluation (a train state made from the config), the best checkpoint gives back the
    # metrics recorded at that epoch; without a config, from the run's recorded one
    for config in (cfg, None):
        for split in ("validation", "test"):
            step, res = evaluate_checkpoint(config, str(tmp_path), split, "best")
            assert step == 3 * summary["best"]["epoch"]
            for k, v in summary["best"][split].items():
                assert res[k] == pytest.approx(v, abs=1e-6), (split, k)
        if method != "lfm_code":
            break
    if method == "lfm_code":  # the script, as a user runs it: the recorded config, the table
        proc = subprocess.run([sys.executable, "-m", "scripts.evaluate", "--workdir", str(tmp_path), "--split", "test"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = next(line for line in proc.stdout.splitlines() if line.startswith("test ") and " acc " in line)
        assert float(row.split()[2]) == pytest.approx(summary["best"]["test"]["acc"], abs=1e-4)
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
        # every alpha step is accounted for: an exact method's unconverged solve is counted and not applied
        assert all(r["alpha_steps"] == 3 and "hypergrad_iterations" in r for r in records)
        totals = summary["alpha_steps"]
        assert totals["count"] == 6 and totals["skipped"] == sum(r["hypergrad_skipped"] for r in records)
        exact = method in ("ours_lb", "ours_lb_vector")
        if exact:
            assert totals["skipped"] == totals["count"] - totals["converged"]
        if variant == "minres":  # MINRES's defaults (undamped, tol 1e-6, 100 iterations) on a singular H
            assert all(r["hypergrad_iterations"] > 0 for r in records)
        elif method != "lfm_code":  # the authors' lr is 1e-4: it moves, but by little
            assert totals["converged"] == totals["count"] == 6  # the default solve reaches its tolerance
            assert not np.allclose(alphas[-1], init), "learned alpha did not move"
        if method == "ours_lb_vector":
            assert alphas[-1].shape == (1,)  # two modalities: one pair


def test_interrupt_and_resume_equals_uninterrupted(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "ours_lb")
    with cfg.unlocked():
        cfg.alpha.hypergrad.warm_start = True  # the last solution is part of the state to resume
        cfg.alpha.hypergrad.warm_power = True  # and so is the power iteration's last iterate
        cfg.alpha.hypergrad.reuse_lambda = True  # and the last solve's |lambda|_max
        cfg.alpha.hypergrad.options.power_tol = 1e-2
    full = train(cfg, str(tmp_path / "full"))
    # the power iteration ran only at the first alpha step: every later one took the last solve's |lambda|_max
    power = [json.loads(line)["hypergrad_power_iterations"] for line in open(tmp_path / "full" / "metrics.jsonl")
             if '"split": "train"' in line]
    assert power[0] > 0 and power[1:] == [0.0] * (len(power) - 1)
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
    # the warm start survives the interruption: the same solves (iterations per epoch) and the same last solution
    assert resumed["alpha_steps"] == full["alpha_steps"]
    (_, sa, _), (_, sb, _) = (load_run_state(cfg, str(tmp_path / d), 6) for d in ("full", "resumed"))
    va, vb = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(s.alpha_solution)]) for s in (sa, sb))
    assert np.abs(va).max() > 0
    np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-7)
    pa, pb = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(s.method_state["power_vector"])])
              for s in (sa, sb))
    np.testing.assert_allclose(np.linalg.norm(pa), 1.0, rtol=1e-5)
    np.testing.assert_allclose(pb, pa, rtol=1e-5, atol=1e-7)
    la, lb = (float(s.method_state["lambda_max"]) for s in (sa, sb))
    assert la > 0 and lb == pytest.approx(la, rel=1e-6)


def test_an_unconverged_solve_is_counted_and_not_applied(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "ours_lb", epochs=1)
    with cfg.unlocked():
        cfg.alpha.hypergrad.options.maxiter = 2  # far short of the 1e-3 tolerance
    summary = train(cfg, str(tmp_path / "required"))
    assert summary["alpha_steps"] == {**summary["alpha_steps"], "count": 3, "converged": 0, "skipped": 3}
    assert summary["final_alpha"] == 0.5
    assert summary["history"][-1]["alpha_skipped"] == 3
    with cfg.unlocked():
        cfg.alpha.hypergrad.require_converged = False  # the truncated solve, applied (the pre-issue-13 behaviour)
    applied = train(cfg, str(tmp_path / "applied"))
    assert applied["alpha_steps"]["skipped"] == 0 and applied["alpha_steps"]["converged"] == 0
    assert not np.isclose(applied["final_alpha"], 0.5)


def test_the_certified_stop_is_reported_per_step_and_a_missed_bound_is_not_applied(tiny_records, tmp_path, capsys):
    cfg = tiny_config(tiny_records, "ours_lb", epochs=1)
    with cfg.unlocked():
        cfg.alpha.hypergrad.options.scalar_tol = 1e-2  # stop on the hypergradient's certified bound
    summary = train(cfg, str(tmp_path / "certified"))
    record = next(json.loads(l) for l in open(tmp_path / "certified" / "metrics.jsonl") if '"split": "train"' in l)
    assert summary["alpha_steps"]["count"] == summary["alpha_steps"]["converged"] == 3
    assert 0 < record["hypergrad_bound_max"] <= 1e-2 and summary["alpha_steps"]["max_bound"] == record["hypergrad_bound_max"]
    assert record["hypergrad_seconds"] > 0 and summary["timing"]["alpha_step_seconds"] >= record["hypergrad_seconds"]
    assert not np.isclose(summary["final_alpha"], 0.5)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch"))
    assert "alpha steps 3/3 certified" in line and "HVPs" in line, line
    with cfg.unlocked():
        cfg.alpha.hypergrad.options.update({"scalar_tol": 1e-9, "maxiter": 2})  # far short of the accuracy asked
    missed = train(cfg, str(tmp_path / "missed"))
    assert missed["alpha_steps"] == {**missed["alpha_steps"], "count": 3, "converged": 0, "skipped": 3}
    assert missed["final_alpha"] == 0.5 and missed["alpha_steps"]["max_bound"] > 1e-9


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


@pytest.mark.parametrize("lr, decay, what", [(1e30, 0.0, "loss or gradients"),
                                             (3e38, 10.0, "parameters after the update")])
def test_divergence_stops_naming_the_step_and_a_good_checkpoint(tiny_records, tmp_path, lr, decay, what):
    cfg = tiny_config(tiny_records, "concat")
    with cfg.unlocked():
        # 3e38 x (g + 10 theta): a finite loss and gradient step to infinite parameters
        cfg.train.learning_rate, cfg.train.weight_decay = lr, decay
        cfg.train.checkpoint_every_steps = 1
    with pytest.raises(TrainingDiverged, match=rf"non-finite {what} at step \d+ \(epoch 1, batch \d\)") as e:
        train(cfg, str(tmp_path))
    named = re.search(r"the last good checkpoint is step (\d+)", str(e.value))
    if named:  # the checkpoint the message calls good is: every parameter finite
        _, state, _ = load_run_state(cfg, str(tmp_path), int(named.group(1)))
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))
    else:
        assert "no checkpoint yet" in str(e.value)


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
    with pytest.raises(ValueError, match="config.alpha.batch_size=32 must be at most config.train.batch_size=16"):
        train(cfg, str(tmp_path / "b"))


def test_a_code_default_changed_since_the_run_started_is_named_on_resume(tiny_records, tmp_path, monkeypatch):
    """A run records the solver options its config leaves to the code (defaults.json); resumed after the code's
    default damping changed, it is refused naming the option and both values, and resumes once the config sets
    the value of then."""
    from dyngap_jax.hypergrad import exact
    from dyngap_jax.train import workdir as wd
    from dyngap_jax.train.config import ConfigError, validate

    cfg = tiny_config(tiny_records, "ours_lb")
    assert cfg.alpha.hypergrad.options.get("damping") is None  # left to the code
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    wd.record_config(validate(cfg)[0], folder)
    then = json.load(open(os.path.join(folder, wd.DEFAULTS_FILE)))["alpha.hypergrad.options"]
    assert then["damping"] == exact.DEFAULT_DAMPING["relative"] and then["operator"] == "normal"
    wd.check_config(validate(cfg)[0], folder)  # the same code: the same run
    monkeypatch.setitem(exact.DEFAULT_DAMPING, "relative", 0.5)  # a later version's default
    with pytest.raises(ConfigError, match=r"differs in alpha\.hypergrad\.options\.damping.*damping: 0\.1 then, 0\.5 now"):
        train(cfg, folder)
    with cfg.unlocked():
        cfg.alpha.hypergrad.options.damping = then["damping"]
    wd.check_config(validate(cfg)[0], folder)  # the value of then, stated: the same run
    # a change the config makes is named as the config's, not as the code's
    with cfg.unlocked():
        cfg.alpha.hypergrad.options.update({"damping": None, "damping_mode": "absolute"})
    with pytest.raises(ConfigError, match="differs in alpha.hypergrad.options.damping, alpha.hypergrad.options.damping_mode"
                       r".*damping: 0\.1 then, 0\.5 now") as e:
        wd.check_config(validate(cfg)[0], folder)
    assert "damping_mode" not in str(e.value).split("have changed")[1]
    # a run recorded before defaults.json existed is compared as it stands
    os.remove(os.path.join(folder, wd.DEFAULTS_FILE))
    with cfg.unlocked():
        cfg.alpha.hypergrad.options.update({"damping": None, "damping_mode": None})  # as recorded: unset
    wd.check_config(validate(cfg)[0], folder)
