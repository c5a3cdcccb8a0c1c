"""MLA (Zhang, Yoon, Bansal & Yao, "Multimodal Representation Learning by Alternating Unimodal Adaptation", CVPR
2024), as the authors' code computes it (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation,
``main.py`` with ``--gs_flag``: ``train_epoch`` and ``valid``; ``utils/utils.py``, ``GSPlugin``).

* **Model.** One linear head shared by the modalities (their ``fusion_module.fc_out``, ``Linear(512, C)``):
  ``configs/*.py:mla`` sets the ``shared`` fusion; every modality's features must have one width.
* **Training.** One forward pass of every encoder (training mode), then a unimodal step a modality, in the config's
  order (theirs: audio, then visual): the cross-entropy of the shared head on that modality's features alone,
  its backward, one optimiser step of that modality's encoder and the head. A later modality's loss reads the
  head the earlier steps have moved. No fused loss is trained. A parameter without a gradient in a step is
  skipped by it, as PyTorch's optimisers skip a ``None`` gradient (their ``del p.grad`` between batches and
  PyTorch 2's ``zero_grad``; the 1.8 they pin zeroes instead, which also decays and moves with momentum the audio
  encoder during the visual step: not reproduced). The optimiser's counters (its schedule's step, the plateau's
  accumulation, on the mean of the batch's unimodal losses) advance once a batch, so the learning rate is the
  epoch's in every step, as their ``StepLR``: exact for SGD; Adam's bias correction also counts batches, where
  PyTorch's counts each parameter's own steps (the head's ``M`` a batch).
* **Gradient modification** (``projection``). Their ``GSPlugin.before_update`` projects the head's weight gradient
  with a matrix ``P`` (one for all modalities, from the identity), updated from the stepping modality's batch-mean
  feature ``r`` before each step but the run's first: ``k = P r``, ``P <- P - (k k^T) / (a + k r^T)`` (the
  division element by element, as their ``torch.mm(k, r)`` is a matrix), ``P <- P / |P|_F``, the gradient
  ``G <- G P^T``, ``a = 0.1^(1 + b / n)`` (``b`` the batch's index in its epoch of ``n``). In the released code
  its name test (``n == "module.weight"`` on the head's own parameters, since the commit "Fix bugs", 11ae1ee) is
  never true, so nothing is projected: ``"none"``, the default. ``"first_commit"`` is the projection as the first
  commit (4735bbc) applied it. (BalanceBenchmark's port adds ``G P^T`` to ``G`` instead: not offered.)
* **Evaluation** (``fusion``). ``"entropy"`` (the paper's test-time fusion): each example's modality logits weighted
  by ``exp(max_j e_j - e_m) / sum_j exp(max_j e_j - e_j)``, ``e_m`` the entropy of its softmax over the classes.
  (Their code takes the softmax over the batch axis, one weight for a whole test batch, so that a prediction
  depends on the examples batched with it: not offered.) ``"fixed"``: the first modality's logits weighted
  ``fixed_weight`` (their ``av_alpha`` 0.55), the others sharing the rest.

Any number of modalities; ``M`` backward passes and optimiser steps a batch. State (``first_commit``): ``P`` and the
count of steps (checkpointed).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dyngap_jax import losses
from dyngap_jax.methods.base import Method, StepContext, finish_metrics, modality_keys


@dataclasses.dataclass(frozen=True)
class MLAOptions:
    """``config.balance.options`` of ``mla``; defaults the released code's (``--gs_flag --dynamic``)."""

    fusion: str = "entropy"  # evaluation: "entropy" (per example) or "fixed"
    fixed_weight: float = 0.55  # "fixed": the first modality's weight (their av_alpha)
    projection: str = "none"  # the head's gradient: "none" (the released code) or "first_commit"

    def __post_init__(self):
        if self.fusion not in ("entropy", "fixed"):
            raise ValueError(f"`fusion` must be 'entropy' or 'fixed', got {self.fusion!r}")
        if not 0 <= self.fixed_weight <= 1:
            raise ValueError(f"`fixed_weight` must be in [0, 1], got {self.fixed_weight}")
        if self.projection not in ("none", "first_commit"):
            raise ValueError(f"`projection` must be 'none' or 'first_commit', got {self.projection!r}")


def entropy_weights(modality_logits: list) -> jax.Array:
    """``[M, B]`` weights: ``exp(max_j e_j - e_m)`` normalised over the modalities, ``e_m`` each example's entropy of
    ``softmax(logits_m)`` over the classes."""
    e = jnp.stack([-jnp.sum(jax.nn.softmax(z, -1) * jax.nn.log_softmax(z, -1), -1) for z in modality_logits])
    return jax.nn.softmax(jnp.max(e, 0, keepdims=True) - e, axis=0)


def project(P, r, grad_kernel, batch_index, steps_per_epoch):
    """The first commit's ``before_update``: ``(new P, projected kernel gradient)``; ``r`` the ``[D]`` batch-mean feature,
    ``grad_kernel`` the head's ``[D, C]`` kernel gradient (PyTorch's weight gradient transposed)."""
    a = 0.1 ** (jnp.asarray(batch_index, P.dtype) / steps_per_epoch + 1.0)  # in P's precision, not the index's
    r = r[None, :]
    k = P @ r.T
    P = P - (k @ k.T) / (a + k @ r)
    P = P / jnp.linalg.norm(P)
    return P, P @ grad_kernel  # (G P^T)^T = P G^T


class MLA(Method):
    """MLA's training step and fusion (the module docstring)."""

    name = "mla"
    Options = MLAOptions
    modalities = (2, None)

    def __init__(self, cfg, info, options=None):
        super().__init__(cfg, info, options)
        self.mods = tuple(cfg.model.modalities)
        self.logged = ("loss",) + tuple(f"mla_loss/{m}" for m in self.mods)
        precision = getattr(cfg, "precision", None)  # the validated config's (a bare config: float32)
        self.compute_dtype = jnp.dtype(precision.compute_dtype if precision is not None else "float32")

    @classmethod
    def check(cls, cfg, options) -> None:
        super().check(cfg, options)
        if dict(cfg.model.fusion).get("name") != "shared":
            raise ValueError(f"config.model.fusion.name: {cls.name!r} trains one head shared by the modalities: "
                             f"the 'shared' fusion, got {dict(cfg.model.fusion).get('name')!r}")

    def init_state(self, params):
        if self.options.projection == "none":
            return None
        kernel = params["fusion"]["head"]["kernel"]
        return {"P": jnp.eye(kernel.shape[0], dtype=kernel.dtype), "count": jnp.zeros((), jnp.int32)}

    def line(self, record: dict) -> str:
        if f"mla_loss/{self.mods[0]}" not in record:
            return ""
        return "unimodal loss " + ", ".join(f"{m} {record[f'mla_loss/{m}']:.4f}" for m in self.mods)

    def fuse(self, outputs, method_state):
        per = [outputs["modality_logits"][m] for m in self.mods]
        if self.options.fusion == "fixed":
            w = self.options.fixed_weight
            rest = (1 - w) / (len(per) - 1)
            return w * per[0] + sum(rest * z for z in per[1:])
        return jnp.sum(entropy_weights(per)[..., None] * jnp.stack(per), axis=0)

    def step(self, ctx: StepContext):
        mods, labels = self.mods, ctx.labels
        state = ctx.state
        out, pullback, model_state = _features_vjp(ctx)
        keys = modality_keys(state.params, mods)
        metrics, grad_sq = {}, 0.0
        method_state = state.method_state
        for i, m in enumerate(mods):
            head = state.params["fusion"]["head"]
            z = out[m]

            def unimodal(h, z):  # the head at the compute precision, as the model's Dense (evaluation's head)
                dtype = self.compute_dtype
                logits = z.astype(dtype) @ h["kernel"].astype(dtype) + h["bias"].astype(dtype)
                return losses.cross_entropy(logits.astype(jnp.promote_types(dtype, jnp.float32)), labels)

            loss, (g_head, g_z) = jax.value_and_grad(unimodal, argnums=(0, 1))(head, z)
            cot = {n: (g_z if n == m else jnp.zeros_like(v)) for n, v in out.items()}
            (g_enc,) = pullback(cot)
            if method_state is not None:  # the first commit's projection, all but the run's first step
                P, projected = project(method_state["P"], jnp.mean(jax.lax.stop_gradient(z), 0).astype(
                    method_state["P"].dtype), g_head["kernel"], state.step % self.info.steps_per_epoch,
                    self.info.steps_per_epoch)
                first = method_state["count"] == 0
                g_head = {**g_head, "kernel": jnp.where(first, g_head["kernel"], projected)}
                method_state = {"P": jnp.where(first, method_state["P"], P), "count": method_state["count"] + 1}
            grads = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            grads = {**grads, **{k: g_enc[k] for k in keys[m]},
                     "fusion": {**grads["fusion"], "head": g_head}}
            metrics[f"mla_loss/{m}"] = loss
            mean = sum(metrics.values()) / len(metrics)  # at the last step: the batch's mean (the plateau's value)
            state = self._substep(ctx, state, grads, [*keys[m], "fusion"], last=i == len(mods) - 1, loss=mean)
            grad_sq = grad_sq + optax.tree.norm(grads) ** 2
        metrics["loss"] = sum(metrics[f"mla_loss/{m}"] for m in mods) / len(mods)
        new = state.replace(step=ctx.state.step + 1, model_state=model_state, method_state=method_state)
        done = finish_metrics(metrics, {"all": jnp.sqrt(grad_sq)}, new)
        return new, done

    def _substep(self, ctx, state, grads, active, *, last: bool, loss):
        """One optimiser step of the top-level subtrees ``active``: every other parameter and its optimiser state left
        as they are; the optimiser's counters (not of a parameter's shape) advanced only at the batch's ``last``."""
        updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params, value=loss)
        mask = {k: jax.tree_util.tree_map(lambda _, on=k in active: on, v) for k, v in state.params.items()}
        params = {k: (optax.apply_updates(v, updates[k]) if k in active else v) for k, v in state.params.items()}
        keep = optax.tree_map_params(ctx.tx, lambda _, on: on, opt_state, mask, transform_non_params=lambda _: last)
        opt_state = jax.tree_util.tree_map(lambda on, new, old: new if on else old, keep, opt_state, state.opt_state)
        return state.replace(params=params, opt_state=opt_state)


def _features_vjp(ctx: StepContext):
    """``(features, pullback, new BatchNorm statistics)`` of the step's one forward pass (training mode)."""
    def features(params):
        out, model_state = ctx.forward(params)
        return out["features"], model_state

    return jax.vjp(features, ctx.state.params, has_aux=True)


__all__ = ["MLA", "MLAOptions", "entropy_weights", "project"]
