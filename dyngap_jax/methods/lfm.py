"""LFM, the paper's method, on the method interface: Eq. 1 with its alpha strategy.

The train step descends ``loss.scale x L_total``, ``L_total = (1 - alpha) L_CLS + alpha L_MM``
(:func:`dyngap_jax.losses.total`) at the state's alpha. Alpha comes from ``config.alpha``: a fixed
strategy of the epoch (:class:`FixedAlpha`, set before each epoch) or the learned one, whose
**alpha step** (Algorithm 1; :class:`AlphaStep`) runs beside the train step: after every
``alpha.inner_iters`` train steps (0: the epoch's last one) or before each epoch (the authors'
code), on the inner and outer batches ``alpha.inner`` / ``alpha.outer`` name, in the BatchNorm mode
``alpha.batch_norm`` names, its diagnostics fetched with the step metrics and reported per epoch
and per run. The authors' released recipe is this method configured otherwise (``configs/_base.py``).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from dyngap_jax import alpha as alpha_lib
from dyngap_jax import hypergrad, losses, parallel
from dyngap_jax.methods.alpha_step import TRAINING_INPUTS, make_alpha_step, resolve_loop
from dyngap_jax.methods.base import Method, Part, StepContext, StepInfo


def mm_loss_fn(kind: str, modalities: Sequence[str], temperature: float, per_pair: bool) -> Callable:
    """L_MM from the model's output dict: InfoNCE between features (the paper) or the authors' JS alignment."""
    if kind == "infonce":
        return lambda out: losses.modality_matching([out["features"][m] for m in modalities], temperature,
                                                    reduce=not per_pair)
    if kind == "js":
        return lambda out: losses.js_alignment([out["modality_logits"][m] for m in modalities], reduce=not per_pair)
    if kind == "none":
        zero = jnp.zeros((losses.num_pairs(len(modalities)),)) if per_pair else jnp.zeros(())
        return lambda out: zero
    raise ValueError(f"config.loss.mm: unknown modality-matching loss {kind!r}; known: infonce, js, none")


def learned_alpha(cfg, alpha_steps_per_epoch: int) -> alpha_lib.LearnedAlpha:
    """The :class:`~dyngap_jax.alpha.LearnedAlpha` of ``config.alpha.learned`` (one weight per pair if
    ``per_pair``), kept to the run's resolved ``cfg.precision.alpha_dtype``, its learning rate included:
    float32, or double precision (a float64 in a float64 run, else a pair of float32s)."""
    lcfg, mods = cfg.alpha.learned, cfg.model.modalities
    lr = alpha_lib.authors_lr_schedule(alpha_steps_per_epoch) if lcfg.schedule == "authors" else lcfg.learning_rate
    per_pair = lcfg.per_pair and cfg.alpha.strategy == "learned"
    return alpha_lib.LearnedAlpha(init=lcfg.init, learning_rate=lr, clip=tuple(lcfg.clip),
                                  num_pairs=max(1, len(mods) * (len(mods) - 1) // 2) if per_pair else None,
                                  optimizer=lcfg.optimizer, precision=cfg.precision.alpha_dtype)


@dataclasses.dataclass(frozen=True)
class LFMOptions:
    """LFM's options are the config's ``loss`` and ``alpha`` sections."""


class LFM(Method):
    """Eq. 1 at the state's alpha; alpha fixed by the epoch or learned (Algorithm 1)."""

    name = "lfm"
    Options = LFMOptions
    reads = ("loss", "alpha")
    logged = ("loss", "l_cls", "l_mm")

    def __init__(self, cfg, info, options=None):
        super().__init__(cfg, info, options)
        acfg = cfg.alpha
        self.learned_strategy = acfg.strategy == "learned"
        per_pair = self.learned_strategy and acfg.learned.per_pair
        self.mm_loss = mm_loss_fn(cfg.loss.mm, cfg.model.modalities, cfg.loss.temperature, per_pair)
        self.scale = cfg.loss.scale
        self.fixed = None if self.learned_strategy else alpha_lib.fixed_strategy(acfg.strategy)
        self.learned, self.estimator, self.warm_power, self.reuse_lambda = None, None, False, False
        if self.learned_strategy:
            inner = acfg.inner_iters
            self.learned = learned_alpha(cfg, max(1, info.steps_per_epoch // inner) if inner else 1)
            self.estimator = resolve_estimator(acfg.hypergrad.estimator, info)
            missing = [i for i in self.estimator.required_inputs() if i not in TRAINING_INPUTS]
            if missing:
                raise ValueError(f"config.alpha.hypergrad: method {self.estimator.name!r} with these options needs "
                                 f"{missing}, which the training loop does not provide")
            require = acfg.hypergrad.require_converged
            self.require_converged = self.estimator.exact if require is None else require
            self.warm_start = acfg.hypergrad.warm_start and "x0" in self.estimator.inputs
            # the power iteration's last iterate kept for the next step, where the method runs one
            relative = bool(getattr(self.estimator, "relative", False))
            self.warm_power = acfg.hypergrad.warm_power and "v0" in self.estimator.inputs and relative
            # the last solve's top Ritz value, where the method returns one (CG's residual rule, normal or GN)
            self.reuse_lambda = (acfg.hypergrad.reuse_lambda and "lambda_max" in self.estimator.inputs and relative
                                 and getattr(self.estimator, "scalar_tol", None) is None
                                 and getattr(self.estimator, "operator", None) in ("normal", "gauss_newton"))

    def init_fields(self, params) -> dict:
        learned = self.learned or alpha_lib.LearnedAlpha(init=0.0)
        solution = jax.tree_util.tree_map(jnp.zeros_like, params) if self.learned and self.warm_start else None
        return {"alpha": learned.create(), "alpha_solution": solution, "method_state": self.init_state(params)}

    def init_state(self, params):
        """With ``alpha.hypergrad.warm_power``, ``"power_vector"``: zeros like params (a zero start is the cold
        one); with ``reuse_lambda``, ``"lambda_max"``: 0 (none kept: the power iteration runs); else None."""
        state = {}
        if self.warm_power:
            state["power_vector"] = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
        if self.reuse_lambda:
            state["lambda_max"] = jnp.zeros((), jnp.float32)
        return state or None

    def loss(self, ctx: StepContext, params):
        out, model_state = ctx.forward(params)
        l_cls = losses.cross_entropy(out["logits"], ctx.labels)
        l_mm = self.mm_loss(out)
        loss = losses.total(l_cls, l_mm, ctx.state.alpha.value)
        return self.scale * loss, {"outputs": out, "model_state": model_state,
                                   "metrics": {"loss": loss, "l_cls": l_cls, "l_mm": jnp.mean(l_mm)}}

    def parts(self) -> list[Part]:
        if self.learned_strategy:
            return [AlphaStep(self)]
        return [FixedAlpha(self.fixed, self.cfg.train.num_epochs)]


def resolve_estimator(method: hypergrad.Method, info) -> hypergrad.Method:
    """The hypergradient method with what needs the model checked: the authors' "first tensor" resolved to the
    parameter the model creates first (PyTorch's registration order), ``dense``'s size limit."""
    if isinstance(method, hypergrad.LFMCode) and method.tensor:
        order = list(info.parameter_order)
        if method.tensor == "first":
            method = dataclasses.replace(method, tensor=order[0])
        elif method.tensor not in order:
            raise ValueError(f"config.alpha.hypergrad.options.tensor: {method.tensor!r} is not a parameter of the "
                             f"model; its first ones (in PyTorch's order): {', '.join(order[:4])}, ...")
    if isinstance(method, hypergrad.Dense):
        try:
            method.check_size(info.num_params)
        except hypergrad.OptionError as e:
            raise ValueError(f"config.alpha.hypergrad.options.max_params: {e}") from None
    return method


def _alpha_entries(state) -> dict:
    alpha = state.alpha.exact()  # to the precision alpha is kept to (config.alpha.learned.precision)
    return {"alpha": alpha.tolist(), "alpha_mean": float(np.mean(alpha)),
            "alpha_skipped": int(jax.device_get(state.alpha.skipped))}


def _alpha_words(record) -> str:
    a = np.asarray(record["alpha"])
    return f"alpha {float(a):.4f}" if a.ndim == 0 else "alpha " + np.array2string(a, precision=4)


class FixedAlpha(Part):
    """A fixed strategy: alpha set before each epoch from the epoch (the paper's t = epoch + 1)."""

    name = "alpha"
    history_keys = ("alpha", "alpha_skipped")

    def __init__(self, fn, num_epochs: int):
        self.fn, self.num_epochs, self.run = fn, num_epochs, None

    def open(self, run, state, saved, *, donate=True):
        self.run = run

    def epoch_start(self, state, epoch):
        value = jnp.asarray(self.fn(epoch + 1, self.num_epochs), state.alpha.value.dtype)
        return jax.device_put(state.replace(alpha=state.alpha.replace(value=value)), self.run.shardings(state)[0])

    def epoch_record(self, state):
        return _alpha_entries(state)

    def line(self, record):
        return _alpha_words(record)

    def summary(self, state, history):
        return {"final_alpha": state.alpha.exact().tolist(), "alpha_steps": alpha_summary(history)}


PROGRESS_SECONDS = 15.0  # a host-driven alpha step longer than this prints where it is, this often

ALPHA_KEYS = ("alpha_steps", "alpha_converged", "hypergrad_skipped", "hypergrad_iterations", "hypergrad_iterations_max",
              "hypergrad_hvps", "hypergrad_residual", "hypergrad_residual_max", "hypergrad_damping",
              "hypergrad_hypergradient", "hypergrad_bound", "hypergrad_bound_max")


class AlphaStep(Part):
    """Algorithm 1's alpha step as one part: when it runs, its batches (and their iterator state), the
    BatchNorm mode, the compiled step (:func:`~dyngap_jax.methods.alpha_step.make_alpha_step`) and its
    diagnostics.

    The outer batch: the next of ``alpha.outer``'s loader, or the fixed held-out batch (the first
    ``alpha.batch_size`` of ``alpha.heldout`` training examples kept out of training, augmented once).
    The inner batch: the train step's batch (its first ``alpha.batch_size`` examples), or with
    ``alpha.inner="outer"`` the outer batch itself. ``train_bn`` (BatchNorm's training mode, for
    ``alpha.batch_norm="authors"``) holds until the run's first evaluation.
    """

    name = "alpha"
    history_keys = ("alpha", "alpha_skipped") + ALPHA_KEYS

    def __init__(self, lfm: LFM):
        self.lfm, self.acfg = lfm, lfm.cfg.alpha
        self.pending, self.log, self.before_evaluation = [], [], True
        self.seconds = 0.0  # the alpha steps' wall time over the run (resumed runs add theirs)
        self.current_step, self.progress_next, self.step_t0 = 0, PROGRESS_SECONDS, time.perf_counter()
        self.run, self.step_fn, self.outer_it, self.outer_fixed = None, None, None, None

    def compile(self, run, state, donate: bool = True):
        """The jitted alpha step on the run's mesh, at the run's resolved precision."""
        lfm, p = self.lfm, run.cfg.precision
        return make_alpha_step(model=run.model, mm_loss=lfm.mm_loss, learned=lfm.learned, method=lfm.estimator,
                               require_converged=lfm.require_converged, shardings=run.shardings(state),
                               precision="float64" if p.alpha_float64 else p.alpha_matmul,
                               warm_start=lfm.warm_start, warm_power=lfm.warm_power, reuse_lambda=lfm.reuse_lambda,
                               prepare=run.prepare, donate=donate,
                               hvp_remat=self.acfg.hypergrad.remat, batch_norm=self.acfg.batch_norm,
                               loop=resolve_loop(self.acfg.hypergrad.loop), progress=self._progress)

    def _progress(self, name: str, iteration: int):
        """A long alpha step (host-driven loops) prints where it is every ``PROGRESS_SECONDS`` (the project's
        progress is printed, whatever absl's verbosity; by the first process only)."""
        elapsed = time.perf_counter() - self.step_t0
        if elapsed >= self.progress_next:
            if jax.process_index() == 0:
                tqdm.write(f"  alpha step at step {self.current_step}: {name} iteration {iteration} "
                           f"({elapsed:.0f} s into the step)")  # above the epoch's progress bar, if one is drawn
                sys.stdout.flush()
            self.progress_next = elapsed + PROGRESS_SECONDS

    def open(self, run, state, saved, *, donate=True):
        self.run, self.step_fn = run, self.compile(run, state, donate)
        saved = saved or {}
        if self.acfg.outer == "heldout":
            self.outer_fixed = parallel.shard_batch(run.heldout_batch(), run.mesh)
        else:
            self.outer_it = iter(run.loader(self.acfg.outer, train=True, infinite=True, batch_size=run.batch.alpha))
            if saved.get("outer_iter") is not None:
                state_ = saved["outer_iter"]
                self.outer_it.set_state(state_.encode() if isinstance(state_, str) else state_)
        self.log = list(saved.get("log") or [])
        self.seconds = float(saved.get("seconds") or 0.0)
        self.before_evaluation = not saved.get("evaluated", False)

    def before_step(self, state, info: StepInfo):
        if self.acfg.when == "epoch_start" and info.index == 0:  # the authors' order: alpha first, then the epoch
            return self._step(state, info, info.step)
        return state

    def after_step(self, state, info: StepInfo):
        inner_iters = self.acfg.inner_iters  # every inner_iters train steps counted over the run, or once an epoch
        due = info.step % inner_iters == 0 if inner_iters else info.last
        if self.acfg.when == "after_steps" and due:
            return self._step(state, info, info.step)
        return state

    def _step(self, state, info: StepInfo, step: int):
        run = self.run
        outer = self.outer_fixed if self.outer_fixed is not None else parallel.shard_batch(next(self.outer_it), run.mesh)
        if self.acfg.inner == "outer":
            inner = outer
        elif run.batch.local_alpha == run.batch.local_train:
            inner = info.batch
        else:
            inner = parallel.shard_batch({k: v[:run.batch.local_alpha] for k, v in info.local.items()}, run.mesh)
        jax.block_until_ready(state.params)  # the train steps queued before it: the time below is the alpha step's
        self.current_step, self.progress_next = step, PROGRESS_SECONDS
        t0 = self.step_t0 = time.perf_counter()
        state, res, usable = self.step_fn(state, inner, outer, self.before_evaluation)
        jax.block_until_ready(usable)
        self.pending.append((step, res, usable, time.perf_counter() - t0))
        return state

    def evaluated(self, evals):
        self.before_evaluation = False

    def fetch(self):
        if not self.pending:
            return
        results = jax.device_get([r[1:3] for r in self.pending])
        for (step, _, _, seconds), (res, applied) in zip(self.pending, results):
            info = {k: (bool(v) if np.asarray(v).dtype == bool else float(v)) for k, v in res.info.items()}
            info["hypergradient"] = float(np.mean(np.asarray(res.value)))
            info["applied"] = bool(applied)
            info["seconds"] = seconds
            self.seconds += seconds
            self.log.append(info)
            if not info["applied"]:
                logging.warning("alpha step at %d skipped: %s", step, info)
        self.pending = []

    def epoch_record(self, state):
        record = {**_alpha_entries(state), **alpha_diagnostics(self.log)}
        self.log = []
        return record

    def line(self, record):
        words = _alpha_words(record)
        if not record.get("alpha_steps"):
            return words
        skipped = f", {record['hypergrad_skipped']} skipped" if record["hypergrad_skipped"] else ""
        if "hypergrad_seconds" in record:  # what the steps cost
            skipped += f"; {record['hypergrad_hvps']:.0f} HVPs, {record['hypergrad_seconds']:.1f} s"
        if "hypergrad_bound_max" in record:  # a solve stopped on the hypergradient's certified bound
            return (words + f"  alpha steps {record['alpha_converged']}/{record['alpha_steps']} certified "
                    f"({record['hypergrad_iterations']:.0f} it, relative bound max {record['hypergrad_bound_max']:.1e})"
                    + skipped)
        if "hypergrad_residual_max" in record:  # a solve: did it reach its tolerance
            return (words + f"  alpha steps {record['alpha_converged']}/{record['alpha_steps']} converged "
                    f"({record['hypergrad_iterations']:.0f} it, residual max {record['hypergrad_residual_max']:.1e})"
                    + skipped)
        # an estimate that solves nothing (the authors' H g, a series)
        return (words + f"  alpha steps {record['alpha_steps'] - record['hypergrad_skipped']}/{record['alpha_steps']} "
                f"applied (hypergradient {record['hypergrad_hypergradient']:.3g})" + skipped)

    def to_json(self):
        it = None
        if self.outer_it is not None:
            it = self.outer_it.get_state()
            it = it.decode() if isinstance(it, bytes) else it
        return {"outer_iter": it, "log": list(self.log), "evaluated": not self.before_evaluation, "seconds": self.seconds}

    def summary(self, state, history):
        # the wall time under "timing": what a process measured (a resumed run's differs), left out of comparisons
        return {"final_alpha": state.alpha.exact().tolist(), "alpha_steps": alpha_summary(history),
                "timing": {"alpha_step_seconds": self.seconds}}


def alpha_diagnostics(hyper_log: list[dict]) -> dict:
    """An epoch's alpha steps: how many, converged, skipped; iterations, HVPs, residuals, damping, and the power
    iterations and ``|lambda|_max`` of a relative damping."""
    if not hyper_log:
        return {}
    finite = lambda k: [h[k] for h in hyper_log if k in h and np.isfinite(h[k])]
    out = {"alpha_steps": len(hyper_log), "alpha_converged": sum(bool(h["converged"]) for h in hyper_log),
           "hypergrad_skipped": sum(not h["applied"] for h in hyper_log),
           "hypergrad_iterations": float(np.mean([h["iterations"] for h in hyper_log])),
           "hypergrad_iterations_max": float(np.max([h["iterations"] for h in hyper_log])),
           "hypergrad_hvps": float(np.sum([h["hvp_count"] for h in hyper_log])),
           "hypergrad_hypergradient": float(np.mean([h["hypergradient"] for h in hyper_log]))}
    residuals = finite("residual")
    if residuals:
        out.update(hypergrad_residual=float(np.mean(residuals)), hypergrad_residual_max=float(np.max(residuals)))
    if finite("damping"):
        out["hypergrad_damping"] = float(np.mean(finite("damping")))
    if finite("power_iterations"):  # a relative damping's |lambda|_max: its cost and its value
        out["hypergrad_power_iterations"] = float(np.mean(finite("power_iterations")))
        out["hypergrad_lambda_max"] = float(np.mean(finite("lambda_max")))
    bounds = finite("bound_relative")
    if bounds:
        out.update(hypergrad_bound=float(np.mean(bounds)), hypergrad_bound_max=float(np.max(bounds)))
    if any("seconds" in h for h in hyper_log):  # not kept in the history: a resumed run's time differs
        out["hypergrad_seconds"] = float(np.sum([h.get("seconds", 0.0) for h in hyper_log]))
    return out


def alpha_summary(history: list[dict]) -> dict:
    """The run's alpha steps from the epochs' diagnostics: ``count``, ``converged``, ``skipped``,
    ``max_residual``, ``mean_iterations``, ``hvps`` (all 0 for a fixed strategy), and with the certified
    stopping rule ``max_bound``, the largest relative error bound of a step."""
    eps = [h for h in history if h.get("alpha_steps")]
    count = sum(h["alpha_steps"] for h in eps)
    residuals = [h["hypergrad_residual_max"] for h in eps if "hypergrad_residual_max" in h]
    bounds = [h["hypergrad_bound_max"] for h in eps if "hypergrad_bound_max" in h]
    extra = {"max_bound": max(bounds)} if bounds else {}
    return {**extra, "count": count, "converged": sum(h["alpha_converged"] for h in eps),
            "skipped": sum(h["hypergrad_skipped"] for h in eps),
            "max_residual": max(residuals) if residuals else None,
            "mean_iterations": sum(h["hypergrad_iterations"] * h["alpha_steps"] for h in eps) / count if count else 0.0,
            "hvps": sum(h["hypergrad_hvps"] for h in eps)}


__all__ = ["ALPHA_KEYS", "AlphaStep", "FixedAlpha", "LFM", "alpha_diagnostics", "alpha_summary", "learned_alpha",
           "mm_loss_fn", "resolve_estimator"]
