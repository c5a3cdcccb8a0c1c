"""The paper's comparison grid over seeds, and its tables and figures (``scripts/report.py``).

``run_grid`` trains (or collects, or resumes) one run per method and seed; ``write_report`` turns
the summaries into Markdown tables in the paper's forms — Table 1 (every method: test ACC, mAP,
macro-F1 as mean ± std over seeds), Table 3 (ablation of contrastive learning and dynamic
integration: fused and per-modality mAP and the gap), Table 4 (integration strategies: fused and
per-modality accuracy), each where the report holds one of its methods — and PNGs: the alpha
trajectories of the learned and the authors' methods (:data:`ALPHA_FIGURE`) beside 1 - exp(-1/t)
(Figure 3) and the modality gap (Figure 2: each modality's L2-normalised test features projected
to 2-D along the centroids' direction and the leading principal component, with the distance
between the centroids), for ``concat`` and ``ours_lb``.
Every number is on the test split at the epoch chosen on validation. Table 1 also gives the
modality-gap distance (Liang et al. 2022: the distance between the modalities' centroids of
L2-normalised features; unimodal runs have none).
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from dyngap_jax import metrics
from dyngap_jax.io import atomic_write_text, new_figure, save_figure, write_json
from dyngap_jax.train.config import ConfigError, validate
from dyngap_jax.train.evaluation import predict_checkpoint
from dyngap_jax.train.loop import train
from dyngap_jax.train.workdir import check_config

FIXED = ("concat", "constant:0.0", "constant:0.5", "constant:1.0", "stepwise:0.0", "stepwise:1.0", "stepwise:0.05",
         "stepwise:0.95", "ours_h", "ours_lb")
# the same run under two names: alpha = 0 throughout is concatenation fusion with L_CLS alone
ALIASES = {"constant:0.0": "concat"}
TABLE4 = (("constant:0.0", "Constant 0"), ("constant:0.5", "Constant 0.5"), ("constant:1.0", "Constant 1"),
          ("stepwise:0.0", "h(0)"), ("stepwise:1.0", "h(1)"), ("stepwise:0.05", "h(0.05)"),
          ("stepwise:0.95", "h(0.95)"), ("ours_h", "Ours-H"), ("ours_lb", "Ours-LB"))
TABLE3 = (("concat", "no", "no"), ("constant:0.5", "yes", "no"), ("ours_h", "yes", "yes (heuristic)"),
          ("ours_lb", "yes", "yes (learned)"))
METRIC_NAMES = {"acc": "ACC", "map": "mAP", "f1": "macro-F1"}


# methods a report may add to the paper's grid (--methods): the authors' alpha step in our recipe, their whole
# released recipe (learned, and their fitted polynomial), one alpha per pair, and the field's balancing methods
EXTRA = ("lfm_code", "authors_learned", "authors_fitted", "ours_lb_vector", "ogm_ge", "mmpareto", "agm", "pmr",
         "gblending", "mla", "mslr")


def grid(modalities: Sequence[str]) -> list[str]:
    """The methods the paper compares: each modality alone, then :data:`FIXED`."""
    return [f"unimodal:{m}" for m in modalities] + list(FIXED)


def allowed(modalities: Sequence[str]) -> list[str]:
    """What ``--methods`` may name: the grid and :data:`EXTRA`."""
    return grid(modalities) + list(EXTRA)


def label(method: str) -> str:
    name, _, value = method.partition(":")
    return {"unimodal": f"{value} only", "concat": "concat (alpha = 0)", "constant": f"constant alpha = {value}",
            "stepwise": f"stepwise h({value})", "ours_h": "Ours-H (1 - exp(-1/t))",
            "ours_lb": "Ours-LB (learned)", "lfm_code": "the authors' alpha step (H g, JS alignment) in the paper's recipe",
            "authors_learned": "the authors' released recipe, learned alpha",
            "authors_fitted": "the authors' released recipe, fitted polynomial alpha",
            "ours_lb_vector": "Ours-LB, one alpha per pair", "ogm_ge": "OGM-GE (Peng et al., 2022)",
            "mmpareto": "MMPareto (Wei & Hu, 2024)", "agm": "AGM (Li et al., 2023)", "pmr": "PMR (Fan et al., 2023)",
            "gblending": "G-Blending (Wang et al., 2020)", "mla": "MLA (Zhang et al., 2024)",
            "mslr": "MSLR (Yao & Mihalcea, 2022)"}.get(name, method)


def _safe(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", method)


def run_dir(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, _safe(method), f"seed{seed}")


def _finished(cfg, wd: str):
    """The run's summary if ``wd`` holds a finished run of exactly this config (else None)."""
    summary, config = os.path.join(wd, "summary.json"), os.path.join(wd, "config.json")
    if not (os.path.exists(summary) and os.path.exists(config)):
        return None
    try:
        check_config(validate(cfg)[0], wd)  # the config, and the defaults it left to the code (defaults.json)
    except ConfigError:
        return None  # train() will refuse the workdir with the differing fields named
    with open(summary) as f:
        return json.load(f)


def run_grid(make_config: Callable[[str], object], seeds: Sequence[int], workdir: str,
             methods: Sequence[str] | None = None) -> dict[str, dict[int, dict]]:
    """``{method: {seed: summary}}``: each run collected from its finished workdir, resumed, or trained.

    ``make_config(method)`` returns the run's ConfigDict (its ``seed`` is set here). Runs live in
    ``workdir/<method>/seed<k>``; an alias (``constant:0.0`` = ``concat``) shares its target's runs.
    """
    if not seeds:
        raise ValueError("report: give at least one seed")
    methods = list(methods) if methods is not None else grid(list(make_config("concat").model.modalities))
    todo = [(m, s) for m in methods for s in seeds]

    def config_of(method, seed):
        target = ALIASES.get(method, method) if ALIASES.get(method) in methods else method
        cfg = make_config(target)
        with cfg.unlocked():
            cfg.seed = int(seed)
        return target, cfg

    for method, seed in todo:  # every run's config is checked before the first one trains
        validate(config_of(method, seed)[1])
    results: dict[str, dict[int, dict]] = {}
    t0 = time.time()
    for i, (method, seed) in enumerate(todo):
        target, cfg = config_of(method, seed)
        wd = run_dir(workdir, target, seed)
        summary = _finished(cfg, wd)
        state = "collected"
        if summary is None:
            summary, state = train(cfg, wd), "trained"
        results.setdefault(method, {})[int(seed)] = summary
        print(f"report: run {i + 1}/{len(todo)} {method} seed {seed} {state} ({time.time() - t0:.0f} s so far)", flush=True)
    return results


# --------------------------------------------------------------------------- tables


def _values(runs: Mapping[int, dict], key: str, split: str = "test") -> np.ndarray:
    return np.asarray([r["best"][split][key] for r in runs.values() if key in r["best"][split]], np.float64)


def _pm(values: np.ndarray) -> str:
    if values.size == 0:
        return "–"
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{100 * values.mean():.2f} ± {100 * std:.2f}"


def table1(results, metric_keys=("acc", "map", "f1"), modalities=()) -> str:
    """Every method: the fused metrics, each modality's accuracy and the gap (accuracy), the modality-gap distance,
    the final alpha (a balancing method, which has none: –)."""
    head = ("| method | " + " | ".join(METRIC_NAMES[k] for k in metric_keys)
            + "".join(f" | {m} ACC" for m in modalities) + (" | gap (ACC)" if modalities else "")
            + " | modality-gap distance | final alpha |")
    lines = [head, "|---|" + "---|" * (len(metric_keys) + len(modalities) + (3 if modalities else 2))]
    for method, runs in results.items():
        alpha = [np.mean(r["final_alpha"]) for r in runs.values() if r.get("final_alpha") is not None]
        cells = [_pm(_values(runs, k)) for k in metric_keys] + [_pm(_values(runs, f"acc/{m}")) for m in modalities]
        if modalities:
            cells.append(_pm(_values(runs, "gap_acc")))
        dist = _values(runs, "modality_gap")
        dist_cell = "–" if dist.size == 0 else f"{dist.mean():.3f} ± {dist.std(ddof=1) if dist.size > 1 else 0.0:.3f}"
        alpha_cell = f"{np.mean(alpha):.3f}" if alpha else "–"
        lines.append(f"| {label(method)} | " + " | ".join(cells) + f" | {dist_cell} | {alpha_cell} |")
    return "\n".join(lines)


def table3(results, modalities, metric: str = "map") -> str:
    name = METRIC_NAMES[metric]
    head = (f"| CL | DI | method | fused {name} | " + " | ".join(f"{m} {name}" for m in modalities)
            + f" | gap ({name}) |")
    lines = [head, "|---|---|---|" + "---|" * (len(modalities) + 2)]
    for method, cl, di in TABLE3:
        if method not in results:
            continue
        runs = results[method]
        cells = [_pm(_values(runs, metric))] + [_pm(_values(runs, f"{metric}/{m}")) for m in modalities]
        lines.append(f"| {cl} | {di} | {label(method)} | " + " | ".join(cells) + f" | {_pm(_values(runs, f'gap_{metric}'))} |")
    return "\n".join(lines)


def table4(results, modalities, metric: str = "acc") -> str:
    cols = [(m, lab) for m, lab in TABLE4 if m in results]
    lines = ["| modality | " + " | ".join(lab for _, lab in cols) + " |", "|---|" + "---|" * len(cols)]
    rows = [("fused", metric)] + [(m, f"{metric}/{m}") for m in modalities] + [("gap", f"gap_{metric}")]
    for row, key in rows:
        lines.append(f"| {row} | " + " | ".join(_pm(_values(results[m], key)) for m, _ in cols) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


# the methods whose alpha is learned or follows the authors' schedule: Figure 3 draws each one the report holds
ALPHA_FIGURE = ("ours_lb", "ours_lb_vector", "lfm_code", "authors_learned", "authors_fitted")


def plot_alpha(results, path: str) -> dict[str, np.ndarray]:
    """Figure 3: the alpha per epoch of each :data:`ALPHA_FIGURE` method in ``results`` (each seed faint, their
    mean bold; a vector alpha's mean over pairs) beside 1 - exp(-1/t). The x axis is the epoch where every run
    has the same length, else the fraction of its run. Returns ``{method: mean curve}`` as drawn."""
    fig, ax = new_figure(figsize=(5.5, 3.8))
    drawn = {}
    lengths = {len(r["history"]) for m in ALPHA_FIGURE for r in results.get(m, {}).values()}
    by_epoch = len(lengths) == 1
    x_of = (lambda n: np.arange(1, n + 1)) if by_epoch else (lambda n: np.arange(1, n + 1) / n)
    for i, method in enumerate(m for m in ALPHA_FIGURE if m in results):
        color = f"C{i}"
        curves = [np.asarray([np.mean(h["alpha"]) for h in r["history"]]) for r in results[method].values()]
        for c in curves:
            ax.plot(x_of(len(c)), c, "-", color=color, alpha=0.35, lw=1)
        n = min(len(c) for c in curves)
        drawn[method] = np.mean([c[:n] for c in curves], 0)
        ax.plot(x_of(n), drawn[method], "o-" if n <= 40 else "-", ms=4, lw=2, color=color,
                label=f"{label(method)} (mean of {len(curves)} seed{'s' * (len(curves) > 1)})")
    if drawn:
        n = max(lengths)
        t = np.arange(1, n + 1)
        ax.plot(x_of(n), 1 - np.exp(-1.0 / t), "--", color="gray", label="1 - exp(-1/t) (Ours-H)")
    ax.set_xlabel("epoch" if by_epoch else "epoch / total epochs")
    ax.set_ylabel("alpha")
    ax.set_ylim(-0.05, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("alpha during training (Figure 3)")
    save_figure(fig, path)
    return drawn


def gap_projection(features: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Each modality's L2-normalised features in a 2-D basis that shows the gap, and the centroid distances.

    The first axes span the modality centroids' differences (for two modalities: the line through
    both centroids, so their distance on the plot is their true distance); the remaining axis is
    the leading principal component of the features with those directions removed.
    """
    names = list(features)
    dims = {features[m].shape[-1] for m in names}
    if len(dims) != 1:
        raise ValueError(f"modality gap: the modalities' features have different widths {sorted(dims)}; "
                         "set config.model.projection_dim to compare them in one space")
    z = {m: features[m] / np.maximum(np.linalg.norm(features[m], axis=-1, keepdims=True), 1e-12) for m in names}
    stacked = np.concatenate([z[m] for m in names])
    mean = stacked.mean(0)
    cents = np.stack([z[m].mean(0) for m in names]) - mean
    _, sv, vt = np.linalg.svd(cents, full_matrices=False)
    basis = [v for v, s_ in zip(vt, sv) if s_ > 1e-9 * max(sv.max(), 1e-30)][:2]
    resid = stacked - mean
    for b in basis:
        resid = resid - np.outer(resid @ b, b)
    _, _, pc = np.linalg.svd(resid, full_matrices=False)
    basis = np.stack((basis + list(pc))[:2])
    return {m: (z[m] - mean) @ basis.T for m in names}, metrics.modality_gap_distance(features, names)


def plot_modality_gap(make_config, workdir: str, seed: int, path: str, methods=("concat", "ours_lb")) -> dict:
    """Figure 2 for each method's ``seed`` run (best checkpoint, test split); returns the centroid distances."""
    fig, axes = new_figure(1, len(methods), figsize=(4.5 * len(methods), 4), squeeze=False)
    out = {}
    for ax, method in zip(axes[0], methods):
        cfg = make_config(method)
        with cfg.unlocked():
            cfg.seed = int(seed)
        _, _, feats, _ = predict_checkpoint(cfg, run_dir(workdir, method, seed), "test")
        proj, dist = gap_projection(feats)
        out[method] = dist
        for m, p in proj.items():
            pts = ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.4, label=m)
            c = p.mean(0)
            ax.scatter([c[0]], [c[1]], s=120, marker="X", color=pts.get_facecolor()[0], edgecolor="black")
        cents = [p.mean(0) for p in proj.values()]
        for i in range(len(cents)):
            for j in range(i + 1, len(cents)):
                ax.plot([cents[i][0], cents[j][0]], [cents[i][1], cents[j][1]], "k--", lw=1)
        ax.set_title(f"{label(method)}\ncentroid distance {dist['mean']:.3f}")
        ax.legend(markerscale=2)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("modality gap (Figure 2): normalised test features; x: the centroids' direction", y=1.04)
    save_figure(fig, path)
    return out


# --------------------------------------------------------------------------- the report


def epochs_text(results) -> str:
    """How long the runs trained, read from their histories: "10 epochs", or the most common length and the
    methods that trained another ("10 epochs (200: authors_fitted, authors_learned)")."""
    lengths: dict[int, list[str]] = {}
    for method, runs in results.items():
        for n in sorted({len(r["history"]) for r in runs.values()}):
            lengths.setdefault(n, []).append(method)
    if not lengths:
        return "no runs"
    common = max(lengths, key=lambda n: (len(lengths[n]), n))
    others = "; ".join(f"{n}: {', '.join(ms)}" for n, ms in sorted(lengths.items()) if n != common)
    return f"{common} epochs" + (f" ({others})" if others else "")


def write_report(results, make_config, workdir: str, out_dir: str, *, title: str, command: str = "",
                 gap_seed: int | None = None, figure_prefix: str = "") -> str:
    """Tables and figures into ``out_dir/<prefix>report.md`` (+ PNGs); returns the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    modalities = list(make_config("concat").model.modalities)
    seeds = sorted({s for runs in results.values() for s in runs})
    md = [f"# {title}", "",
          f"Seeds {seeds}, {epochs_text(results)}, modalities {modalities}. Test split at the epoch chosen on "
          "validation accuracy; mean ± std (sample std) over seeds, in %."]
    if command:
        md += ["", "Regenerate:", "", "```", command, "```"]
    md += ["", "## Table 1: every method", "", table1(results, modalities=modalities), ""]
    if any(m in results for m, _, _ in TABLE3):
        md += ["## Table 3: ablation (CL: contrastive learning, DI: dynamic integration)", "",
               table3(results, modalities), ""]
    if any(m in results for m, _ in TABLE4):
        md += ["## Table 4: integration strategies (accuracy)", "", table4(results, modalities), ""]
    alpha_png = f"{figure_prefix}alpha.png"
    if any(m in results for m in ALPHA_FIGURE):
        plot_alpha(results, os.path.join(out_dir, alpha_png))
        md += ["## Figure 3: alpha during training", "", f"![alpha]({alpha_png})", ""]
    if gap_seed is not None and {"concat", "ours_lb"} <= set(results) and len(modalities) > 1:
        gap_png = f"{figure_prefix}modality_gap.png"
        try:
            dists = plot_modality_gap(make_config, workdir, gap_seed, os.path.join(out_dir, gap_png))
        except ValueError as e:  # features of different widths: no common space to draw
            md += ["## Figure 2: modality gap", "", f"Not drawn: {e}", ""]
        else:
            md += ["## Figure 2: modality gap", "",
                   f"Seed {gap_seed}, best checkpoints, test split. Mean centroid distance: "
                   + ", ".join(f"{label(m)} {d['mean']:.3f}" for m, d in dists.items()) + ".", "",
                   f"![modality gap]({gap_png})", ""]
    text = "\n".join(md) + "\n"
    atomic_write_text(os.path.join(out_dir, f"{figure_prefix}report.md"), text)
    saved = {m: {str(s): {"best": r["best"], "final_alpha": r.get("final_alpha"),
                          "alpha": [h["alpha"] for h in r["history"] if "alpha" in h]}
                 for s, r in runs.items()} for m, runs in results.items()}
    write_json(os.path.join(out_dir, f"{figure_prefix}results.json"), saved, indent=None)
    return text
