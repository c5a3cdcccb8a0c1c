"""Strategies for alpha, the weight of L_MM in Eq. 1.

Fixed strategies are functions of the epoch ``t`` (counted from 1, as the paper's
``omega(t) = 1 - exp(-1/t)``):

* :func:`constant`, :func:`stepwise` (the paper's ``h(p)``), :func:`heuristic` (Ours-H);
* the authors' code's variants: :func:`authors_exp` (``clip(exp(-0.3 t), 0.05, 0.95)``) and a
  polynomial of the epoch (:func:`polynomial`, fitted to a learned trajectory by
  :func:`fit_polynomial`, as their other script does).

The learned strategy (Ours-LB) is explicit state: :class:`LearnedAlpha` holds the static
settings (initial value, learning rate or optax schedule, clip range, scalar or one weight per
modality pair) and :meth:`LearnedAlpha.update` is Algorithm 1's alpha step,
``alpha <- clip(alpha - eta_alpha * hypergradient, lo, hi)``.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

__all__ = [
    "constant",
    "stepwise",
    "heuristic",
    "authors_exp",
    "polynomial",
    "fit_polynomial",
    "AlphaState",
    "LearnedAlpha",
    "authors_lr_schedule",
    "fixed_strategy",
]


def _check_concrete_epoch(epoch, name: str = "epoch", minimum: float = 1) -> None:
    if isinstance(epoch, (numbers.Number, np.ndarray, np.generic)):
        if np.any(np.asarray(epoch) < minimum):
            raise ValueError(f"`{name}` counts from {minimum} (first epoch = {minimum}), got {epoch}")


def _check_unit(value, name: str) -> None:
    if isinstance(value, (numbers.Number, np.ndarray, np.generic, list, tuple)):
        v = np.asarray(value, dtype=float)
        if not np.all(np.isfinite(v)) or np.any(v < 0) or np.any(v > 1):
            raise ValueError(f"`{name}` must lie in [0, 1], got {value}")


def constant(value: float) -> float:
    """A fixed alpha (``concat`` is ``constant(0)``; the paper's Table 4 uses 0, 0.5 and 1)."""
    _check_unit(value, "value")
    return value


def stepwise(p: float, epoch, num_epochs: int):
    """The paper's ``h(p)``: ``p`` during the first half of training, ``1 - p`` after.

    ``epoch`` counts from 1; epochs ``1 .. ceil(num_epochs / 2)`` are the first half
    (``epoch - 1 < num_epochs / 2``, the paper's "epoch less than half of the total").
    """
    _check_unit(p, "p")
    _check_concrete_epoch(epoch)
    if isinstance(num_epochs, numbers.Number) and num_epochs < 1:
        raise ValueError(f"`num_epochs` must be >= 1, got {num_epochs}")
    first_half = (jnp.asarray(epoch) - 1) < (jnp.asarray(num_epochs) / 2)
    return jnp.where(first_half, p, 1.0 - p)


def heuristic(epoch):
    """Ours-H: ``omega(t) = 1 - exp(-1 / t)``, ``t`` the epoch counted from 1."""
    _check_concrete_epoch(epoch)
    return 1.0 - jnp.exp(-1.0 / jnp.asarray(epoch, dtype=jnp.result_type(float)))


def authors_exp(epoch, rate: float = 0.3, lo: float = 0.05, hi: float = 0.95):
    """The heuristic of the authors' early commits and ModalBed: ``clip(exp(-rate t), lo, hi)``."""
    _check_concrete_epoch(epoch, minimum=0)
    return jnp.clip(jnp.exp(-rate * jnp.asarray(epoch, dtype=jnp.result_type(float))), lo, hi)


def polynomial(epoch, coefficients: Sequence[float], lo: float = 0.0, hi: float = 1.0):
    """``clip(sum_k c_k t^k, lo, hi)`` with ``coefficients`` highest degree first (``np.polyfit`` order).

    The authors' second script uses a degree-5 polynomial fitted to a learned alpha trajectory;
    their coefficients are not published, so fit your own with :func:`fit_polynomial`.
    """
    coefficients = list(coefficients)
    if not coefficients:
        raise ValueError("`coefficients` must not be empty")
    return jnp.clip(jnp.polyval(jnp.asarray(coefficients, dtype=float), jnp.asarray(epoch, dtype=float)), lo, hi)


def fit_polynomial(epochs: Sequence[float], alphas: Sequence[float], degree: int = 5) -> np.ndarray:
    """Least-squares polynomial of the epoch through a (learned) alpha trajectory, for :func:`polynomial`."""
    epochs = np.asarray(epochs, dtype=float)
    alphas = np.asarray(alphas, dtype=float)
    if epochs.shape != alphas.shape or epochs.ndim != 1:
        raise ValueError(f"`epochs` and `alphas` must be 1-D of equal length, got {epochs.shape} and {alphas.shape}")
    if epochs.size <= degree:
        raise ValueError(f"a degree-{degree} fit needs more than {degree} points, got {epochs.size}")
    return np.polyfit(epochs, alphas, degree)


def fixed_strategy(spec: str) -> Callable[[int, int], jax.Array]:
    """Parse a fixed strategy name into ``f(epoch, num_epochs) -> alpha``.

    ``"constant:<a>"``, ``"stepwise:<p>"``, ``"heuristic"``, ``"authors_exp"`` or
    ``"polynomial:<c5>,<c4>,...,<c0>"``.
    """
    name, _, arg = spec.partition(":")
    try:
        if name == "constant":
            value = constant(float(arg))
            return lambda epoch, num_epochs: jnp.asarray(value, dtype=float)
        if name == "stepwise":
            p = float(arg)
            _check_unit(p, "p")
            return lambda epoch, num_epochs: stepwise(p, epoch, num_epochs)
        if name == "heuristic" and not arg:
            return lambda epoch, num_epochs: heuristic(epoch)
        if name == "authors_exp" and not arg:
            return lambda epoch, num_epochs: authors_exp(epoch)
        if name == "polynomial":
            coeffs = [float(c) for c in arg.split(",")]
            return lambda epoch, num_epochs: polynomial(epoch, coeffs)
    except ValueError as e:
        raise ValueError(f"alpha strategy {spec!r}: {e}") from None
    raise ValueError(
        f"unknown alpha strategy {spec!r}; known: constant:<a>, stepwise:<p>, heuristic, authors_exp, "
        "polynomial:<c_n,...,c_0> (the learned one is LearnedAlpha)"
    )


@struct.dataclass
class AlphaState:
    """The learned alpha as a pytree (checkpointable, passes through ``jax.jit``).

    ``value``: alpha, a scalar or one weight per modality pair; ``opt_state``: the optax state of
    its optimiser (it carries the step count its schedule reads); ``updates`` and ``skipped``:
    how many alpha steps were applied, and how many were skipped for a non-finite hypergradient.
    """

    value: jax.Array
    opt_state: optax.OptState
    updates: jax.Array
    skipped: jax.Array


def authors_lr_schedule(alpha_steps_per_epoch: int = 1) -> optax.Schedule:
    """The authors' learning rate for alpha: 1e-4, halved every 20 epochs."""
    return optax.exponential_decay(1e-4, transition_steps=20 * alpha_steps_per_epoch, decay_rate=0.5, staircase=True)


@dataclasses.dataclass(frozen=True)
class LearnedAlpha:
    """Ours-LB: alpha as a parameter updated from the hypergradient (Algorithm 1's alpha step).

    Args:
      init: initial alpha (the authors' code starts at 0.95).
      learning_rate: ``eta_alpha``, a float or an optax schedule of the alpha-step count (the
        configs' default, ``config.alpha.learned.learning_rate``, is taken from here).
      clip: the range alpha is projected onto after each step; the paper's ``[0, 1]``, the
        authors' code ``[0.05, 0.95]``.
      num_pairs: ``None`` for the paper's scalar alpha, or the number of modality pairs for one
        weight per pair (``losses.num_pairs(m)``).
      optimizer: ``"sgd"`` (Algorithm 1) or ``"adam"``.
    """

    init: float = 0.5
    learning_rate: float | optax.Schedule = 0.05
    clip: tuple[float, float] = (0.0, 1.0)
    num_pairs: int | None = None
    optimizer: str = "sgd"

    def __post_init__(self):
        lo, hi = self.clip
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"LearnedAlpha: `clip` must satisfy 0 <= lo < hi <= 1, got {self.clip}")
        if not (lo <= self.init <= hi):
            raise ValueError(f"LearnedAlpha: `init` {self.init} lies outside `clip` {self.clip}")
        if self.num_pairs is not None and self.num_pairs < 1:
            raise ValueError(f"LearnedAlpha: `num_pairs` must be >= 1 or None, got {self.num_pairs}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"LearnedAlpha: `optimizer` must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not callable(self.learning_rate) and not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"LearnedAlpha: `learning_rate` must be > 0, got {self.learning_rate}")

    @property
    def shape(self) -> tuple[int, ...]:
        return () if self.num_pairs is None else (self.num_pairs,)

    def _tx(self) -> optax.GradientTransformation:
        if self.optimizer == "adam":
            return optax.adam(self.learning_rate)
        return optax.sgd(self.learning_rate)

    def create(self) -> AlphaState:
        value = jnp.full(self.shape, self.init, dtype=jnp.result_type(float))
        return AlphaState(
            value=value,
            opt_state=self._tx().init(value),
            updates=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def update(self, state: AlphaState, hypergradient: jax.Array) -> AlphaState:
        """Algorithm 1's alpha step: ``alpha <- clip(alpha - eta * dL_CLS/dalpha, lo, hi)``.

        A non-finite hypergradient leaves alpha and the optimiser state untouched and counts
        in ``state.skipped``. Works under ``jax.jit``.
        """
        g = jnp.asarray(hypergradient, dtype=state.value.dtype)
        if g.shape != state.value.shape:
            raise ValueError(
                f"LearnedAlpha.update: `hypergradient` has shape {g.shape}, alpha has shape {state.value.shape}"
            )
        tx = self._tx()
        delta, opt_state = tx.update(g, state.opt_state, state.value)
        stepped = optax.projections.projection_box(optax.apply_updates(state.value, delta), *self.clip)
        ok = jnp.all(jnp.isfinite(g))
        return AlphaState(
            value=jnp.where(ok, stepped, state.value),
            opt_state=optax.tree_utils.tree_where(ok, opt_state, state.opt_state),
            updates=state.updates + ok.astype(jnp.int32),
            skipped=state.skipped + (~ok).astype(jnp.int32),
        )
