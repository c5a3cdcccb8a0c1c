"""The hypergradient comparison on a tiny two-view MLP: its float64 CG reference agrees with `dense`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny_data import make_tiny_records, tiny_config

from dyngap_jax.methods.alpha_step import resolve_loop
from dyngap_jax.studies import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


@pytest.fixture(scope="module")
def trained(tiny_records, tmp_path_factory):
    """The tiny run trained to step 4, where the comparisons measure (trained once for the module's tests)."""
    from dyngap_jax.train import train

    workdir = str(tmp_path_factory.mktemp("run") / "run")
    train(tiny_config(tiny_records), workdir, max_steps=4)
    return workdir


def test_reference_agrees_with_dense_and_report_is_complete(tiny_records, trained, tmp_path):
    cfg = tiny_config(tiny_records)
    out = str(tmp_path / "out")
    results = compare.run_comparison(
        cfg, trained, out, [4], batches=2, reference=compare.Reference(damping=1e-2),
        sweep_budgets={"cg": (1, 30)}, methods=["cg (config)", "identity"])
    res = results["4"]
    checks = res["checks"]
    # the check of the reference: CG (float64, restarted) against the same system solved densely
    assert all(checks["reference_converged"])
    assert checks["reference_vs_dense"] < 1e-6
    rows = {r["name"]: r for r in res["rows"]}
    ref_name = next(n for n in rows if n.startswith("reference"))
    assert set(rows) == {ref_name, "dense (reference's system)", "dense (exact H^-1, undamped)", "cg (config)", "identity"}
    assert rows[ref_name]["rel_error"] == 0.0 and rows[ref_name]["sign_rate"] == 1.0
    dense = rows["dense (reference's system)"]
    assert dense["ok"] and len(dense["values"]) == 2
    # the undamped exact solve runs on the range of the (singular) Hessian: finite, and the
    # reference's damping visibly moves it (the point of reporting both)
    exact = rows["dense (exact H^-1, undamped)"]
    assert np.all(np.isfinite(exact["values"])) and exact["info"]["null_dimensions"] > 0
    # an approximation's error is measured against the reference on the same batch
    approx = rows["identity"]
    np.testing.assert_allclose(approx["rel_error"], abs(approx["values"][0] - rows[ref_name]["values"][0])
                               / abs(rows[ref_name]["values"][0]), rtol=1e-9)
    # truncated CG gets closer to the reference with more iterations (the sweep's point)
    (few, _, _), (many, err_many, _) = res["sweep"]["CG (the reference's system)"]
    assert many > few and err_many < res["sweep"]["CG (the reference's system)"][0][1]
    md = open(os.path.join(out, "results.md")).read()
    for name in rows:
        assert f"| {name} |" in md
    assert os.path.getsize(os.path.join(out, "sweep_step4.png")) > 1000
    assert json.load(open(os.path.join(out, "results.json")))["4"]["checks"]["n_params"] == checks["n_params"]
    with pytest.raises(ValueError, match="unknown methods"):
        compare.run_comparison(cfg, trained, out, [4], methods=["newton"], sweep_budgets=None)


def test_script_rejects_bad_points():
    proc = subprocess.run([sys.executable, "-m", "scripts.compare_hypergrads",
                           "--config", os.path.join(ROOT, "configs", "mfeat.py") + ":ours_lb", "--workdir", "/nonexistent",
                           "--out_dir", "/nonexistent", "--points", "ten"], capture_output=True, text=True)
    assert proc.returncode != 0 and "--points" in proc.stderr


def test_comparison_measures_what_the_training_alpha_step_applies(tiny_records):
    """The comparison's closures are the alpha step's: the same value on the same batches, state and key."""
    import jax

    from dyngap_jax.train import setup
    from dyngap_jax.studies.estimator import Estimator

    cfg = tiny_config(tiny_records)
    with cfg.unlocked():
        for m in cfg.model.modalities:
            cfg.model.encoders[m].dropout = 0.5  # the dropout key matters
    run = setup(cfg)
    state = run.create_train_state()
    state = state.replace(step=state.step + 5)
    _, _, alpha_step = run.compile_steps(state, donate=False)
    inner = next(iter(run.loader("train", train=True, epoch=3)))
    outer = next(iter(run.loader("validation", train=True, epoch=4)))
    method, mm_loss = run.method.estimator, run.method.mm_loss
    _, trained, _ = alpha_step(state, inner, outer)
    loop = resolve_loop(cfg.alpha.hypergrad.loop)  # where training's solver loops run (host-driven on a CPU)
    measured = Estimator(run.model, mm_loss, state, method.name, method.options(), loop=loop)(inner, outer, repeats=0)
    np.testing.assert_allclose(measured["value"], np.asarray(trained.value), rtol=1e-5)
    assert measured["info"]["iterations"] == float(trained.info["iterations"])
    # a different dropout key gives the alpha step a different value: dropout is active in it, so the agreement
    # above is the comparison's closures drawing the step's own masks from the state's key, not dropout left out
    # of both (an Estimator with a fixed key of its own would agree only if that key were the state's)
    _, other, _ = alpha_step(state.replace(rng=jax.random.PRNGKey(99)), inner, outer)
    assert not np.allclose(np.asarray(other.value), measured["value"], rtol=1e-3)


def test_the_training_default_meets_the_reference_of_its_own_system(tiny_records, trained, tmp_path):
    """The reference solves the system the config's CG states on each pair (its reported damping), in float64
    to 1e-10; the training default, solved to its 1e-3 tolerance in float32, is within 5 % with the right sign."""
    cfg = tiny_config(tiny_records)
    certified = "cg certified 0.05 (scalar_tol)"
    res = compare.run_comparison(cfg, trained, str(tmp_path / "out"), [4], batches=2,
                                 sweep_budgets=None, methods=["cg (config)", certified], dense_max_params=0)["4"]
    rows = {r["name"]: r for r in res["rows"]}
    config_row = rows["cg (config)"]
    assert config_row["ok"] and config_row["mean_rel_error"] <= 0.05 and config_row["sign_rate"] == 1.0
    # the certified stop on the same system: its bound met, and the float64 reference within it
    row = rows[certified]
    assert row["ok"] and row["info"]["bound_relative"] <= 0.05
    assert row["info"]["damping"] == pytest.approx(config_row["info"]["damping"], rel=1e-6)
    assert row["rel_error"] <= 0.05 and row["sign_rate"] == 1.0
    assert all(res["checks"]["reference_converged"])
    # the reference's damping is the one the config's solve reported (relative: rho |lambda|_max, per pair)
    assert res["checks"]["reference"]["damping"][0] == pytest.approx(config_row["info"]["damping"], rel=1e-12)
