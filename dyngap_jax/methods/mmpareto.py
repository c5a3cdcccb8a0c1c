"""MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024), as
the authors' code computes it (GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py``, ``train_epoch``).

The losses: the fused head's cross-entropy ``L_mm`` and, per modality, its own head's ``L_m`` (their three
separate heads: ``configs/*.py:mmpareto`` sets the ``concat`` fusion with ``unimodal_heads``). On the encoder of
each modality ``m`` (its encoder and projection, all tensors) with ``g_mm`` and ``g_m`` the two losses' gradients:

* the cosine of the two, over the whole encoder: above 0, the weights ``(1/2, 1/2)``; otherwise the two-task
  min-norm (MGDA) weights ``(c, 1 - c)``, ``c = (|g_m|^2 - <g_mm, g_m>) / |g_mm - g_m|^2`` (their
  ``MinNormSolver``, with its clamps: 0.999 where ``<g_mm, g_m> >= |g_mm|^2``, 0.001 where it is at least
  ``|g_m|^2``);
* for each tensor, ``d = 2 (c g_mm + (1 - c) g_m)`` and the gradient
  ``gamma max(1, |g_sum| / |d|) d``, ``g_sum`` that tensor's gradient of ``L_mm + sum_m L_m`` (the norms per
  tensor, as their loop over ``named_parameters``; ``gamma`` 1.5, hard-coded there);

every other parameter (the heads) takes the summed loss's gradient unchanged. One forward pass, and the
``1 + M`` losses' gradients from one batched backward (``vmap`` of its VJP), where their code runs a backward
a loss. Any number of modalities: each encoder is paired with its own unimodal loss (their code names two).

BalanceBenchmark's port (``MMPareto_trainer.py``) is not followed: it accumulates the backward passes without
zeroing, so the two gradients it compares are the same and the cosine is always 1, and near its line 381 it
assigns the min-norm weights to the loop variable (a conflicting modality would keep zero weights).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dyngap_jax import losses
from dyngap_jax.methods.base import Method, StepContext, finish_metrics, modality_keys


@dataclasses.dataclass(frozen=True)
class MMParetoOptions:
    """``config.balance.options`` of ``mmpareto``; the default the original's."""

    gamma: float = 1.5  # the magnitude enhancement (MMPareto.py: ``gamma = 1.5``)

    def __post_init__(self):
        if not self.gamma > 0:
            raise ValueError(f"`gamma` must be > 0, got {self.gamma}")


def min_norm_weight(v11, v12, v22):
    """``c`` minimising ``|c g1 + (1 - c) g2|`` over ``[0, 1]`` from ``v11 = |g1|^2``, ``v12 = <g1, g2>`` and
    ``v22 = |g2|^2``, with their solver's clamps."""
    denom = v11 + v22 - 2 * v12
    inner = -(v12 - v22) / jnp.where(denom > 0, denom, 1.0)
    return jnp.where(v12 >= v11, 0.999, jnp.where(v12 >= v22, 0.001, inner))


class MMPareto(Method):
    """MMPareto's training step (the module docstring)."""

    name = "mmpareto"
    Options = MMParetoOptions
    modalities = (2, None)

    def __init__(self, cfg, info, options=None):
        super().__init__(cfg, info, options)
        mods = cfg.model.modalities
        self.logged = ("loss", "l_cls") + tuple(f"pareto_cos/{m}" for m in mods) + tuple(
            f"pareto_weight/{m}" for m in mods)

    def line(self, record: dict) -> str:
        mods = [m for m in self.cfg.model.modalities if f"pareto_cos/{m}" in record]
        return ("pareto cos " + ", ".join(f"{m} {record[f'pareto_cos/{m}']:+.2f} (w {record[f'pareto_weight/{m}']:.2f})"
                                          for m in mods)) if mods else ""

    def step(self, ctx: StepContext):
        mods, labels = ctx.modalities, ctx.labels

        def each(params):
            out, model_state = ctx.forward(params)
            terms = [losses.cross_entropy(out["logits"], labels)]
            terms += [losses.cross_entropy(out["modality_logits"][m], labels) for m in mods]
            return jnp.stack(terms), model_state

        values, vjp, model_state = jax.vjp(each, ctx.state.params, has_aux=True)
        per_loss = jax.vmap(lambda e: vjp(e)[0])(jnp.eye(len(values), dtype=values.dtype))  # [1 + M, ...] leaves
        pick = lambda i: jax.tree_util.tree_map(lambda g: g[i], per_loss)
        g_sum = jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), per_loss)
        g_mm = pick(0)
        grads = dict(g_sum)
        metrics = {"loss": jnp.sum(values), "l_cls": values[0]}
        keys = modality_keys(g_sum, mods)
        for i, m in enumerate(mods):
            g_m = pick(1 + i)
            mm, uni, tot = ({k: t[k] for k in keys[m]} for t in (g_mm, g_m, g_sum))
            norm_mm, norm_uni = optax.tree.norm(mm), optax.tree.norm(uni)
            dot = optax.tree.vdot(mm, uni)
            cos = dot / jnp.maximum(norm_mm * norm_uni, 1e-8)
            c = jnp.where(cos > 0, 0.5, min_norm_weight(norm_mm**2, dot, norm_uni**2))

            def combine(a, b, s):
                d = 2 * (c * a + (1 - c) * b)
                ratio = jnp.linalg.norm(jnp.ravel(s)) / jnp.linalg.norm(jnp.ravel(d))
                return self.options.gamma * jnp.where(ratio > 1, ratio, 1.0) * d

            for k in keys[m]:
                grads[k] = jax.tree_util.tree_map(combine, mm[k], uni[k], tot[k])
            metrics[f"pareto_cos/{m}"], metrics[f"pareto_weight/{m}"] = cos, c
        new = self.apply_gradients(ctx, ctx.state, grads, {"metrics": metrics, "model_state": model_state})
        return new, finish_metrics(metrics, grads, new)


__all__ = ["MMPareto", "MMParetoOptions", "min_norm_weight"]
