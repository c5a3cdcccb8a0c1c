"""Print every hypergradient method's estimate next to a closed form: value, error, HVPs, time.

    python -m scripts.hypergrad_demo [--config configs/hypergrad_demo.py] [--config.alpha=0.7]

A config entry's name is the method, or ``<method>_<label>`` for a second setting of it.
"""
import time

import jax
from ml_collections import config_flags

jax.config.update("jax_enable_x64", True)

from dyngap_jax import hypergrad
from dyngap_jax.hypergrad.quadratic import QuadraticBilevel
from scripts import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/hypergrad_demo.py", "Demo configuration.")


def method_of(name: str) -> str:
    for m in sorted(hypergrad.METHODS, key=len, reverse=True):
        if name == m or name.startswith(m + "_"):
            return m
    raise ValueError(f"config.methods.{name}: not a method or <method>_<label>; known: {hypergrad.METHODS}")


def main(argv):
    del argv
    cfg = _CONFIG.value
    prob = QuadraticBilevel.random(cfg.problem.dim, seed=cfg.seed, condition=cfg.problem.condition)
    a = cfg.alpha
    params = prob.pack(prob.solution(a))
    exact = prob.hypergradient(a)
    print(f"quadratic bilevel problem: dim {prob.n}, condition {cfg.problem.condition:g}, alpha {a}")
    print(f"closed form d L_outer / d alpha = {exact:.10g}\n")
    header = f"{'method':<24} {'value':>16} {'rel. error':>11} {'HVPs':>6} {'ok':>5} {'compile s':>10} {'run ms':>9}"
    print(header)
    print("-" * len(header))
    for name, opts in cfg.methods.items():
        method = method_of(name)
        opts = dict(opts)
        draws = 1
        if method == "ghadimi_wang":
            draws = cfg.ghadimi_wang_draws
            sampler = lambda key: (prob.cls_loss, prob.mm_loss)

            def fn(p, a, keys):
                run = lambda k: hypergrad.alpha_hypergradient(
                    prob.cls_loss, prob.mm_loss, prob.outer_loss, p, a, method, sampler=sampler, key=k, **opts
                )
                return jax.vmap(run)(keys)

            args = (params, a, jax.random.split(jax.random.PRNGKey(cfg.seed), draws))
        else:
            fn = lambda p, a: hypergrad.alpha_hypergradient(prob.cls_loss, prob.mm_loss, prob.outer_loss, p, a, method, **opts)
            args = (params, a)
        jitted = jax.jit(fn)
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = jax.block_until_ready(jitted(*args))
        run_ms = 1e3 * (time.perf_counter() - t0)
        value = float(res.value.mean())
        hvps = float(res.info["hvp_count"].mean())
        ok = bool(res.ok.all())
        label = name + (f" (mean of {draws})" if draws > 1 else "")
        err = abs(value - exact) / abs(exact)
        print(f"{label:<24} {value:>16.10g} {err:>11.2e} {hvps:>6.0f} {str(ok):>5} {compile_s:>10.2f} {run_ms:>9.2f}")
    print("\nHVPs include one for the reported |H v - g| / |g| of the methods that build v ~ H^-1 g.")


if __name__ == "__main__":
    common.run(main)
