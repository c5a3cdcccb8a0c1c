"""Gradient-Blending (Wang, Tran & Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?", CVPR
2020), online: the paper's Algorithm (its authors released no code), checked against BalanceBenchmark's port
(GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/GBlending_trainer.py``, ``super_epoch_origin``).

* **The loss.** ``sum_k w_k CE_k`` over the heads ``k``: the fused head and a head a modality (the paper's
  unimodal classifiers: ``configs/*.py:gblending`` sets the ``concat`` fusion with ``unimodal_heads``).
* **The weights**, estimated before every ``super_epoch``-th epoch (the first included) and held until the next:
  for each head ``k``, a copy of the model and a fresh optimiser train on ``CE_k`` alone for ``super_epoch``
  epochs (the training split in the coming epochs' own shuffles); with ``T_1, T_n`` its mean training loss over
  the first and the last of them and ``V_1, V_n`` its validation loss after each, the generalisation gain is
  ``G = V_1 - V_n`` and the change in overfitting ``O = (V_n - T_n) - (V_1 - T_1)``, and
  ``w_k = |G / O^2|`` normalised to sum to 1 (the paper's ``w ~ G / O^2``; BalanceBenchmark's absolute value).
  The copies are thrown away. Where BalanceBenchmark differs: it sums the losses over batches, so its ``O``
  compares a training sum over many batches with a validation sum over few (here means, as the paper's losses);
  and its copy for a modality trains the *fused* output with the other modalities' inputs zeroed, where here
  (the paper's unimodal models) it trains that modality's own head.

Cost: ``M + 1`` extra training runs of ``super_epoch`` epochs every ``super_epoch`` epochs (about ``M + 2`` times
the plain run). BalanceBenchmark's default ``super_epoch`` 10; its ``modulation_starts`` / ``modulation_ends``
are read by nothing there. Any number of modalities. The weights are state (checkpointed); a run resumed
inside an epoch keeps the ones estimated for it. An estimate is not checkpointed while it runs: a preemption
signal is honoured when it ends (the loop checks after each train step), and a kill inside it repeats it.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dyngap_jax import losses, parallel
from dyngap_jax.methods.alpha_step import with_precision
from dyngap_jax.methods.base import Method, Part, StepContext, param_dtype
from dyngap_jax.methods.state import forward


@dataclasses.dataclass(frozen=True)
class GBlendingOptions:
    """``config.balance.options`` of ``gblending``; the default BalanceBenchmark's (``trainer_config.yaml``)."""

    super_epoch: int = 10  # epochs between estimates, and each estimate's epochs of training

    def __post_init__(self):
        if self.super_epoch < 2:
            raise ValueError(f"`super_epoch` must be >= 2 (the first and the last of its epochs are compared), got "
                             f"{self.super_epoch}")


def head_losses(outputs, labels, modalities) -> jax.Array:
    """``[1 + M]``: the fused head's cross-entropy, then each modality's head's."""
    return jnp.stack([losses.cross_entropy(outputs["logits"], labels)]
                     + [losses.cross_entropy(outputs["modality_logits"][m], labels) for m in modalities])


def blend_weights(train_first, train_last, val_first, val_last) -> np.ndarray:
    """``w_k = |G_k / O_k^2|`` normalised (the module docstring), from each head's four mean losses."""
    g = np.asarray(val_first, float) - np.asarray(val_last, float)
    o = (np.asarray(val_last, float) - np.asarray(train_last, float)) - (
        np.asarray(val_first, float) - np.asarray(train_first, float))
    w = np.abs(g) / np.maximum(o**2, np.finfo(float).tiny)
    return w / w.sum()


class GBlending(Method):
    """Gradient-Blending's training step (the module docstring); the weights come from :class:`Blend`."""

    name = "gblending"
    Options = GBlendingOptions
    modalities = (2, None)

    def __init__(self, cfg, info, options=None):
        super().__init__(cfg, info, options)
        self.mods = tuple(cfg.model.modalities)
        self.heads = ("fused",) + self.mods
        self.logged = ("loss",) + tuple(f"blend_weight/{k}" for k in self.heads)

    @classmethod
    def check(cls, cfg, options) -> None:
        super().check(cfg, options)
        fusion = dict(cfg.model.fusion).get("name")
        if fusion not in ("concat", "sum", "weighted"):
            raise ValueError(f"config.model.fusion.name: {cls.name!r} trains a head a modality beside the fused one; "
                             f"a {fusion!r} head has none (concat with unimodal_heads, sum or weighted have)")

    def init_state(self, params):
        dtype = param_dtype(params)
        return {"weights": jnp.full((len(self.heads),), 1.0 / len(self.heads), dtype)}

    def line(self, record: dict) -> str:
        if f"blend_weight/{self.heads[0]}" not in record:
            return ""
        return "blend w " + ", ".join(f"{k} {record[f'blend_weight/{k}']:.3f}" for k in self.heads)

    def loss(self, ctx: StepContext, params):
        out, model_state = ctx.forward(params)
        w = ctx.state.method_state["weights"]
        each = head_losses(out, ctx.labels, self.mods)
        value = jnp.sum(w.astype(each.dtype) * each)
        metrics = {"loss": value, **{f"blend_weight/{k}": w[i] for i, k in enumerate(self.heads)}}
        return value, {"outputs": out, "model_state": model_state, "metrics": metrics}

    def parts(self):
        return [Blend(self)]


class Blend(Part):
    """The weights' estimates (the module docstring), before every ``super_epoch``-th epoch."""

    name = "gblending"

    def __init__(self, method: GBlending):
        self.method, self.mods, self.heads = method, method.mods, method.heads
        self.made_for, self.estimates = None, []
        self.run, self.temp_step, self.eval_step = None, None, None

    def open(self, run, state, saved, *, donate=True):
        saved = saved or {}
        self.run, self.made_for = run, saved.get("made_for")
        self.estimates = list(saved.get("estimates") or [])
        model, tx, mods = run.compute_model, run.tx, self.mods

        @with_precision(run.cfg.precision.matmul)
        def temp_step(state, batch, head):
            """One step of a copy on ``CE_head`` alone: ``(state, that loss)``."""
            rng = jax.random.fold_in(state.rng, state.step)
            inputs = run.prepare(batch)

            def f(params):
                out, model_state = forward(model, params, state.model_state, inputs, rng, True)
                return head_losses(out, inputs["label"], mods)[head], model_state

            (loss, model_state), grads = jax.value_and_grad(f, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
            return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                 model_state=model_state, opt_state=opt_state), loss

        self.temp_step = jax.jit(temp_step)  # the head an argument: one program for every head
        self.eval_step = run.eval_step(state)

    def val_losses(self, state) -> np.ndarray:
        """``[1 + M]`` mean validation cross-entropies of the heads (each example once, in evaluation mode)."""
        # the loop's evaluation (dyngap_jax.train imports the methods, so not at the top)
        from dyngap_jax.train.evaluation import _log_softmax_at, predict

        logits, per, _, labels = predict(state, self.eval_step, self.run, "validation")
        ce = lambda z: float(np.mean(-_log_softmax_at(np.asarray(z, np.float64), labels)))
        return np.asarray([ce(logits)] + [ce(per[m]) for m in self.mods])

    def estimate(self, state, epoch: int) -> np.ndarray:
        run, n = self.run, self.method.options.super_epoch
        four = np.zeros((4, len(self.heads)))  # T_1, T_n, V_1, V_n
        t0 = time.time()
        for k in range(len(self.heads)):
            copy = state.replace(opt_state=run.tx.init(state.params))
            for e in range(n):
                total, count = 0.0, 0
                for batch in run.loader("train", train=True, epoch=epoch + e):
                    copy, loss = self.temp_step(copy, parallel.shard_batch(batch, run.mesh), jnp.int32(k))
                    total, count = total + loss, count + 1
                if e in (0, n - 1):
                    row = 0 if e == 0 else 1
                    four[row, k] = float(total) / max(count, 1)
                    four[2 + row, k] = self.val_losses(copy)[k]
        weights = blend_weights(*four)
        self.estimates.append({"epoch": epoch, "weights": weights.tolist(), "losses": four.tolist()})
        if run.cfg.progress and jax.process_index() == 0:
            print(f"  G-Blending weights for epochs {epoch + 1}-{epoch + n}: "
                  + ", ".join(f"{h} {w:.3f}" for h, w in zip(self.heads, weights))
                  + f" ({time.time() - t0:.1f} s)", flush=True)
        return weights

    def epoch_start(self, state, epoch):
        if epoch % self.method.options.super_epoch or self.made_for == epoch:
            return state
        old = state.method_state["weights"]
        weights = jnp.asarray(self.estimate(state, epoch), old.dtype)
        self.made_for = epoch
        state = state.replace(method_state={"weights": weights})
        return jax.device_put(state, self.run.shardings(state)[0])  # on the run's mesh, as the loop placed it

    def to_json(self):
        return {"made_for": self.made_for, "estimates": self.estimates}

    def summary(self, state, history):
        return {"gblending_estimates": self.estimates}


__all__ = ["Blend", "GBlending", "GBlendingOptions", "blend_weights", "head_losses"]
