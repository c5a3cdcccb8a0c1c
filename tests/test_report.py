"""The report end to end on a tiny generated data set: two seeds, two epochs, every method and metric."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny_data import make_tiny_records, tiny_config

from dyngap_jax.studies import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


def test_report_grid_two_seeds(tiny_records, tmp_path):
    make = lambda method: tiny_config(tiny_records, method, epochs=2)
    methods = report.grid(["a", "b"])
    assert methods[:2] == ["unimodal:a", "unimodal:b"] and len(methods) == 12
    work, out = str(tmp_path / "runs"), str(tmp_path / "out")
    results = report.run_grid(make, [0, 1], work, methods)
    assert set(results) == set(methods) and all(set(r) == {0, 1} for r in results.values())
    # constant 0 is concat: the same runs, not trained twice
    assert not os.path.exists(os.path.join(work, "constant_0.0"))
    assert results["constant:0.0"][1]["best"] == results["concat"][1]["best"]
    # seeds give different runs
    assert results["ours_lb"][0]["history"] != results["ours_lb"][1]["history"]
    text = report.write_report(results, make, work, out, title="tiny", command="python scripts/report.py ...", gap_seed=0)
    table1 = text.split("## Table 1")[1].split("## Table 3")[0]
    for m in methods:
        assert f"| {report.label(m)} |" in table1
    for metric in ("ACC", "mAP", "macro-F1"):
        assert metric in table1
    # mean ± std over the two seeds, from the runs' own test metrics
    accs = np.asarray([results["ours_h"][s]["best"]["test"]["acc"] for s in (0, 1)])
    assert f"{100 * accs.mean():.2f} ± {100 * accs.std(ddof=1):.2f}" in table1.split(f"| {report.label('ours_h')} |")[1].split("\n")[0]
    table3 = text.split("## Table 3")[1].split("## Table 4")[0]
    for m in ("concat", "constant:0.5", "ours_h", "ours_lb"):
        assert report.label(m) in table3
    assert "a mAP" in table3 and "b mAP" in table3 and "gap (mAP)" in table3
    table4 = text.split("## Table 4")[1].split("## Figure")[0]
    for _, col in report.TABLE4:
        assert col in table4
    for row in ("| fused |", "| a |", "| b |", "| gap |"):
        assert row in table4
    # every cell filled (a unimodal run has no modality-gap distance)
    assert "–" not in table3 + table4
    assert all("–" not in line for line in table1.splitlines() if "only" not in line)
    assert "modality-gap distance" in table1
    for png in ("alpha.png", "modality_gap.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved) == set(methods)
    # a second call collects the finished runs (no training: the summaries are read back, not rewritten)
    summary = os.path.join(report.run_dir(work, "ours_lb", 0), "summary.json")
    stamp = os.stat(summary).st_mtime_ns
    again = report.run_grid(make, [0, 1], work, ["ours_lb"])
    assert again["ours_lb"][0]["best"] == results["ours_lb"][0]["best"]
    assert os.stat(summary).st_mtime_ns == stamp


def test_the_balancing_methods_take_their_rows_in_table_1(tiny_records, tmp_path):
    """OGM-GE and MMPareto beside concat: each modality's accuracy and the gap in their rows, no alpha (–)."""
    make = lambda method: tiny_config(tiny_records, method, epochs=2)
    methods = ["concat", "ogm_ge", "mmpareto"]
    assert set(methods) <= set(report.allowed(["a", "b"]))
    work = str(tmp_path / "runs")
    results = report.run_grid(make, [0], work, methods)
    text = report.write_report(results, make, work, str(tmp_path / "out"), title="tiny")
    table1 = text.split("## Table 1")[1].split("## Table 3")[0]
    assert "| a ACC | b ACC | gap (ACC) |" in table1
    for m in methods:
        row = table1.split(f"| {report.label(m)} |")[1].split("\n")[0]
        best = results[m][0]["best"]["test"]
        assert f"{100 * best['acc/a']:.2f} ± 0.00 | {100 * best['acc/b']:.2f} ± 0.00" in row
        assert row.rstrip().endswith("| – |") == (m != "concat")


def test_gap_projection_centroid_distance_matches_metric():
    rng = np.random.default_rng(0)
    feats = {"a": rng.standard_normal((50, 8)) + 2.0, "b": rng.standard_normal((50, 8)) - 1.0}
    proj, dist = report.gap_projection(feats)
    assert proj["a"].shape == (50, 2)
    za = feats["a"] / np.linalg.norm(feats["a"], axis=1, keepdims=True)
    zb = feats["b"] / np.linalg.norm(feats["b"], axis=1, keepdims=True)
    assert np.isclose(dist["mean"], np.linalg.norm(za.mean(0) - zb.mean(0)))
    # the plot's first axis is the centroids' direction: their distance on the plot is the true one
    assert np.isclose(np.linalg.norm(proj["a"].mean(0) - proj["b"].mean(0)), dist["mean"])
    with pytest.raises(ValueError, match="different widths"):
        report.gap_projection({"a": feats["a"], "b": feats["b"][:, :4]})


def test_script_flag_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "scripts.report", *a], capture_output=True, text=True)
    base = ["--workdir", "/nonexistent", "--out_dir", "/nonexistent"]
    proc = run("--config", "configs/none.py", *base)
    assert proc.returncode != 0 and "configs/none.py" in proc.stderr
    # overrides are the other scripts' --config.<field>=<value>: an unknown field is refused by name
    proc = run("--config", os.path.join(ROOT, "configs", "mfeat.py"), "--config.train.nonexistent=3", *base)
    assert proc.returncode != 0 and "nonexistent" in proc.stderr
    proc = run("--config", os.path.join(ROOT, "configs", "mfeat.py"), "--methods", "newton", *base)
    assert proc.returncode != 0 and "not in the grid" in proc.stderr


def test_overrides_reach_every_run_of_the_grid():
    from scripts.report import make_config_factory

    from configs import mfeat

    make = make_config_factory(mfeat.get_config, "{method}/fou+pix", {"train.num_epochs": 3,
                                                                       "alpha.hypergrad.options.maxiter": 50})
    for method in ("concat", "ours_h", "ours_lb"):
        cfg = make(method)
        assert cfg.method == method and cfg.train.num_epochs == 3 and cfg.alpha.hypergrad.options.maxiter == 50


def _summary(alphas, acc):
    """A finished run's summary as the loop writes it: a history of per-epoch alpha, the best epoch's metrics."""
    split = {"acc": acc, "map": acc, "f1": acc, "acc/a": acc / 2, "acc/b": acc / 3, "gap_acc": acc / 6,
             "modality_gap": 0.1}
    return {"history": [{"epoch": e + 1, "alpha": a} for e, a in enumerate(alphas)], "final_alpha": alphas[-1],
            "best": {"epoch": len(alphas), "validation": dict(split), "test": dict(split)}}


def test_a_report_of_runs_of_different_lengths_states_each_and_draws_the_authors_alpha(tmp_path):
    """The header states the epochs each run trained (not the config of concat's); Tables 3 and 4 appear only
    with their methods; Figure 3 draws the authors' and the learned methods' alpha, the mean over seeds."""
    make = lambda method: tiny_config(str(tmp_path / "unused"), method, epochs=10)
    rng = np.random.default_rng(0)
    fitted = {s: _summary(list(0.8 - 0.004 * np.arange(200) + 0.01 * rng.standard_normal(200)), 0.8) for s in (0, 1)}
    results = {"concat": {0: _summary([0.0] * 10, 0.85)},
               "authors_fitted": fitted,
               "authors_learned": {0: _summary([0.95] * 200, 0.7)},
               "mla": {0: _summary([0.0] * 12, 0.9)}}
    out = str(tmp_path / "out")
    text = report.write_report(results, make, str(tmp_path / "runs"), out, title="lengths")
    assert "Seeds [0, 1], 200 epochs (10: concat; 12: mla), modalities" in text
    assert "## Table 3" in text and "## Table 4" not in text  # concat is Table 3's first row; nothing of Table 4's
    assert os.path.getsize(os.path.join(out, "alpha.png")) > 1000
    drawn = report.plot_alpha(results, str(tmp_path / "alpha.png"))
    assert list(drawn) == ["authors_learned", "authors_fitted"]  # ALPHA_FIGURE's order; concat and MLA have none
    np.testing.assert_allclose(drawn["authors_fitted"], np.mean([[h["alpha"] for h in fitted[s]["history"]]
                                                                 for s in (0, 1)], 0))
    np.testing.assert_array_equal(drawn["authors_learned"], np.full(200, 0.95))
    # the balancing methods alone: Table 1, no Table 3 or 4, no Figure 3
    only = {"mla": results["mla"]}
    text = report.write_report(only, make, str(tmp_path / "runs"), str(tmp_path / "out2"), title="mla")
    assert "12 epochs, modalities" in text and "## Table 3" not in text and "## Table 4" not in text
    assert "Figure 3" not in text and not os.path.exists(str(tmp_path / "out2" / "alpha.png"))
