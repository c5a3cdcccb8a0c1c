"""The error-budget study (issue 25, part 1) on the tiny two-view MLP: its large-sample reference against a dense
solve of the same system, its error bookkeeping against hand computation."""
import json
import os

import numpy as np
import pytest

from tiny_data import make_tiny_records, tiny_config

from dyngap_jax.studies import frontier
from dyngap_jax.studies.estimator import Estimator
from dyngap_jax.train.evaluation import load_run_state


def test_errors_by_hand():
    ref = np.array([2.0])
    est, exact = [np.array([2.5]), np.array([1.0])], [np.array([2.0]), np.array([1.5])]
    e = frontier.errors(est, exact, ref)
    np.testing.assert_allclose(e["solver"], np.sqrt((0.5**2 + 0.5**2) / 2) / 2.0)
    np.testing.assert_allclose(e["sampling"], np.sqrt((0.0 + 0.5**2) / 2) / 2.0)
    np.testing.assert_allclose(e["total"], np.sqrt((0.5**2 + 1.0**2) / 2) / 2.0)
    assert e["sign"] == 1.0
    assert frontier.errors([np.array([-1.0])], [np.array([1.0])], ref)["sign"] == 0.0


def test_spec_rejects_bad_values():
    for bad, field in (({"pairs": 1}, "pairs"), ({"budgets": (0,)}, "budgets"), ({"reference_inner": 8}, "reference_inner")):
        with pytest.raises(ValueError, match=field):
            frontier.FrontierSpec(**bad).validate()


def test_frontier_on_tiny_mlp(tmp_path):
    records = make_tiny_records(str(tmp_path / "rec"))
    cfg = tiny_config(records)
    spec = frontier.FrontierSpec(batch_sizes=(8,), pairs=2, budgets=(1, 100), corrected_budgets=(100,),
                                 reference_inner=48, other_dampings=(0.5,))
    out = str(tmp_path / "out")
    results = frontier.run_frontier(cfg, str(tmp_path / "run"), out, [4], spec)
    res = results["4"]
    ref = res["reference"]
    assert ref["inner"] == 48 and ref["outer"] == 24 and ref["info"]["converged"]
    # the large-sample reference is the stated system on the big batch: a dense solve of it agrees
    run, state, _ = load_run_state(cfg, str(tmp_path / "run"), "latest")
    big = (frontier._large_batch(run, "train", 48, 789), frontier._large_batch(run, "validation", 24, 790))
    dense = Estimator(run.model, run.method.mm_loss, state, "dense", {"operator": "normal"}, "float64")
    np.testing.assert_allclose(ref["value"], dense(*big, repeats=0, dynamic={"damping": np.float64(ref["info"]["damping"])})[
        "value"], rtol=1e-6)
    # another stated system on the same data: its own value (a dense solve of it), set against the config's
    (other,) = res["other_dampings"]
    lam = float(ref["info"]["lambda_max"])  # the same power iteration on the same data: the same |lambda|_max
    dense_other = dense(*big, repeats=0, dynamic={"damping": np.float64((0.5 * lam) ** 2)})
    np.testing.assert_allclose(other["value"], dense_other["value"], rtol=1e-6)
    np.testing.assert_allclose(other["difference"], np.linalg.norm(np.subtract(other["value"], ref["value"]))
                               / np.linalg.norm(ref["value"]), rtol=1e-9)
    assert other["difference"] > 1e-3
    rows = {(r["estimate"], r["budget"]): r for r in res["rows"]}
    assert set(rows) == {("primal", "config (tol 0.001)"), ("primal", "1 iterations"), ("primal", "100 iterations"),
                         ("corrected", "100 iterations")}
    # converged estimates carry no solver error beyond float32 rounding; one iteration carries much more
    assert rows[("primal", "100 iterations")]["solver"] < 5e-3
    assert rows[("corrected", "100 iterations")]["solver"] < 5e-3
    assert rows[("primal", "1 iterations")]["solver"] > 10 * rows[("primal", "100 iterations")]["solver"]
    for r in res["rows"]:
        # every row shares its batch's sampling error; RMS obeys the triangle inequality
        assert r["sampling"] == res["rows"][0]["sampling"] > 0
        assert r["total"] <= r["solver"] + r["sampling"] + 1e-12
        assert r["hvps"] > 0 and r["example_hvps"] == r["hvps"] * 8
    # the corrected estimate's dual solve runs beside the primal: more HVPs an iteration (where it stops may differ)
    per_iteration = {k: rows[(k, "100 iterations")]["hvps"] / rows[(k, "100 iterations")]["iterations"]
                     for k in ("primal", "corrected")}
    assert per_iteration["corrected"] > 1.5 * per_iteration["primal"], per_iteration
    md = open(os.path.join(out, "results.md")).read()
    assert "| 8 + 8 | corrected | 100 iterations |" in md and "The same data at rho 0.5" in md
    assert os.path.getsize(os.path.join(out, "frontier_step4.png")) > 1000
    assert json.load(open(os.path.join(out, "results.json")))["4"]["reference"]["inner"] == 48
