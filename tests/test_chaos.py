"""scripts.chaos on a short config: killed and preempted again and again (at random moments and at the named places),
the run ends exactly as the uninterrupted one."""
import os
import subprocess
import sys

from tiny_data import make_tiny_records

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_chaos_kills_leave_the_result_of_an_uninterrupted_run(tmp_path):
    data = make_tiny_records(str(tmp_path / "rec"))
    # scripts.train as a user runs it (exit 75 when preempted); each start loads its executables from the session's
    # compilation cache (conftest, $DYNGAP_COMPILATION_CACHE), as a resumed run does from its own
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]), DYNGAP_TINY_RECORDS=data)
    train = [sys.executable, "-m", "scripts.train", "--config", os.path.join(HERE, "tiny_run_config.py:ours_lb/3"),
             "--config.progress=False"]
    proc = subprocess.run([sys.executable, "-m", "scripts.chaos", "--kills=5", "--seed=1", f"--out_dir={tmp_path / 'chaos'}",
                           "--", *train], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    starts = [line for line in lines if line.startswith("start ")]
    assert sum(": killed" in line or ": preempted" in line for line in starts) >= 3, proc.stdout
    assert any(": preempted (SIGTERM" in line for line in starts), proc.stdout  # a preemption among them
    assert "summary equal to the uninterrupted run" in lines[-1], proc.stdout
