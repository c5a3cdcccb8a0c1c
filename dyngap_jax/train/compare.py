"""Compare alpha hypergradient estimators at one point of training: value, error, agreement, cost.

Used by ``scripts/compare_hypergrads.py``. Every estimator sees the same closures (L_CLS and L_MM
on an inner batch, L_CLS on an outer batch) at the same parameters, as the training loop's alpha
step builds them; the reference is CG at a tight tolerance (and ``dense`` where the model is small
enough to check CG itself).
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dyngap_jax import hypergrad, losses


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


def measure(model, mm_loss, state, inner, outer, method: str, options: Mapping[str, Any], repeats: int = 2) -> dict:
    """One estimator: value, info, compile and run time (s), and XLA's memory estimate (bytes) of the compiled call."""
    options = dict(options)

    def fn(params, a, inner, outer):
        c, m, o = make_closures(model, mm_loss, state.replace(params=params), inner, outer)
        return hypergrad.alpha_hypergradient(c, m, o, params, a, method, **options)

    jitted = jax.jit(fn)
    args = (state.params, state.alpha.value, inner, outer)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = int(getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "argument_size_in_bytes", 0)
                   + getattr(mem, "output_size_in_bytes", 0))
    res = jax.block_until_ready(compiled(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        res = jax.block_until_ready(compiled(*args))
    run_s = (time.perf_counter() - t0) / repeats
    info = {k: (bool(v) if np.asarray(v).dtype == bool else float(v)) for k, v in jax.device_get(res.info).items()}
    return {"value": np.asarray(res.value, np.float64), "info": info, "compile_s": compile_s, "run_s": run_s,
            "peak_bytes": peak, "ok": bool(res.ok)}


def relative_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(value - reference)) / max(np.max(np.abs(reference)), 1e-30))


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | value | rel. error | sign agrees | sign agreement over batches | std over batches | HVPs | "
            "converged | run ms | compile s | XLA memory MiB |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        lines.append(
            f"| {r['name']} | {np.array2string(np.asarray(r['value']), precision=5)} | {r['rel_error']:.2e} | "
            f"{'yes' if r['sign_ok'] else 'no'} | {r['sign_rate']:.0%} | {r['std']:.3g} | {r['info'].get('hvp_count', 0):.0f} | "
            f"{r['ok']} | {1e3 * r['run_s']:.1f} | {r['compile_s']:.1f} | {mem} |"
        )
    return "\n".join(lines)
