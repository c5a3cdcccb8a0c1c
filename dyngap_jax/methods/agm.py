"""AGM (Li, Li, Hu, Lei, Li & Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation", ICCV
2023), as the authors' code computes it (lihong2303/AGM_ICCV2023: ``model/CREMAD_net.py``, ``GradMod``, and
``run/CREMAD_main.py``, ``train``; ``model/URFunny_net.py`` and ``run/URFunny_main.py`` for three modalities).

On each batch:

* **Contributions.** The model runs on every non-empty subset ``S`` of the modalities, the others set to zeros:
  ``f(S)``; the full pass in training mode (its BatchNorm statistics are the step's), the others in evaluation
  mode (their ``self.net.eval()``: the running statistics the full pass has just updated, no dropout), all with
  gradients (none through the running statistics, which PyTorch updates outside autograd). Modality ``m``'s output is its Shapley value with the empty set's pass left out,
  ``o_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! (f(S + m) - f(S))`` with ``f({}) = 0`` (theirs: two
  modalities ``o_a = (f(av) - f(v) + f(a)) / 2``; three, the thirds and sixths of ``URFunny_net.py``); the
  ``o_m`` sum to ``f(all)``, which the fused cross-entropy is taken of. Their all-zeros pass, which no loss
  reads, is not run: ``2^M - 1`` forward passes a step.
* **Scores.** ``s_m`` is the batch mean of ``-log p_m(y)`` (``p_m`` the softmax of ``o_m``, floored at 1e-8 as
  their two-modality code does); ``t_m`` its running mean over every step of the run so far (their
  ``train_score_*``, before this step's is added).
* **Coefficients.** ``r_m = exp((mean(s) - s_m) M / (M - 1))`` and the same of ``t`` (two modalities:
  ``exp(s_v - s_a)``), ``k_m = exp(alpha min(r_m(t) - r_m(s), cap))`` (their ``cap``: 10 in the CREMA-D
  script, 7 in the UR-Funny one, none in the AV-MNIST one, which ``configs/avmnist.py:agm`` follows).
* **Modulation.** Inside the epoch window the backward pass through ``o_m`` is scaled by ``k_m`` (their backward
  hooks on ``m_a_o`` / ``m_v_o``); outside it the scales keep their last values (their ``update_scale`` is not
  called), 1 before the window.
* **Clipping.** When any gradient of the fusion head's weight matrices leaves ``[-clip, clip]`` (their
  ``fusion_module.fc_out.weight``), every gradient is clipped to a global norm of ``clip`` (``clip_grad_norm_``,
  1e-6 added to the norm), inside the window or not: ``clip`` 1 in their CREMA-D and AV-MNIST scripts, 5 in the
  UR-Funny one; 0 turns it off.

The window counts epochs from 0, both ends included (their ``--modulation_starts 0 --modulation_ends 20`` count
from 1: epochs 0 to 19 here). BalanceBenchmark's port (``AGM_trainer.py``) is not followed: its contributions
take the opposite sign of the authors'. State (checkpointed): the scales and the running scores.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import optax

from dyngap_jax import losses
from dyngap_jax.methods.base import Method, StepContext, check_window, finish_metrics, param_dtype
from dyngap_jax.methods.state import forward


@dataclasses.dataclass(frozen=True)
class AGMOptions:
    """``config.balance.options`` of ``agm``; defaults the original's (``utils/config.py``)."""

    alpha: float = 1.0  # --alpha: the modulation's strength
    cap: float = 10.0  # the bound on r(t) - r(s) in the exponent (their CREMA-D script; inf: none)
    modulation_starts: int = 0  # epochs from 0 (their --modulation_starts counts from 1)
    modulation_ends: int = 19  # included (their --modulation_ends 20)
    clip: float = 1.0  # clip_grad_norm_(clip) when the head's gradient leaves [-clip, clip]; 0: never

    def __post_init__(self):
        if not self.alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0, got {self.alpha}")
        if not self.cap > 0:
            raise ValueError(f"`cap` must be > 0, got {self.cap}")
        if not self.clip >= 0:
            raise ValueError(f"`clip` must be >= 0 (0: no clipping), got {self.clip}")
        check_window(self)


def shapley_weights(count: int) -> list[tuple[tuple[int, ...], dict[int, float]]]:
    """``[(subset, {i: weight})]``: each non-empty subset of ``range(count)`` (the full one first) with its weight in
    each modality's output, ``o_i = sum_S weight_S[i] f(S)`` (the empty set's pass left out)."""
    subsets = [s for r in range(count, 0, -1) for s in itertools.combinations(range(count), r)]
    w = lambda size: math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
    out = []
    for s in subsets:
        weights = {}
        for i in range(count):
            # f(S) enters o_i with + w(|S| - 1) when i is in S (as f(T + i), T = S - i), with - w(|S|) when not
            weights[i] = w(len(s) - 1) if i in s else -w(len(s))
        out.append((s, weights))
    return out


def coefficients(s, t, alpha, cap):
    """``k_m = exp(alpha min(r_m(t) - r_m(s), cap))``, ``r_m(x) = exp((mean(x) - x_m) M / (M - 1))``."""
    m = s.shape[0]
    r = lambda x: jnp.exp((jnp.mean(x) - x) * m / (m - 1))
    return jnp.exp(alpha * jnp.minimum(r(t) - r(s), cap))


def clip_global_norm(grads, max_norm=1.0):
    """PyTorch's ``clip_grad_norm_``: every gradient times ``min(1, max_norm / (norm + 1e-6))``."""
    factor = jnp.minimum(1.0, max_norm / (optax.tree.norm(grads) + 1e-6))
    return jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), grads)


class AGM(Method):
    """AGM's training step (the module docstring)."""

    name = "agm"
    Options = AGMOptions
    modalities = (2, None)

    def __init__(self, cfg, info, options=None):
        super().__init__(cfg, info, options)
        self.mods = tuple(cfg.model.modalities)
        self.logged = ("loss",) + tuple(f"agm_{k}/{m}" for k in ("coeff", "score") for m in self.mods)

    def init_state(self, params):
        zeros = jnp.zeros((len(self.mods),), param_dtype(params))
        return {"scale": zeros + 1.0, "score": zeros}

    def line(self, record: dict) -> str:
        if f"agm_coeff/{self.mods[0]}" not in record:
            return ""
        return "agm k " + ", ".join(f"{m} {record[f'agm_coeff/{m}']:.3f}" for m in self.mods)

    def step(self, ctx: StepContext):
        o, mods, labels = self.options, self.mods, ctx.labels
        own = ctx.state.method_state
        inside = self.in_window(ctx.state.step)
        plan = shapley_weights(len(mods))

        def outputs(params):
            """``(each modality's o_m, the full pass's BatchNorm statistics)``."""
            out, model_state = ctx.forward(params)  # all modalities, training mode
            passes = [out["logits"]]
            running = jax.lax.stop_gradient(model_state)  # PyTorch's running statistics are buffers: no gradient
            for subset, _ in plan[1:]:
                inputs = {k: (jnp.zeros_like(v) if k in mods and mods.index(k) not in subset else v)
                          for k, v in ctx.inputs.items()}
                passes.append(forward(ctx.model, params, running, inputs, ctx.rng, False)[0]["logits"])
            contrib = [sum(w[i] * f for (_, w), f in zip(plan, passes)) for i in range(len(mods))]
            return jnp.stack(contrib), model_state

        # one set of passes: the outputs, and their backward with each o_m's cotangent times its scale
        contrib, pullback, model_state = jax.vjp(outputs, ctx.state.params, has_aux=True)
        own_dtype = own["score"].dtype
        p_true = jnp.take_along_axis(jax.nn.softmax(contrib.astype(own_dtype), -1), labels[None, :, None], -1)[..., 0]
        s = jax.lax.stop_gradient(jnp.mean(-jnp.log(jnp.maximum(p_true, 1e-8)), axis=1))
        t = own["score"]
        it = (ctx.state.step + 1).astype(own_dtype)
        scale = jnp.where(inside, coefficients(s, t, o.alpha, o.cap), own["scale"])
        # the value is sum_m o_m = f(all); the gradient through each o_m times its scale (their backward hooks)
        loss, d_fused = jax.value_and_grad(lambda z: losses.cross_entropy(z, labels))(jnp.sum(contrib, axis=0))
        (grads,) = pullback(scale.astype(d_fused.dtype)[:, None, None] * d_fused[None])
        if o.clip:
            head = [g for g in jax.tree_util.tree_leaves(grads.get("fusion", {})) if g.ndim >= 2]
            big = jnp.any(jnp.stack([jnp.any(jnp.abs(g) > o.clip) for g in head])) if head else jnp.asarray(False)
            grads = jax.lax.cond(big, lambda g: clip_global_norm(g, o.clip), lambda g: g, grads)
        metrics = {"loss": loss, **{f"agm_coeff/{m}": scale[i] for i, m in enumerate(mods)},
                   **{f"agm_score/{m}": s[i] for i, m in enumerate(mods)}}
        state = ctx.state.replace(method_state={"scale": scale, "score": t * (it - 1) / it + s / it})
        new = self.apply_gradients(ctx, state, grads, {"metrics": metrics, "model_state": model_state})
        return new, finish_metrics(metrics, grads, new)


__all__ = ["AGM", "AGMOptions", "clip_global_norm", "coefficients", "shapley_weights"]
