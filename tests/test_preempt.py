"""Preemption: SIGTERM (or the configured SIGUSR1) makes a run finish its step, checkpoint, close its writers and exit
with status 75; the same command resumes to exactly the uninterrupted result (scripts.train, in a subprocess)."""
import os
import re
import subprocess
import sys

import pytest
from tiny_data import assert_same_run, make_tiny_records, tiny_config

from dyngap_jax import faults
from dyngap_jax.train import PREEMPTED_EXIT_STATUS, Checkpointer, LoopState, train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EPOCHS = 3


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_records, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    train(tiny_config(tiny_records, "ours_lb", epochs=EPOCHS), workdir)
    return workdir


def run_script(data_dir: str, workdir: str, fault: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    """``python -m scripts.train`` on the tiny config (learned alpha: its alpha step's state is checkpointed too)."""
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    env.update(PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]), DYNGAP_TINY_RECORDS=data_dir)
    if fault:
        env[faults.ENV] = fault
    cmd = [sys.executable, "-m", "scripts.train", "--config", os.path.join(HERE, f"tiny_run_config.py:ours_lb/{EPOCHS}"),
           "--workdir", workdir, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("fault,stops_at,extra", [
    ("train_step@4:SIGTERM", 4, ()),  # inside epoch 2: a checkpoint at the step, with the data iterators
    ("train_step@3:SIGTERM", 3, ()),  # the epoch's last step: the epoch ends (evaluated, checkpointed), then the run
    ("checkpoint_writing@2:SIGTERM", 7, ()),  # during epoch 2's checkpoint write: it completes, the next step stops
    ("train_step@2:SIGUSR1", 2, ("--config.train.preempt_signal=SIGUSR1",)),  # SLURM's --signal=USR1@<seconds>
])
def test_a_preempted_run_checkpoints_exits_75_and_resumes_to_the_uninterrupted_result(
        tiny_records, uninterrupted, tmp_path, fault, stops_at, extra):
    workdir = str(tmp_path / "run")
    proc = run_script(tiny_records, workdir, fault, *extra)
    assert proc.returncode == PREEMPTED_EXIT_STATUS, proc.stderr[-3000:]
    signal_name = fault.rsplit(":", 1)[1]
    assert f"preempted by {signal_name} at step {stops_at}: a checkpoint is saved in {workdir}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == stops_at
    loop = LoopState.from_json(ckpt.restore_extra(stops_at))
    assert loop.step == stops_at and loop.step_in_epoch == stops_at % 3 and "alpha" in loop.parts
    ckpt.close()
    again = run_script(tiny_records, workdir, None, *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(rf"resuming .* at step {stops_at} \(epoch {stops_at // 3 + 1}\)", again.stdout)
    assert_same_run(workdir, uninterrupted, EPOCHS)


def test_without_preemption_sigterm_kills_as_before(tiny_records, tmp_path):
    proc = run_script(tiny_records, str(tmp_path / "run"), "train_step@2:SIGTERM", "--config.train.preempt_signal=none")
    assert proc.returncode == -15


def test_the_fault_spec_names_what_is_wrong(monkeypatch):
    assert faults.parse("train_step@3:SIGTERM") == ("train_step", 3, "SIGTERM")
    assert faults.parse("checkpoint_saved") == ("checkpoint_saved", 1, "SIGKILL")
    monkeypatch.setenv(faults.ENV, "train_step@1:SIGHUP")
    with pytest.raises(ValueError, match=r"DYNGAP_FAULT='train_step@1:SIGHUP': unknown signal 'SIGHUP'"):
        faults.point("train_step")


def test_a_loaders_worker_processes_leave_preemption_to_the_training_process(tiny_records):
    """SLURM signals every process of a job step: grain's workers ignore the preemption signals (they die with the
    training process), so the run, not a loader error, decides what happens."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "loader_workers_run.py"), tiny_records], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WORKERS 1 ALIVE 1" in proc.stdout and "SERVED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
