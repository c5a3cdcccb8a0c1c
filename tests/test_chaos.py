"""scripts.chaos on a short config: killed again and again (at random moments and at the named places), the run
ends exactly as the uninterrupted one."""
import os
import subprocess
import sys

from tiny_data import make_tiny_records

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_chaos_kills_leave_the_result_of_an_uninterrupted_run(tmp_path):
    data = make_tiny_records(str(tmp_path / "rec"))
    # each start loads its executables from the session's compilation cache (conftest), as a resumed run of the
    # entry points does from theirs; a start killed while writing an entry leaves one JAX reads as a miss
    train = ("import os, sys; from tiny_data import tiny_config; from dyngap_jax.train import train; "
             "from dyngap_jax.compilation import enable_persistent_cache; "
             "enable_persistent_cache(os.environ['DYNGAP_COMPILATION_CACHE']); "
             "train(tiny_config({data!r}, 'ours_lb', epochs=3), sys.argv[-1])").format(data=data)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "scripts.chaos", "--kills=5", "--seed=1", f"--out_dir={tmp_path / 'chaos'}",
                           "--", sys.executable, "-c", train], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum("killed" in line for line in lines if line.startswith("start ")) >= 3, proc.stdout
    assert "summary equal to the uninterrupted run" in lines[-1], proc.stdout
