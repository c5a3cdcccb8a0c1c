"""Exact against approximate alpha hypergradients at chosen points of training.

``run_comparison`` is what ``scripts/compare_hypergrads.py`` runs. Every estimator sees the same
closures (L_CLS and L_MM on an inner train batch, L_CLS on an outer validation batch) at the same
parameters: the training alpha step's own (:func:`dyngap_jax.methods.alpha_step.alpha_losses`, with its
dropout key), so a row measures what training would apply.

The reference is CG at a tight tolerance, computed in float64 by default. Why: the Hessian of a
network is indefinite and nearly singular (on a two-view MLP after a few steps: eigenvalues from -3
to 8, dozens exactly 0, several between 1e-8 and 1e-3), and the undamped ``H^{-1} g`` is dominated
by those near-flat directions — in float32 neither a dense solve nor CG pins it down. The reference
therefore solves CG's normal equations ``(H^2 + d I) v = H g`` with a small damping ``d`` (the
config's, by default), a Tikhonov-filtered inverse that is well posed; where the model is small,
``dense`` solves the *same* system directly (the check of CG itself), and ``dense`` undamped shows how
far the filtered value is from the exact, ill-posed one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dyngap_jax import hypergrad
from dyngap_jax.io import atomic_write_text, new_figure, save_figure
from dyngap_jax.studies.estimator import Estimator, measure, relative_error
from dyngap_jax.train.evaluation import load_run_state
from dyngap_jax.train.loop import train
from dyngap_jax.train.setup import Run
from dyngap_jax.methods import LFM
from dyngap_jax.methods.alpha_step import alpha_losses, resolve_loop
from dyngap_jax.methods.lfm import resolve_estimator


@dataclasses.dataclass(frozen=True)
class Reference:
    """The CG solve every estimate is compared with.

    ``damping=None``: the system the config's method states on each batch pair. For the config's CG
    that is its own operator with the absolute damping it reports on the pair (a relative damping
    is ``rho |lambda|_max`` of that pair's Hessian), so the reference is the same system solved to
    ``tol`` in ``dtype``; for another method, CG's ``operator`` with the method's damping (1e-4 if it
    has none). A number is an absolute damping for every pair.
    """

    operator: str = "normal"
    damping: float | None = None
    tol: float = 1e-10
    maxiter: int = 10_000
    restarts: int = 3
    dtype: str = "float64"

    def system(self, method: hypergrad.Method) -> str:
        return method.operator if isinstance(method, hypergrad.CG) and method.operator != "gauss_newton" else self.operator

    def damping_on(self, method: hypergrad.Method, info: Mapping[str, Any]) -> float:
        """The absolute damping of the reference's system on a pair whose config-method run gave ``info``."""
        if self.damping is not None:
            return float(self.damping)
        if isinstance(method, hypergrad.CG) and "damping" in info:
            return float(info["damping"])
        return config_damping(method) or 1e-4

    def options(self, method: hypergrad.Method) -> dict:
        return {"operator": self.system(method), "damping_mode": "absolute", "tol": self.tol, "maxiter": self.maxiter,
                "restarts": self.restarts}


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | value | rel. error | sign agrees | sign agreement over batches | mean rel. error over batches | "
            "std over batches | HVPs | ok | run ms | compile s | XLA memory MiB |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        lines.append(
            f"| {r['name']} | {np.array2string(np.asarray(r['value']), precision=5)} | {r['rel_error']:.2e} | "
            f"{'yes' if r['sign_ok'] else 'no'} | {r['sign_rate']:.0%} | {r['mean_rel_error']:.2e} | {r['std']:.3g} | "
            f"{r['info'].get('hvp_count', 0):.0f} | {r['ok']} | {1e3 * r['run_s']:.1f} | {r['compile_s']:.1f} | {mem} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the comparison


SWEEP_BUDGETS = {"cg": (1, 3, 10, 30, 100, 300), "minres": (3, 10, 30, 100, 300, 600), "neumann": (1, 5, 20, 50, 200), "unrolled": (1, 5, 20, 50)}


CERTIFIED = (0.3, 0.05)  # the scalar_tol of the certified rows
APPROXIMATIONS = ("cg (config)", *(f"cg certified {t:g} (scalar_tol)" for t in CERTIFIED), "cg truncated (the default until issue 13: d 1e-4, 30 iterations)", "minres 30", "cg damped 1.0", "identity", "neumann K=20", "ghadimi_wang b=20", "lfm_code (cross)",
                  "lfm_code (authors)", "unrolled K=10")


def _lfm(run: Run) -> LFM:
    if not isinstance(run.method, LFM):
        raise ValueError(f"the hypergradient comparison studies LFM's alpha step; config.balance.method is "
                         f"{run.cfg.balance.method!r}")
    return run.method


def config_method(run: Run) -> hypergrad.Method:
    """The config's hypergradient method (also for a run with a fixed strategy), as its alpha step runs it (the
    authors' first tensor resolved against the model)."""
    return _lfm(run).estimator or resolve_estimator(run.cfg.alpha.hypergrad.estimator, run.info)


def config_precision(run: Run) -> str:
    """The precision the run's alpha step computes at (its resolved one)."""
    p = run.cfg.precision
    return "float64" if p.alpha_float64 else p.alpha_matmul


def config_damping(method: hypergrad.Method) -> float:
    """The damping ``method`` uses (0 for a method without one)."""
    return float(getattr(method, "damping_value", getattr(method, "damping", 0.0)) or 0.0)


PREVIOUS_DEFAULT = {"operator": "normal", "damping": 1e-4, "damping_mode": "absolute", "tol": 1e-3, "maxiter": 30}


def approximations(run: Run, pool) -> dict:
    """The estimators compared with the reference: name -> (method, options, dtype)."""
    lr = run.cfg.train.learning_rate
    method = config_method(run)
    config_dtype = "float64" if run.cfg.precision.alpha_float64 else None
    # the certified stop on the config's system where it is CG on the normal equations, else on CG's default
    system = method.options() if isinstance(method, hypergrad.CG) and method.operator == "normal" else {}
    certified = {f"cg certified {t:g} (scalar_tol)": ("cg", {**system, "scalar_tol": t}, None) for t in CERTIFIED}
    return {
        "cg (config)": (method.name, method.options(), config_dtype),
        **certified,
        "cg truncated (the default until issue 13: d 1e-4, 30 iterations)": ("cg", PREVIOUS_DEFAULT, None),
        "minres 30": ("minres", {"damping": 0.0, "tol": 1e-3, "maxiter": 30}, None),
        "cg damped 1.0": ("cg", {"operator": "damped", "damping": 1.0, "damping_mode": "absolute", "tol": 1e-6,
                                   "maxiter": 200}, None),
        "identity": ("identity", {}, None),
        "neumann K=20": ("neumann", {"num_terms": 20}, None),
        "ghadimi_wang b=20": ("ghadimi_wang", {"num_terms": 20, "sampler": pool, "key": jax.random.PRNGKey(0)}, None),
        "lfm_code (cross)": ("lfm_code", {"reduction": "cross"}, None),
        # their first tensor: the model's first-created parameter (PyTorch's order)
        "lfm_code (authors)": ("lfm_code", {"reduction": "first_tensor_mean", "tensor": run.info.parameter_order[0]},
                               None),
        "unrolled K=10": ("unrolled", {"num_steps": 10, "inner_lr": lr}, None),
    }


def draw_pairs(run: Run, n: int, batch_size: int | None = None, epochs=(123, 456), splits=("train", "validation")):
    """``n`` (inner, outer) pairs of ``batch_size`` (default: the alpha step's): train and validation batches,
    augmented, as the model's inputs (what the alpha step's closures see once it has prepared the loader's
    batches). ``epochs`` seed the two loaders' shuffles."""
    size = run.batch.alpha if batch_size is None else batch_size
    inner, outer = (draw_batches(run, split, size, epoch) for split, epoch in zip(splits, epochs))
    return [(next(inner), next(outer)) for _ in range(n)]


def draw_batches(run: Run, split: str, size: int, epoch: int):
    """``split``'s batches of ``size`` as the alpha step's closures see them (augmented, prepared), one a ``next``;
    ``epoch`` seeds the shuffle."""
    for batch in run.loader(split, train=True, epoch=epoch, infinite=True, batch_size=size):
        yield jax.device_get(run.prepare_batch(batch))


def _pool(model, mm, state, pairs):
    """A sampler over the inner batches for Ghadimi-Wang (the batches stacked, one drawn per key)."""
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[p[0] for p in pairs])

    def sampler(key):
        i = jax.random.randint(key, (), 0, len(pairs))
        inner = jax.tree_util.tree_map(lambda x: x[i], stacked)
        c, m, _ = alpha_losses(model, mm, state, inner, inner)
        return c, m

    return sampler


def _row(name, per_batch, refs):
    first = per_batch[0]
    signs = [bool(np.all(np.sign(r["value"]) == np.sign(ref["value"]))) for r, ref in zip(per_batch, refs)]
    errors = [relative_error(r["value"], ref["value"]) for r, ref in zip(per_batch, refs)]
    return {"name": name, "value": first["value"], "rel_error": errors[0], "sign_ok": signs[0],
            "sign_rate": float(np.mean(signs)), "mean_rel_error": float(np.mean(errors)),
            "std": float(np.std([np.mean(r["value"]) for r in per_batch])), "info": first["info"], "ok": first["ok"],
            "run_s": first["run_s"], "compile_s": first["compile_s"], "peak_bytes": first["peak_bytes"],
            "values": [np.asarray(r["value"]).tolist() for r in per_batch]}


def compare_at(run: Run, state, *, batches: int = 3, reference: Reference = Reference(),
               dense_max_params: int = 3000, sweep_budgets: Mapping[str, tuple] | None = SWEEP_BUDGETS,
               plot_path: str | None = None, methods: list[str] | None = None) -> dict:
    """Every estimator on ``batches`` inner/outer pairs at ``state``; rows (the reference first), the sweep, checks.

    ``methods``: names from :func:`approximations` to run (default all); the reference and, for
    models up to ``dense_max_params`` parameters, the two ``dense`` rows always run.
    """
    model, mm = run.model, _lfm(run).mm_loss
    precision = config_precision(run)
    pairs = draw_pairs(run, batches)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    known = approximations(run, _pool(model, mm, state, pairs))
    unknown = sorted(set(methods or ()) - set(known))
    if unknown:
        raise ValueError(f"compare: unknown methods {unknown}; known: {sorted(known)}")
    method = config_method(run)
    loop = resolve_loop(run.cfg.alpha.hypergrad.loop)  # where training's solver loops run (host-driven on a CPU)
    estimator = lambda spec: Estimator(model, mm, state, spec[0], spec[1], spec[2], precision, loop)
    # the config's method first: the system it states on each pair is what the reference solves
    config_runs = [estimator(known["cg (config)"])(i, o, repeats=2) for i, o in pairs]
    dampings = [reference.damping_on(method, r["info"]) for r in config_runs]
    ref_est = Estimator(model, mm, state, "cg", reference.options(method), reference.dtype, loop=loop)
    refs = [ref_est(i, o, dynamic={"damping": d}) for (i, o), d in zip(pairs, dampings)]
    span = f"{min(dampings):.3g}" if max(dampings) == min(dampings) else f"{min(dampings):.3g} to {max(dampings):.3g}"
    ref_name = (f"reference: cg {reference.system(method)}, damping {span}, tol {reference.tol:g} ({reference.dtype})")
    rows = [_row(ref_name, refs, refs)]
    selected = {k: v for k, v in known.items() if methods is None or k in methods}
    checks = {"n_params": int(n_params), "reference": {**reference.options(method), "damping": dampings},
              "reference_converged": [r["ok"] for r in refs]}
    if "cg (config)" in selected:
        rows.append(_row("cg (config)", config_runs, refs))
        del selected["cg (config)"]
    if n_params <= dense_max_params:
        # the same system as the reference, solved directly (checks CG), and the exact undamped solve
        same = Estimator(model, mm, state, "dense", {"operator": reference.system(method), "max_params": dense_max_params},
                         reference.dtype)
        rows.insert(1, _row("dense (reference's system)", [same(i, o, dynamic={"damping": d})
                                                          for (i, o), d in zip(pairs, dampings)], refs))
        selected = {"dense (exact H^-1, undamped)": ("dense", {"max_params": dense_max_params}, reference.dtype),
                    **selected}
    for name, spec in selected.items():
        est = estimator(spec)
        rows.append(_row(name, [est(i, o, repeats=2) for i, o in pairs], refs))
    by_name = {r["name"]: r for r in rows}
    if "dense (reference's system)" in by_name:
        checks["reference_vs_dense"] = by_name["dense (reference's system)"]["mean_rel_error"]
        exact = by_name["dense (exact H^-1, undamped)"]
        checks["min_abs_eigenvalue"] = exact["info"].get("min_abs_eigenvalue")
        checks["undamped_vs_reference"] = exact["mean_rel_error"]
    sweep = None
    if sweep_budgets:
        i, o = pairs[0]
        sweep = {}
        lr = run.cfg.train.learning_rate
        for label, name, key, extra in (
            ("CG (the reference's system)", "cg", "maxiter", {**reference.options(method), "tol": 1e-12,
                                                               "damping": dampings[0], "restarts": 0}),
            ("MINRES (H + d I, d the reference's damping)", "minres", "maxiter", {"tol": 1e-12, "damping": dampings[0]}),
            ("Neumann", "neumann", "num_terms", {}),
            ("unrolled", "unrolled", "num_steps", {"inner_lr": lr}),
        ):
            pts = []
            # CG's and MINRES's iteration budget is a traced bound of its while loop: one compilation for the whole sweep
            shared = (Estimator(model, mm, state, name, extra, None, precision, loop) if name in ("cg", "minres")
                      else None)
            for v in sweep_budgets.get(name, ()):
                if shared is not None:
                    r = shared(i, o, dynamic={key: np.int32(v)})
                else:
                    r = measure(model, mm, state, i, o, name, {**extra, key: v}, repeats=1, precision=precision,
                                loop=loop)
                hvps = r["info"].get("hvp_count", 0) or v
                pts.append((float(hvps), relative_error(r["value"], refs[0]["value"]), r["run_s"]))
            sweep[label] = pts
        if plot_path:
            _plot_sweep(sweep, plot_path)
    return {"rows": rows, "sweep": sweep, "checks": checks}


def _plot_sweep(sweep, path):
    fig, ax = new_figure(figsize=(5, 3.5))
    for label, pts in sweep.items():
        if pts:
            ax.loglog([max(p[0], 1) for p in pts], [max(p[1], 1e-12) for p in pts], "o-", label=label)
    ax.set_xlabel("Hessian-vector products (unrolled: steps x HVP-equivalents)")
    ax.set_ylabel("relative error vs. reference")
    ax.legend()
    ax.set_title("hypergradient error against cost")
    save_figure(fig, path)


TRAIN_EACH = {"cg (config)": None, "identity": ("identity", {}), "neumann K=20": ("neumann", {"num_terms": 20}),
              "lfm_code (cross)": ("lfm_code", {"reduction": "cross"})}


def train_each(config, out_dir: str, variants: Mapping[str, tuple | None] = TRAIN_EACH) -> tuple[str, dict]:
    """Train once per hypergradient method (``None``: the config's); a table of final metrics and an alpha plot."""
    lines = ["| method | best epoch | val acc | test acc | test gap (acc) | final alpha | skipped alpha steps |",
             "|---|---|---|---|---|---|---|"]
    fig, ax = new_figure(figsize=(5, 3.5))
    out = {}
    for name, spec in variants.items():
        cfg = config.copy_and_resolve_references()
        if spec is not None:
            cfg.alpha.hypergrad.method = spec[0]
            for k in cfg.alpha.hypergrad.options:
                cfg.alpha.hypergrad.options[k] = spec[1].get(k)
        s = train(cfg, os.path.join(out_dir, "runs", name.split(" ")[0]))
        b = s["best"]
        skipped = s["history"][-1].get("alpha_skipped", 0) if s["history"] else 0
        lines.append(f"| {name} | {b['epoch']} | {b['validation']['acc']:.4f} | {b['test']['acc']:.4f} | "
                     f"{b['test']['gap_acc']:.4f} | {np.mean(s['final_alpha']):.4f} | {skipped} |")
        alphas = [float(np.mean(h["alpha"])) for h in s["history"]]
        ax.plot([h["epoch"] for h in s["history"]], alphas, "o-", label=name)
        out[name] = {"best": b, "alpha": alphas}
    ax.set_xlabel("epoch")
    ax.set_ylabel("alpha")
    ax.legend()
    save_figure(fig, os.path.join(out_dir, "alpha_by_method.png"))
    return "\n".join(lines), out


def run_comparison(config, workdir: str, out_dir: str, points, *, batches: int = 3,
                   reference: Reference = Reference(), dense_max_params: int = 3000,
                   sweep_budgets: Mapping[str, tuple] | None = SWEEP_BUDGETS, train_methods: bool = False,
                   methods: list[str] | None = None) -> dict:
    """Train the run in ``workdir`` up to each point (steps; resumed), compare there; results.md/.json + PNGs."""
    unknown = sorted(set(methods or ()) - set(APPROXIMATIONS))
    if unknown:
        raise ValueError(f"compare: unknown methods {unknown}; known: {list(APPROXIMATIONS)}")
    os.makedirs(out_dir, exist_ok=True)
    report = [f"# Hypergradient comparison: {config.dataset} / {config.method}", "",
              f"Device: {jax.devices()[0].platform}. Agreement over {batches} inner (train) / outer (validation) batch "
              "pairs; relative error is max |value - reference| / max |reference| on the first pair, and its mean over "
              "all pairs. The reference and the `dense` rows run in the reference's dtype, the rest in the model's.", ""]
    results = {}
    for p in points:
        train(config, workdir, max_steps=int(p))
        run, state, step = load_run_state(config, workdir, "latest")
        res = compare_at(run, state, batches=batches, reference=reference, dense_max_params=dense_max_params,
                         sweep_budgets=sweep_budgets, plot_path=os.path.join(out_dir, f"sweep_step{step}.png"),
                         methods=methods)
        c = res["checks"]
        report += [f"## After {step} training steps ({c['n_params']:,} parameters, alpha {np.asarray(state.alpha.value)})",
                   "", markdown_table(res["rows"]), ""]
        if "reference_vs_dense" in c:
            report += [f"Check of the reference: CG against `dense` on the same system, mean relative difference "
                       f"{c['reference_vs_dense']:.2e}. The exact undamped `H^-1 g` differs from the reference by "
                       f"{c['undamped_vs_reference']:.2e} (relative); the Hessian's smallest |eigenvalue| is "
                       f"{c['min_abs_eigenvalue']:.2e}, and directions with |eigenvalue| below sqrt(damping) = "
                       f"{np.sqrt(c['reference']['damping'][0]):.1e} are what the damping filters.", ""]
        if res["sweep"]:
            report += [f"![error against cost](sweep_step{step}.png)", ""]
        results[str(step)] = {"rows": [{k: v for k, v in r.items() if k != "value"} | {"value": np.asarray(r["value"]).tolist()}
                                       for r in res["rows"]], "sweep": res["sweep"], "checks": c}
    if train_methods:
        table, runs = train_each(config, out_dir)
        report += ["## Training with each method", "", table, "", "![alpha](alpha_by_method.png)", ""]
        results["train_each"] = runs
    atomic_write_text(os.path.join(out_dir, "results.md"), "\n".join(report) + "\n")
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, default=float))
    return results
