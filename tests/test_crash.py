"""A run killed (SIGKILL, in a subprocess) at the named places of ``dyngap_jax.faults`` resumes to the uninterrupted result."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from tiny_data import assert_same_run as _same, flip_byte, make_tiny_records, summary, tiny_config

from dyngap_jax import faults
from dyngap_jax.train import CheckpointError, Checkpointer, WorkdirBusy, train, workdir_lock

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EPOCHS = 3


def assert_same_run(workdir, reference):
    _same(workdir, reference, EPOCHS)


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_records, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    train(tiny_config(tiny_records, "ours_h", epochs=EPOCHS), workdir)
    return workdir


def run_training(data_dir: str, workdir: str, fault: str | None = None) -> int:
    """Train the tiny config in a new process (killed at ``fault`` when given); its exit status."""
    code = ("from tiny_data import tiny_config; from dyngap_jax.train import train; "
            "train(tiny_config({data!r}, 'ours_h', epochs={epochs}), {workdir!r})"
            ).format(data=data_dir, epochs=EPOCHS, workdir=workdir)
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])
    if fault:
        env[faults.ENV] = fault
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=600).returncode


@pytest.mark.parametrize("fault", [
    "checkpoint_writing@2",  # epoch 2's checkpoint being written in the background
    "checkpoint_finished@2",  # epoch 2's checkpoint and hash written, older checkpoints not yet deleted
    "metrics_written@2",  # epoch 2 logged, not checkpointed: the rerun used to log it twice
    "checkpoint_saved@2",
])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_records, uninterrupted, tmp_path, fault):
    workdir = str(tmp_path / "run")
    assert run_training(tiny_records, workdir, fault) == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert run_training(tiny_records, workdir) == 0
    assert_same_run(workdir, uninterrupted)
    # one checkpoint an epoch; the best epoch's is kept beside the newest (keep_checkpoints=2)
    steps = Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
    best = 3 * summary(workdir)["best"]["epoch"]
    assert best in steps and steps[-2:] == [6, 9] and set(steps) <= {best, 6, 9}
    assert summary(workdir)["best"]["step"] == best
    assert not os.path.exists(os.path.join(workdir, "best"))


def test_a_cut_metrics_line_is_dropped_on_resume(tiny_records, uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    assert run_training(tiny_records, workdir, "metrics_written@2") == -signal.SIGKILL
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 2, "split": "te')  # a kill in the middle of a write
    train(tiny_config(tiny_records, "ours_h", epochs=EPOCHS), workdir)
    assert_same_run(workdir, uninterrupted)


def test_an_unknown_fault_place_is_named(monkeypatch):
    monkeypatch.setenv(faults.ENV, "nowhere")
    with pytest.raises(ValueError, match="DYNGAP_FAULT='nowhere': unknown place 'nowhere'"):
        faults.point("checkpoint_saved")


def largest_file(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def remove_metadata(path):
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith("_METADATA") or f == "manifest.ocdbt":
                os.remove(os.path.join(root, f))


@pytest.mark.parametrize("damage", ["flipped byte", "unreadable"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(tiny_records, uninterrupted, tmp_path, damage):
    cfg = tiny_config(tiny_records, "ours_h", epochs=EPOCHS)
    workdir = str(tmp_path / "run")
    assert train(cfg, workdir, max_steps=5)["stopped_at"] == 5  # checkpoints at 3 (epoch 1) and 5 (inside epoch 2)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps()[-2:] == [3, 5]
    step_dir = os.path.join(workdir, "checkpoints", "5")
    if damage == "flipped byte":
        flip_byte(largest_file(step_dir))
        with pytest.raises(CheckpointError, match=r"checkpoints/5: the files differ from the hash"):
            ckpt.restore(5, None)
    else:
        remove_metadata(step_dir)
        os.remove(os.path.join(workdir, "checkpoints", "5.sha256"))  # nothing to compare: orbax's read fails
    ckpt.close()
    train(cfg, workdir)  # resumes from step 3, with a warning naming checkpoints/5
    assert os.path.isdir(os.path.join(workdir, "checkpoints.damaged", "5"))
    assert_same_run(workdir, uninterrupted)


def test_every_checkpoint_damaged_is_an_error_naming_them(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "ours_h", epochs=EPOCHS)
    workdir = str(tmp_path / "run")
    train(cfg, workdir, max_steps=3)
    flip_byte(largest_file(os.path.join(workdir, "checkpoints", "3")))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints can be restored:\n  .*checkpoints/3: "):
        train(cfg, workdir)


def test_a_second_run_into_a_busy_folder_fails_naming_the_holder(tiny_records, tmp_path):
    cfg = tiny_config(tiny_records, "ours_h", epochs=1)
    workdir = str(tmp_path / "run")
    with workdir_lock(workdir):  # another run holds the folder (flock: per open file, so this process counts too)
        with pytest.raises(WorkdirBusy, match=rf"{workdir} is in use by another run \(pid {os.getpid()} on "):
            train(cfg, workdir)
        assert not os.path.exists(os.path.join(workdir, "config.json"))
    train(cfg, workdir)  # free again once the holder is done


def test_a_killed_run_leaves_no_lock(tiny_records, tmp_path):
    workdir = str(tmp_path / "run")
    assert run_training(tiny_records, workdir, "checkpoint_saved") == -signal.SIGKILL
    with workdir_lock(workdir):
        pass


def test_the_best_epochs_checkpoint_outlives_newer_ones_and_reading_it_deletes_nothing(tiny_records, tmp_path):
    """One checkpoint an epoch; retention keeps the newest two and the best epoch's, however old. Opening the
    folder to read (evaluation, the report) must not apply retention (it once deleted the best checkpoint)."""
    from dyngap_jax.train import evaluate_checkpoint

    workdir = str(tmp_path / "run")
    s = train(tiny_config(tiny_records, "concat", epochs=8), workdir)
    steps = Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
    best = s["best"]["step"]
    assert steps[-2:] == [21, 24] and best in steps and len(steps) <= 3
    for _ in range(2):
        step, res = evaluate_checkpoint(None, workdir, "test", "best")
        assert step == best and res["acc"] == pytest.approx(s["best"]["test"]["acc"])
    reader = Checkpointer(os.path.join(workdir, "checkpoints"))  # keep_checkpoints' default, opened and closed
    reader.close()
    assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == steps


FIXTURE = os.path.join(HERE, "fixtures", "run_before_methods")


def test_a_run_folder_written_before_the_method_interface_evaluates_and_resumes_exactly(tiny_records, tmp_path):
    """``tests/fixtures/run_before_methods``: tiny_config(ours_lb, 2 epochs, warm start) stopped at step 4 by the code
    before the method interface (commit 4a29d94): its checkpoints (a train state without ``method_state``, the alpha
    step's state at the top of the loop's JSON) evaluate, and resume to what this code's own run gives."""
    import shutil

    from dyngap_jax.train import LoopState, evaluate_checkpoint

    workdir = str(tmp_path / "old")
    shutil.copytree(FIXTURE, workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        recorded = json.load(f)
    assert "balance" not in recorded and "preempt_signal" not in recorded["train"]
    recorded["data_dir"] = tiny_records  # the records it was trained on, made anew (the same bytes)
    # the system its options left to the defaults of their day (before issue 25): rho 1e-2, 20 power iterations
    # from a cold start; a recorded None now means the new defaults, so the run states the old ones to resume exactly
    recorded["alpha"]["hypergrad"]["options"].update({"damping": 1e-2, "power_tol": 0.0})
    with open(path, "w") as f:
        json.dump(recorded, f)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    saved = ckpt.restore_extra(4)
    ckpt.close()
    assert "outer_iter" in saved and "parts" not in saved
    loop = LoopState.from_json(saved)
    assert (loop.epoch, loop.step_in_epoch, loop.best_step) == (1, 1, 3)
    assert loop.parts["alpha"]["evaluated"] and len(loop.parts["alpha"]["log"]) == 1  # epoch 2's first alpha step
    step, res = evaluate_checkpoint(None, workdir, "validation", "best")
    assert step == 3
    for k, v in loop.best["validation"].items():
        assert res[k] == pytest.approx(v, abs=1e-6), k
    cfg = tiny_config(tiny_records, "ours_lb", epochs=2)
    with cfg.unlocked():
        cfg.alpha.hypergrad.warm_start = True
        cfg.alpha.hypergrad.loop = "device"  # the old code's solver loops (host-driven ones round otherwise)
        # the old code's system (before issue 25's defaults): rho 1e-2, 20 power iterations from a cold start
        cfg.alpha.hypergrad.warm_power = cfg.alpha.hypergrad.reuse_lambda = False
        cfg.alpha.hypergrad.options.update({"damping": 1e-2, "power_tol": 0.0})
    resumed = train(cfg, workdir)
    fresh = train(cfg, str(tmp_path / "fresh"))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    # The old code drew the power iteration's random start a leaf at a time (optax's tree_random_like), the code
    # since in one draw (a threefry loop a leaf cost the ResNet pair ~10 s of compilation): after its 20
    # iterations |lambda|_max, so the damping, differs by ~2e-4 (relative), which moves alpha by ~1e-4 and the
    # solve's iteration counts by a few. Everything else of the resume is as exact as before.
    solve = ("hypergrad_iterations", "hypergrad_iterations_max", "hypergrad_hvps", "hypergrad_residual",
             "hypergrad_residual_max", "hypergrad_hypergradient")
    for ha, hb in zip(resumed["history"], fresh["history"]):
        # epoch 1 is the old code's record: it lacks only the diagnostics added since (issue 25's power iteration)
        assert set(hb) - set(ha) <= {"hypergrad_power_iterations", "hypergrad_lambda_max"} and set(ha) <= set(hb)
        for k in ha:
            if k.endswith(("iterations", "iterations_max", "hvps")):
                assert abs(ha[k] - hb[k]) <= 0.1 * hb[k], k
            elif k in solve:  # the residual within the solve's tolerance; the value within the step's accuracy
                assert (ha[k] <= 1e-3) if "residual" in k else abs(ha[k] - hb[k]) <= 0.02 * abs(hb[k]), k
            else:
                np.testing.assert_allclose(ha[k], hb[k], rtol=1e-3 if k == "hypergrad_damping" else 3e-4, err_msg=k)
    np.testing.assert_allclose(resumed["final_alpha"], fresh["final_alpha"], rtol=3e-4)
    assert [resumed["alpha_steps"][k] for k in ("count", "converged", "skipped")] == \
        [fresh["alpha_steps"][k] for k in ("count", "converged", "skipped")]
