"""Exact against approximate alpha hypergradients at chosen points of training.

``run_comparison`` is what ``scripts/compare_hypergrads.py`` runs. Every estimator sees the same
closures (L_CLS and L_MM on an inner train batch, L_CLS on an outer validation batch) at the same
parameters, as the training loop's alpha step builds them.

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
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dyngap_jax import hypergrad, losses, models
from dyngap_jax.data.records import atomic_write_text
from dyngap_jax.train.plots import save_figure
from dyngap_jax.train.evaluation import load_run_state
from dyngap_jax.train.loop import _cfg, _loader, train
from dyngap_jax.train.steps import mm_loss_fn


@dataclasses.dataclass(frozen=True)
class Reference:
    """The CG solve every estimate is compared with. ``damping=None`` takes the config's (1e-4 if it has none)."""

    operator: str = "normal"
    damping: float | None = None
    tol: float = 1e-10
    maxiter: int = 10_000
    restarts: int = 3
    dtype: str = "float64"

    def options(self, config_damping: float) -> dict:
        d = (config_damping or 1e-4) if self.damping is None else self.damping
        return {"operator": self.operator, "damping": float(d), "tol": self.tol, "maxiter": self.maxiter}


def make_closures(model, mm_loss, state, inner, outer):
    """(cls_loss, mm_loss, outer_loss) at ``state`` as the alpha step builds them (BN statistics and dropout fixed)."""
    rng = jax.random.PRNGKey(0)

    def fwd(p, b):
        variables = {"params": p, **state.model_state}
        return model.apply(variables, b, train=True, mutable=list(state.model_state), rngs={"dropout": rng})[0]

    cls_loss = lambda p: losses.cross_entropy(fwd(p, inner)["logits"], inner["label"])
    inner_mm = lambda p: mm_loss(fwd(p, inner))
    outer_loss = lambda p: losses.cross_entropy(fwd(p, outer)["logits"], outer["label"])
    return cls_loss, inner_mm, outer_loss


def cast_floating(tree, dtype):
    """Every floating leaf of ``tree`` as ``dtype`` (integer leaves such as labels and token ids kept)."""
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, tree)


class Estimator:
    """One method with fixed options, compiled once for the batch shapes and run on any batch pair.

    ``dtype="float64"`` runs it with the model's computation dtype, parameters, BN statistics,
    batches and alpha in float64 (under ``jax.enable_x64``); the traced loss is checked to hold no
    lower-precision floating-point value, so a "float64" result never carries float32 rounding.
    """

    def __init__(self, model, mm_loss, state, method: str, options: Mapping[str, Any], dtype: str | None = None):
        if dtype is not None:
            model = models.with_dtype(model, jnp.dtype(dtype))
        self.model, self.mm_loss, self.method, self.options = model, mm_loss, method, dict(options)
        self.dtype = dtype
        self.state = state
        self._compiled = None
        self._cast_state = None
        self.compile_s = 0.0
        self.peak_bytes = None

    def _x64(self):
        return jax.enable_x64(self.dtype == "float64")

    def _prepare(self, inner, outer):
        if self.dtype is None:
            return self.state, inner, outer
        dt = jnp.dtype(self.dtype)
        if self._cast_state is None:  # the state is the same for every batch pair: cast it once
            self._cast_state = self.state.replace(
                params=cast_floating(self.state.params, dt), model_state=cast_floating(self.state.model_state, dt),
                alpha=self.state.alpha.replace(value=cast_floating(self.state.alpha.value, dt)))
        return self._cast_state, cast_floating(inner, dt), cast_floating(outer, dt)

    def _fn(self, state):
        def fn(params, a, inner, outer, dynamic):
            c, m, o = make_closures(self.model, self.mm_loss, state.replace(params=params), inner, outer)
            return hypergrad.alpha_hypergradient(c, m, o, params, a, self.method, **{**self.options, **dynamic})

        return fn

    def __call__(self, inner, outer, repeats: int = 1, dynamic: Mapping[str, Any] | None = None) -> dict:
        """Run on one batch pair. ``dynamic``: options passed as traced arrays (e.g. CG's ``maxiter``), so
        one compilation serves every value; the same keys must be given on every call."""
        dynamic = {k: np.asarray(v) for k, v in (dynamic or {}).items()}
        with self._x64():
            state, inner, outer = self._prepare(inner, outer)
            args = (state.params, state.alpha.value, inner, outer, dynamic)
            if self._compiled is None:
                if self.dtype is not None:
                    c, m, o = make_closures(self.model, self.mm_loss, state, inner, outer)
                    low = sorted({str(d) for f in (c, m, o) for d in _float_dtypes(jax.make_jaxpr(f)(state.params).jaxpr)}
                                 - {str(jnp.dtype(self.dtype))})
                    if low:
                        raise ValueError(
                            f"reference dtype {self.dtype}: the model's losses still compute in {low} (a module that "
                            "ignores its dtype field or casts explicitly); use --reference_dtype=float32")
                t0 = time.perf_counter()
                self._compiled = jax.jit(self._fn(state)).lower(*args).compile()
                self.compile_s = time.perf_counter() - t0
                mem = self._compiled.memory_analysis()
                if mem is not None:
                    self.peak_bytes = int(getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "argument_size_in_bytes", 0)
                                          + getattr(mem, "output_size_in_bytes", 0))
            res = jax.block_until_ready(self._compiled(*args))  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                res = jax.block_until_ready(self._compiled(*args))
            run_s = (time.perf_counter() - t0) / repeats
            info = {k: (bool(v) if np.asarray(v).dtype == bool else float(v)) for k, v in jax.device_get(res.info).items()}
            return {"value": np.asarray(res.value, np.float64), "info": info, "run_s": run_s,
                    "compile_s": self.compile_s, "peak_bytes": self.peak_bytes, "ok": bool(res.ok)}


def _float_dtypes(jaxpr) -> set:
    """The floating dtypes of every value a jaxpr (and the jaxprs nested in it) computes."""
    out = set()
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            dt = getattr(v.aval, "dtype", None)
            if dt is not None and jnp.issubdtype(dt, jnp.floating):
                out.add(dt)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out |= _float_dtypes(inner)
    return out


def measure(model, mm_loss, state, inner, outer, method: str, options: Mapping[str, Any], repeats: int = 2,
            dtype: str | None = None) -> dict:
    """One estimator on one batch pair: value, info, compile and run time (s), XLA's memory estimate (bytes)."""
    return Estimator(model, mm_loss, state, method, options, dtype)(inner, outer, repeats)


def relative_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(value - reference)) / max(np.max(np.abs(reference)), 1e-30))


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


APPROXIMATIONS = ("cg (config)", "minres 30", "cg damped 1.0", "identity", "neumann K=20", "ghadimi_wang b=20", "lfm_code (cross)",
                  "lfm_code (authors)", "unrolled K=10")


def approximations(cfg: dict, pool) -> dict:
    """The estimators compared with the reference: name -> (method, options, dtype)."""
    lr = cfg["train"]["learning_rate"]
    hg = cfg["alpha"]["hypergrad"]
    return {
        "cg (config)": (hg["method"], dict(hg["options"]), None),
        "minres 30": ("minres", {"damping": hg["options"].get("damping", 0.0) or 0.0, "tol": 1e-3, "maxiter": 30}, None),
        "cg damped 1.0": ("cg", {"operator": "damped", "damping": 1.0, "tol": 1e-6, "maxiter": 200}, None),
        "identity": ("identity", {}, None),
        "neumann K=20": ("neumann", {"num_terms": 20}, None),
        "ghadimi_wang b=20": ("ghadimi_wang", {"num_terms": 20, "sampler": pool, "key": jax.random.PRNGKey(0)}, None),
        "lfm_code (cross)": ("lfm_code", {"reduction": "cross"}, None),
        "lfm_code (authors)": ("lfm_code", {"reduction": "first_tensor_mean"}, None),
        "unrolled K=10": ("unrolled", {"num_steps": 10, "inner_lr": lr}, None),
    }


def _batches(cfg, n):
    bs = cfg["alpha"].get("batch_size") or cfg["train"]["batch_size"]
    inner = iter(_loader(cfg, "train", train=True, epoch=123, infinite=True, batch_size=bs))
    outer = iter(_loader(cfg, "validation", train=True, epoch=456, infinite=True, batch_size=bs))
    return [(next(inner), next(outer)) for _ in range(n)]


def _pool(model, mm, state, pairs):
    """A sampler over the inner batches for Ghadimi-Wang (the batches stacked, one drawn per key)."""
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[p[0] for p in pairs])

    def sampler(key):
        i = jax.random.randint(key, (), 0, len(pairs))
        inner = jax.tree_util.tree_map(lambda x: x[i], stacked)
        c, m, _ = make_closures(model, mm, state, inner, inner)
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


def compare_at(cfg: dict, model, state, mm, *, batches: int = 3, reference: Reference = Reference(),
               dense_max_params: int = 3000, sweep_budgets: Mapping[str, tuple] | None = SWEEP_BUDGETS,
               plot_path: str | None = None, methods: list[str] | None = None) -> dict:
    """Every estimator on ``batches`` inner/outer pairs at ``state``; rows (the reference first), the sweep, checks.

    ``methods``: names from :func:`approximations` to run (default all); the reference and, for
    models up to ``dense_max_params`` parameters, the two ``dense`` rows always run.
    """
    pairs = _batches(cfg, batches)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    ref_opts = reference.options(cfg["alpha"]["hypergrad"]["options"].get("damping", 0.0) or 0.0)
    ref_est = Estimator(model, mm, state, "cg", {**ref_opts, "restarts": reference.restarts}, reference.dtype)
    refs = [ref_est(i, o) for i, o in pairs]
    ref_name = f"reference: cg {reference.operator}, damping {ref_opts['damping']:g}, tol {reference.tol:g} ({reference.dtype})"
    rows = [_row(ref_name, refs, refs)]
    known = approximations(cfg, _pool(model, mm, state, pairs))
    unknown = sorted(set(methods or ()) - set(known))
    if unknown:
        raise ValueError(f"compare: unknown methods {unknown}; known: {sorted(known)}")
    methods = {k: v for k, v in known.items() if methods is None or k in methods}
    checks = {"n_params": int(n_params), "reference": ref_opts, "reference_converged": [r["ok"] for r in refs]}
    if n_params <= dense_max_params:
        # the same system as the reference, solved directly (checks CG), and the exact undamped solve
        dense_same = {"operator": reference.operator, "damping": ref_opts["damping"], "max_params": dense_max_params}
        methods = {"dense (reference's system)": ("dense", dense_same, reference.dtype),
                   "dense (exact H^-1, undamped)": ("dense", {"max_params": dense_max_params}, reference.dtype),
                   **methods}
    for name, (method, options, dtype) in methods.items():
        est = Estimator(model, mm, state, method, options, dtype)
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
        lr = cfg["train"]["learning_rate"]
        for label, method, key, extra in (
            ("CG (normal, config damping)", "cg", "maxiter", {"operator": "normal", "tol": 1e-12, "damping": ref_opts["damping"]}),
            ("MINRES (config damping)", "minres", "maxiter", {"tol": 1e-12, "damping": ref_opts["damping"]}),
            ("Neumann", "neumann", "num_terms", {}),
            ("unrolled", "unrolled", "num_steps", {"inner_lr": lr}),
        ):
            pts = []
            # CG's and MINRES's iteration budget is a traced bound of its while loop: one compilation for the whole sweep
            shared = Estimator(model, mm, state, method, extra) if method in ("cg", "minres") else None
            for v in sweep_budgets.get(method, ()):
                if shared is not None:
                    r = shared(i, o, dynamic={key: np.int32(v)})
                else:
                    r = measure(model, mm, state, i, o, method, {**extra, key: v}, repeats=1)
                hvps = r["info"].get("hvp_count", 0) or v
                pts.append((float(hvps), relative_error(r["value"], refs[0]["value"]), r["run_s"]))
            sweep[label] = pts
        if plot_path:
            _plot_sweep(sweep, plot_path)
    return {"rows": rows, "sweep": sweep, "checks": checks}


def _plot_sweep(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| method | best epoch | val acc | test acc | test gap (acc) | final alpha | skipped alpha steps |",
             "|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    out = {}
    for name, spec in variants.items():
        cfg = config.copy_and_resolve_references()
        if spec is not None:
            cfg.alpha.hypergrad.method, cfg.alpha.hypergrad.options = spec[0], dict(spec[1])
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
    cfg = _cfg(config)
    unknown = sorted(set(methods or ()) - set(APPROXIMATIONS))
    if unknown:
        raise ValueError(f"compare: unknown methods {unknown}; known: {list(APPROXIMATIONS)}")
    os.makedirs(out_dir, exist_ok=True)
    mods = list(cfg["model"]["modalities"])
    per_pair = cfg["alpha"]["strategy"] == "learned" and cfg["alpha"]["learned"].get("per_pair", False)
    mm = mm_loss_fn(cfg["loss"]["mm"], mods, cfg["loss"].get("temperature", 0.1), per_pair)
    report = [f"# Hypergradient comparison: {cfg['dataset']} / {cfg['method']}", "",
              f"Device: {jax.devices()[0].platform}. Agreement over {batches} inner (train) / outer (validation) batch "
              "pairs; relative error is max |value - reference| / max |reference| on the first pair, and its mean over "
              "all pairs. The reference and the `dense` rows run in the reference's dtype, the rest in the model's.", ""]
    results = {}
    for p in points:
        train(config, workdir, max_steps=int(p))
        model, state, step = load_run_state(config, workdir, "latest")
        res = compare_at(cfg, model, state, mm, batches=batches, reference=reference, dense_max_params=dense_max_params,
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
                       f"{np.sqrt(c['reference']['damping']):.1e} are what the damping filters.", ""]
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
