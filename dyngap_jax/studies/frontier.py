"""The alpha step's error budget: solver error against sampling error, and total error against HVPs.

What an alpha step applies is an estimate of the hypergradient on one small (inner, outer) batch pair,
stopped after some Krylov iterations. Its error against what the step is meant to follow, the
hypergradient of the same damped system over much more data, has two parts:

* **sampling error**: the pair's converged solve (float64, to ``tol``) against the **large-sample
  reference**: the same method's system on a large train batch (inner) and the whole validation split
  (outer), in float64, converged;
* **solver error**: the step's estimate (at the run's precision, stopped after ``k`` iterations, or by
  the config's own rule) against its pair's converged solve of the system the estimate states (the
  damping its power iteration gave, in float64).

:func:`frontier_at` measures both for several alpha batch sizes and iteration budgets, over several
pairs each, for two estimators of the same system: the primal one the training step applies
(``-u^T x_k``, ``u = g_MM - g_CLS``) and the adjoint-corrected one of the certified stop
(``-(u^T x_k + y_k^T r_k)``, the dual run beside the primal: twice the HVPs an iteration, error the
product of the two solves' errors). Errors are root-mean-square over pairs, relative to the
reference's magnitude; HVPs are counted as the solver reports them (the power iteration, ``H g``
and the Hessian residual included), and ``example-HVPs`` (HVPs x the inner batch's examples) is the work
when an HVP's cost grows with the batch. The point is the trade the issue asks about: where the
sampling error dominates, iterations past it buy nothing, and a larger batch may buy more per HVP.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import numpy as np

from dyngap_jax.io import atomic_write_text, new_figure, save_figure
from dyngap_jax.methods.alpha_step import resolve_loop
from dyngap_jax.studies.compare import config_method, config_precision, draw_batches, draw_pairs, _lfm
from dyngap_jax.studies.estimator import Estimator
from dyngap_jax.train.evaluation import load_run_state
from dyngap_jax.train.loop import train
from dyngap_jax.train.setup import Run
from dyngap_jax import hypergrad


@dataclasses.dataclass(frozen=True)
class FrontierSpec:
    """What :func:`frontier_at` measures. ``reference_inner``: train examples in the large-sample reference
    (capped at the training split); its outer batch is the whole validation split. ``budgets``: CG
    iterations of the primal estimate; ``corrected_budgets``: of the adjoint-corrected one (empty: not run).
    ``tol``/``maxiter``: the converged solves' (the reference's and each pair's). ``other_dampings``: relative
    dampings rho of other systems whose large-sample reference is also solved, to set the config's damping
    against (how far another rho moves the value, beside how far the alpha batch moves it)."""

    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    pairs: int = 4
    budgets: tuple[int, ...] = (3, 10, 30, 100)
    corrected_budgets: tuple[int, ...] = (3, 10, 30)
    reference_inner: int = 1024
    tol: float = 1e-10
    maxiter: int = 10_000
    other_dampings: tuple[float, ...] = ()

    def validate(self) -> None:
        for name in ("batch_sizes", "budgets", "corrected_budgets"):
            values = getattr(self, name)
            if any(int(v) != v or v < 1 for v in values):
                raise ValueError(f"frontier: `{name}` must be positive integers, got {list(values)}")
        if not self.batch_sizes or not self.budgets:
            raise ValueError("frontier: `batch_sizes` and `budgets` need at least one value each")
        if self.pairs < 2:
            raise ValueError(f"frontier: `pairs` must be at least 2 (errors are spreads over pairs), got {self.pairs}")
        if any(not rho > 0 for rho in self.other_dampings):
            raise ValueError(f"frontier: `other_dampings` must be positive, got {list(self.other_dampings)}")
        if self.reference_inner < max(self.batch_sizes):
            raise ValueError(f"frontier: `reference_inner`={self.reference_inner} is smaller than the largest alpha "
                             f"batch {max(self.batch_sizes)}")


def _norm(x) -> float:
    return float(np.linalg.norm(np.ravel(np.asarray(x, np.float64))))


def errors(estimates: Sequence, exact: Sequence, reference) -> dict:
    """RMS over pairs of the solver error (estimate - pair's exact), the sampling error (pair's exact -
    reference) and the total (estimate - reference), each relative to ``|reference|``; and the rate at
    which the estimate's sign agrees with the reference's."""
    ref = np.asarray(reference, np.float64)
    scale = max(_norm(ref), 1e-300)
    rms = lambda diffs: float(np.sqrt(np.mean([_norm(d) ** 2 for d in diffs]))) / scale
    est = [np.asarray(e, np.float64) for e in estimates]
    ex = [np.asarray(e, np.float64) for e in exact]
    return {"solver": rms([e - x for e, x in zip(est, ex)]), "sampling": rms([x - ref for x in ex]),
            "total": rms([e - ref for e in est]),
            "sign": float(np.mean([np.all(np.sign(e) == np.sign(ref)) for e in est]))}


def _large_batch(run: Run, split: str, size: int, epoch: int) -> dict:
    """``size`` examples of ``split`` in one batch, as the alpha step's closures see them (augmented)."""
    return next(draw_batches(run, split, size, epoch))


def frontier_at(run: Run, state, spec: FrontierSpec = FrontierSpec(), log=print) -> dict:
    """Solver, sampling and total error of the run's alpha step for each batch size and budget at ``state``."""
    spec.validate()
    method = config_method(run)
    if not isinstance(method, hypergrad.CG) or method.operator != "normal":
        raise ValueError(f"frontier: the config's hypergradient method must be CG on the normal equations (the "
                         f"default exact step), got {method.name} {getattr(method, 'operator', '')}".rstrip())
    model, mm = run.model, _lfm(run).mm_loss
    precision, loop = config_precision(run), resolve_loop(run.cfg.alpha.hypergrad.loop)
    options = method.options()
    if options.get("krylov_precision") is not None:
        raise ValueError("frontier: the config's CG runs its iterations at a reduced precision (krylov_precision, "
                         "alpha.hypergrad.precision='refined'); measure the step at one precision")
    # the converged solves (the references' and each pair's) with a converged |lambda|_max for the references'
    # own dampings (a pair's exact solve takes its estimates' damping instead)
    converged = {**options, "tol": spec.tol, "maxiter": spec.maxiter, "restarts": 3, "scalar_tol": None,
                 "power_tol": 1e-4, "power_iters": 1000}
    manifest = run.manifest.splits
    inner_n = min(spec.reference_inner, manifest["train"]["num_examples"] - len(run.heldout))
    outer_n = manifest["validation"]["num_examples"]
    if max(spec.batch_sizes) > min(inner_n, outer_n):
        raise ValueError(f"frontier: alpha batch {max(spec.batch_sizes)} is larger than the training ({inner_n}) or "
                         f"validation ({outer_n}) examples available")
    log(f"frontier: large-sample reference on {inner_n} train + {outer_n} validation examples (float64)")
    big = (_large_batch(run, "train", inner_n, 789), _large_batch(run, "validation", outer_n, 790))
    ref = Estimator(model, mm, state, "cg", converged, "float64", loop=loop)(*big, repeats=0)
    reference = ref["value"]
    out = {"reference": {"value": np.asarray(reference).tolist(), "info": ref["info"], "inner": inner_n,
                         "outer": outer_n}, "rows": [], "other_dampings": []}
    for rho in spec.other_dampings:  # the same data, another stated system
        other = Estimator(model, mm, state, "cg", {**converged, "damping": rho, "damping_mode": "relative"}, "float64",
                          loop=loop)(*big, repeats=0)
        shift = _norm(np.asarray(other["value"]) - np.asarray(reference)) / max(_norm(reference), 1e-300)
        out["other_dampings"].append({"rho": rho, "value": np.asarray(other["value"]).tolist(), "difference": shift,
                                      "iterations": other["info"]["iterations"], "hvps": other["info"]["hvp_count"]})
        log(f"  rho {rho:g}: large-sample value {np.asarray(other['value'])}, {shift:.3g} relative to the config's")
    for bs in spec.batch_sizes:
        pairs = draw_pairs(run, spec.pairs, bs, epochs=(1000 + bs, 2000 + bs))
        primal = Estimator(model, mm, state, "cg", {**options, "restarts": 0}, None, precision, loop)
        corrected = Estimator(model, mm, state, "cg", {**options, "scalar_tol": 0.0}, None, precision, loop)
        runs = [("primal", f"config (tol {options['tol']:g})", primal, {"maxiter": options["maxiter"],
                                                                         "tol": options["tol"]})]
        runs += [("primal", f"{k} iterations", primal, {"maxiter": k, "tol": 0.0}) for k in spec.budgets]
        runs += [("corrected", f"{k} iterations", corrected, {"maxiter": k}) for k in spec.corrected_budgets]
        ex_values = None
        for kind, budget, est, dyn in runs:
            res = [est(i, o, repeats=1, dynamic={k: np.asarray(v, np.int32 if k == "maxiter" else np.float32)
                                                 for k, v in dyn.items()}) for i, o in pairs]
            if ex_values is None:
                # each pair's exact value: the system its estimates state (the damping their power iteration gave,
                # the same for every budget), solved in float64, so the solver error is the solve's alone
                exact = Estimator(model, mm, state, "cg", {**converged, "damping_mode": "absolute"}, "float64",
                                  loop=loop)
                ex_values = [exact(i, o, repeats=0, dynamic={"damping": np.float64(r["info"]["damping"])})["value"]
                             for (i, o), r in zip(pairs, res)]
            hvps = float(np.mean([r["info"]["hvp_count"] for r in res]))
            row = {"batch": bs, "estimate": kind, "budget": budget, "hvps": hvps, "example_hvps": hvps * bs,
                   "iterations": float(np.mean([r["info"]["iterations"] for r in res])),
                   "residual": float(np.median([r["info"]["residual"] for r in res])),
                   "run_s": float(np.mean([r["run_s"] for r in res])),
                   **errors([r["value"] for r in res], ex_values, reference)}
            out["rows"].append(row)
            log(f"  batch {bs:4d} {kind:9s} {budget:22s} HVPs {hvps:7.1f}  solver {row['solver']:.3g}  "
                f"sampling {row['sampling']:.3g}  total {row['total']:.3g}  sign {row['sign']:.0%}")
    return out


def markdown(result: dict) -> str:
    lines = ["| alpha batch | estimate | budget | HVPs | example-HVPs | true residual (median) | solver error | "
             "sampling error | total error | sign right | run ms |", "|" + "---|" * 11]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} + {r['batch']} | {r['estimate']} | {r['budget']} | {r['hvps']:.0f} | "
                     f"{r['example_hvps']:,.0f} | {r['residual']:.2g} | {r['solver']:.3g} | {r['sampling']:.3g} | "
                     f"{r['total']:.3g} | {r['sign']:.0%} | {1e3 * r['run_s']:.0f} |")
    return "\n".join(lines)


def plot(result: dict, path: str, title: str) -> None:
    """Total error (solid: primal, dashed: corrected) and each batch's sampling error (dotted) against HVPs
    and against example-HVPs."""
    fig, axes = new_figure(1, 2, figsize=(10, 3.8))
    sizes = sorted({r["batch"] for r in result["rows"]})
    colours = [f"C{i}" for i in range(len(sizes))]
    for ax, key, label in ((axes[0], "hvps", "HVPs an alpha step"), (axes[1], "example_hvps", "example-HVPs (HVPs x inner batch)")):
        for bs, c in zip(sizes, colours):
            rows = [r for r in result["rows"] if r["batch"] == bs]
            for kind, style in (("primal", "o-"), ("corrected", "s--")):
                pts = sorted((r[key], r["total"]) for r in rows if r["estimate"] == kind and r["budget"] != rows[0]["budget"])
                if pts:
                    ax.loglog(*zip(*pts), style, color=c, label=f"{bs} ({kind})" if ax is axes[0] else None, ms=3)
            conf = rows[0]
            ax.loglog([conf[key]], [conf["total"]], "*", color=c, ms=10)
            ax.axhline(conf["sampling"], color=c, ls=":", lw=0.8)
        ax.set_xlabel(label)
        ax.tick_params(axis="x", which="minor", labelsize=6, labelrotation=45)  # a span under a decade labels its minor ticks
    axes[0].set_ylabel("total error vs large-sample reference")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title} (star: the config's stop; dotted: sampling error)", fontsize=9)
    save_figure(fig, path)


def run_frontier(config, workdir: str, out_dir: str, points: Sequence[int], spec: FrontierSpec = FrontierSpec()) -> dict:
    """Train the run in ``workdir`` up to each point (resumed), measure the frontier there; results.md/json + PNGs."""
    spec.validate()
    os.makedirs(out_dir, exist_ok=True)
    report = [f"# The alpha step's error budget: {config.dataset} / {config.method}", "",
              f"Device: {jax.devices()[0].platform}. {spec.pairs} pairs per alpha batch size; errors are RMS over "
              "pairs relative to the large-sample reference (see `dyngap_jax/studies/frontier.py`).", ""]
    results = {}
    for p in points:
        train(config, workdir, max_steps=int(p))
        run, state, step = load_run_state(config, workdir, "latest")
        if step != int(p):
            raise ValueError(f"frontier: the run in {workdir} is at step {step}, past {p}, and its checkpoint there is "
                             "gone; use a new --workdir (points in increasing order)")
        res = frontier_at(run, state, spec)
        png = f"frontier_step{step}.png"
        plot(res, os.path.join(out_dir, png), f"{config.dataset}, step {step}")
        r = res["reference"]
        rho = config_method(run).damping_value
        report += [f"## After {step} training steps", "",
                   f"Reference: {r['inner']} train + {r['outer']} validation examples, value "
                   f"{np.array2string(np.asarray(r['value']), precision=5)} (rho {rho:g}), {r['info']['iterations']:.0f} "
                   f"iterations, residual {r['info']['residual']:.1e}, damping {r['info']['damping']:.3g}."]
        report += [f"The same data at rho {o['rho']:g}: {np.array2string(np.asarray(o['value']), precision=5)}, "
                   f"{o['difference']:.3g} of the reference's magnitude away ({o['iterations']:.0f} iterations)."
                   for o in res["other_dampings"]]
        report += ["", markdown(res), "", f"![frontier]({png})", ""]
        results[str(step)] = res
        atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, default=float))
        atomic_write_text(os.path.join(out_dir, "results.md"), "\n".join(report) + "\n")
    return results
