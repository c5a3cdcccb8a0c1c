"""The method interface: what a training method may change in the train step and around it.

A method is a subclass of :class:`Method`, registered under a name (``config.balance.method``),
with its options a frozen dataclass (:attr:`Method.Options`, ``config.balance.options``). Inside
the jitted train step (:meth:`Method.step`, traced once) it may

* add loss terms on the model's outputs (:meth:`Method.terms`) or replace the loss (:meth:`Method.loss`);
* run extra forward passes (``ctx.forward(params, zero=("audio",))``: a modality zeroed);
* rescale, project or combine per-modality gradients after the backward pass
  (:meth:`Method.transform_gradients`; :func:`modality_keys` splits the parameter tree);
* scale the optimiser's updates per modality (:meth:`Method.transform_updates`: a learning rate a modality);
* take several optimiser steps per batch (override :meth:`Method.step`, calling
  :meth:`Method.apply_gradients` as often as it likes);
* keep state of its own in the train state (:meth:`Method.init_state`, ``state.method_state``:
  checkpointed, restored and sharded with the rest);

and it may change how evaluation fuses the modalities (:meth:`Method.fuse`) and do work outside the
step at the loop's points (:meth:`Method.parts`: a :class:`Part` before an epoch, before or after a
train step, after an evaluation, with its own JSON state in every checkpoint). The training loop
knows nothing of any method: LFM itself (``dyngap_jax.methods.lfm``, Eq. 1 with its alpha strategy,
the learned one's alpha step a :class:`Part`) is written against this interface.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import optax

from dyngap_jax import hypergrad, losses
from dyngap_jax.methods.state import TrainState, forward

PyTree = Any


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a method sees inside the train step (traced).

    ``inputs``: the batch as the model takes it (frames augmented on the device), with ``"label"``;
    ``rng``: the step's dropout key; ``state``: the state the step starts from.
    """

    model: Any
    state: TrainState
    inputs: Mapping[str, jax.Array]
    rng: jax.Array
    modalities: tuple[str, ...]
    tx: optax.GradientTransformation

    @property
    def labels(self) -> jax.Array:
        return self.inputs["label"]

    def forward(self, params, inputs=None, *, zero=(), train: bool = True, rng=None):
        """``(outputs, new_model_state)`` of the model on ``inputs`` (default: the step's batch) with the
        modalities in ``zero`` set to zeros (a pass without them); in training mode by default."""
        inputs = dict(self.inputs if inputs is None else inputs)
        for m in zero:
            inputs[m] = jnp.zeros_like(inputs[m])
        return forward(self.model, params, self.state.model_state, inputs, self.rng if rng is None else rng, train)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a method may need to know of the run when it is made (by ``setup``, before anything is written).

    ``parameter_order``: the parameters' ``/``-joined paths in the order the model creates them
    (PyTorch's registration order; what "the first tensor" means in the authors' code); ``feature_dims``: each
    modality's feature width (``outputs["features"][m]``, what the fusion head takes).
    """

    steps_per_epoch: int
    parameter_order: tuple[str, ...]
    num_params: int
    feature_dims: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """Where the loop is when it calls a part around a train step.

    ``step``: train steps done in all (after the step, for :meth:`Part.after_step`); ``index``: the
    step's place in its epoch (from 0); ``epoch``: the epoch (from 0; the paper's t is epoch + 1);
    ``batch``: the step's batch on the mesh; ``local``: this process's part of it, as NumPy.
    """

    step: int
    index: int
    epoch: int
    batch: Mapping[str, jax.Array]
    local: Mapping[str, Any]
    last: bool


class Part:
    """Work a method does outside the train step, at the loop's points (LFM's alpha step is one).

    Every hook has a default that does nothing; a hook that changes the state returns the new one.
    The part's host state (iterator positions, the epoch's diagnostics so far) is :meth:`to_json`,
    saved in every checkpoint with the loop's state and given back to :meth:`open` on resume.
    """

    name: ClassVar[str] = ""
    history_keys: ClassVar[tuple[str, ...]] = ()  # entries of its epoch record kept in the run's history too

    def open(self, run, state: TrainState, saved: dict | None, *, donate: bool = True) -> None:
        """Compile what the part runs and build its loaders; ``saved``: its :meth:`to_json` of the checkpoint."""

    def epoch_start(self, state: TrainState, epoch: int) -> TrainState:
        return state

    def before_step(self, state: TrainState, info: StepInfo) -> TrainState:
        return state

    def after_step(self, state: TrainState, info: StepInfo) -> TrainState:
        return state

    def evaluated(self, evals: Mapping[str, dict]) -> None:
        """The loop has evaluated the model at the end of an epoch (the first evaluation ends "before the first
        evaluation"); ``evals``: ``{split: metrics}`` (``acc``, ``acc/<modality>``, ...), as the log records them."""

    def fetch(self) -> None:
        """Bring what the part left on the device to the host (at the loop's log intervals)."""

    def epoch_record(self, state: TrainState) -> dict:
        """The part's entries of the epoch's training record (and its history); starts the next epoch's count."""
        return {}

    def line(self, record: dict) -> str:
        """The part's words in the epoch's printed line (empty: none)."""
        return ""

    def to_json(self) -> dict:
        return {}

    def summary(self, state: TrainState, history: list[dict]) -> dict:
        """The part's entries of the run's ``summary.json``."""
        return {}


def check_window(options) -> None:
    """Refuse an epoch window (``options.modulation_starts`` / ``modulation_ends``: epochs from 0, both included) that
    is empty or starts before 0; for the ``__post_init__`` of a method's options (the run's length: ``Method.check``)."""
    if options.modulation_starts < 0 or options.modulation_ends < options.modulation_starts:
        raise ValueError(f"the window needs 0 <= `modulation_starts` <= `modulation_ends`, got "
                         f"{options.modulation_starts} and {options.modulation_ends}")


def param_dtype(params) -> jnp.dtype:
    """The parameters' precision (float64 in a float64 run): what a method's own state is kept in."""
    return jax.tree_util.tree_leaves(params)[0].dtype


def modality_keys(params: Mapping, modalities) -> dict[str, list[str]]:
    """``{modality: top-level parameter keys}`` (its encoder and projection), and ``"shared"``: the rest (the
    fusion head). Methods that scale a modality's gradients scale these subtrees."""
    out = {m: [k for k in params if k in (f"encoders_{m}", f"projection_{m}")] for m in modalities}
    owned = {k for keys in out.values() for k in keys}
    out["shared"] = [k for k in params if k not in owned]
    return out


def scale_modalities(grads: Mapping, factors: Mapping[str, Any], modalities) -> dict:
    """``grads`` with each modality's subtrees (:func:`modality_keys`) multiplied by ``factors[m]``."""
    keys = modality_keys(grads, modalities)
    out = dict(grads)
    for m, factor in factors.items():
        for k in keys[m]:
            out[k] = jax.tree_util.tree_map(lambda g: g * factor, grads[k])
    return out


class Method:
    """A way of training: the train step (traced once, inside ``jax.jit``) and the work around it.

    Class attributes: ``name`` (``config.balance.method``); ``Options`` (a frozen dataclass of its
    options with their defaults, ``config.balance.options``); ``reads`` (the config sections beside
    ``balance`` it reads, e.g. LFM's ``loss`` and ``alpha``); ``modalities`` (how many it can take:
    ``(least, most or None)``); ``logged`` (the step metrics averaged into each epoch's record).

    The default is plain training on the fused cross-entropy: one forward, one backward, one
    optimiser step.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    reads: ClassVar[tuple[str, ...]] = ()
    modalities: ClassVar[tuple[int, int | None]] = (1, None)
    logged: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, cfg, info: "RunInfo", options=None):
        self.cfg, self.info = cfg, info
        self.options = self.Options() if options is None else options

    @classmethod
    def check(cls, cfg, options) -> None:
        """Refuse a config the method cannot run (a ValueError naming the field); called by ``validate``."""
        least, most = cls.modalities
        mods = list(cfg.model.modalities)
        if len(mods) < least or (most is not None and len(mods) > most):
            many = f"{least}" if least == most else f"{least} to {most}" if most else f"at least {least}"
            raise ValueError(f"config.balance.method: {cls.name!r} takes {many} modalities; "
                             f"config.model.modalities is {mods}")
        starts = getattr(options, "modulation_starts", None)  # a method's epoch window (from 0) must meet the run
        if starts is not None and starts >= cfg.train.num_epochs:
            raise ValueError(f"config.balance.options.modulation_starts: {starts} is past the run's last epoch "
                             f"({cfg.train.num_epochs - 1}, from 0; config.train.num_epochs={cfg.train.num_epochs})")

    def in_window(self, step) -> jax.Array:
        """Whether train step ``step`` (traced; from 0) falls in the options' epoch window (:func:`check_window`)."""
        epoch = step // self.info.steps_per_epoch
        return (epoch >= self.options.modulation_starts) & (epoch <= self.options.modulation_ends)

    # ---- state

    def init_state(self, params: PyTree) -> PyTree:
        """The method's own state (``state.method_state``); None: none."""
        return None

    def init_fields(self, params: PyTree) -> dict:
        """The train state's method fields at the start: ``alpha`` (0 for a method that does not weigh
        L_MM), ``alpha_solution`` and ``method_state`` (:meth:`init_state`)."""
        from dyngap_jax.alpha import LearnedAlpha

        return {"alpha": LearnedAlpha(init=0.0).create(), "alpha_solution": None,
                "method_state": self.init_state(params)}

    # ---- the train step (traced)

    def loss(self, ctx: StepContext, params) -> tuple[jax.Array, dict]:
        """``(value to differentiate, aux)``; ``aux``: ``outputs``, ``model_state`` (the forward's new
        BatchNorm statistics) and ``metrics`` (scalars, ``loss`` among them: what a plateau schedule reads)."""
        out, model_state = ctx.forward(params)
        l_cls = losses.cross_entropy(out["logits"], ctx.labels)
        return l_cls, {"outputs": out, "model_state": model_state, "metrics": {"loss": l_cls}}

    def terms(self, ctx: StepContext, outputs) -> dict[str, jax.Array]:
        """Loss terms added to :meth:`loss`'s value (logged under their names)."""
        return {}

    def objective(self, ctx: StepContext) -> Callable:
        """``params -> (value, aux)``: :meth:`loss` plus :meth:`terms`."""

        def f(params):
            value, aux = self.loss(ctx, params)
            extra = self.terms(ctx, aux["outputs"])
            for name, term in extra.items():
                value = value + term
                aux["metrics"][name] = term
            return value, aux

        return f

    def gradients(self, ctx: StepContext) -> tuple[PyTree, dict]:
        """``(grads, aux)`` of :meth:`objective` at ``ctx.state.params`` (one backward pass)."""
        (_, aux), grads = jax.value_and_grad(self.objective(ctx), has_aux=True)(ctx.state.params)
        return grads, aux

    def transform_gradients(self, ctx: StepContext, grads: PyTree, aux: dict) -> PyTree:
        """The gradients the optimiser takes (rescaled, projected, combined per modality); default: as they are."""
        return grads

    def transform_updates(self, ctx: StepContext, state: TrainState, updates: PyTree) -> PyTree:
        """The optimiser's updates before they are applied (a learning rate per modality scales its subtrees:
        the optimiser's state is untouched); default: as they are."""
        return updates

    def apply_gradients(self, ctx: StepContext, state: TrainState, grads: PyTree, aux: dict) -> TrainState:
        """One optimiser step of ``state`` with ``grads`` (the new BatchNorm statistics from ``aux``)."""
        updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params, value=aux["metrics"]["loss"])
        updates = self.transform_updates(ctx, state, updates)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             model_state=aux["model_state"], opt_state=opt_state)

    def step(self, ctx: StepContext) -> tuple[TrainState, dict]:
        """The whole train step: ``(new state, metrics)``. ``metrics`` must hold ``loss``, ``grad_norm``,
        ``finite`` (loss and gradients) and ``params_finite`` (the state after the update)."""
        grads, aux = self.gradients(ctx)
        grads = self.transform_gradients(ctx, grads, aux)
        new = self.apply_gradients(ctx, ctx.state, grads, aux)
        return new, finish_metrics(aux["metrics"], grads, new)

    # ---- evaluation and the work around the step

    def line(self, record: dict) -> str:
        """The method's words in the epoch's printed line, from the epoch's record (its ``logged`` step metrics
        averaged); empty: none."""
        return ""

    def fuse(self, outputs: Mapping, method_state: PyTree) -> jax.Array:
        """The fused logits evaluation scores (default: the model's fusion head)."""
        return outputs["logits"]

    def parts(self) -> list[Part]:
        """The method's work outside the train step, in the order the loop calls it."""
        return []


def finish_metrics(metrics: dict, grads: PyTree, new: TrainState) -> dict:
    """The step's metrics with the gradient norm and the finiteness checks the loop stops on."""
    grad_norm = optax.tree.norm(grads)
    return {**metrics, "grad_norm": grad_norm,
            "finite": jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm),
            # a finite loss and gradient can still step to non-finite parameters (an overflowing update)
            "params_finite": hypergrad.tree_finite((new.params, new.model_state))}


__all__ = ["Method", "NoOptions", "Part", "RunInfo", "StepContext", "StepInfo", "check_window", "finish_metrics",
           "modality_keys", "param_dtype", "scale_modalities"]
