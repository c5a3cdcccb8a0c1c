"""Strategies for alpha, the weight of L_MM in Eq. 1.

Fixed strategies are functions of the epoch ``t`` (counted from 1, as the paper's
``omega(t) = 1 - exp(-1/t)``):

* :func:`constant`, :func:`stepwise` (the paper's ``h(p)``), :func:`heuristic` (Ours-H);
* the authors' code's variants, both functions of their 0-based epoch: :func:`authors_exp`
  (``clip(exp(-0.3 e), 0.05, 0.95)``, e = t - 1) and the degree-5 polynomial their README's entry
  point (``Crema_epoch.py``) uses, with the coefficients written there (:func:`authors_fitted`);
  any polynomial of the epoch (:func:`polynomial`, fitted to a trajectory by :func:`fit_polynomial`).

The learned strategy (Ours-LB) is explicit state: :class:`LearnedAlpha` holds the static
settings (initial value, learning rate or optax schedule, clip range, scalar or one weight per
modality pair, the precision alpha is kept to) and :meth:`LearnedAlpha.update` is Algorithm 1's
alpha step, ``alpha <- clip(alpha - eta_alpha * hypergradient, lo, hi)``.
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
    "authors_fitted",
    "AUTHORS_FITTED_COEFFICIENTS",
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
    """The heuristic of the authors' early commits and ModalBed: ``clip(exp(-rate e), lo, hi)``.

    ``epoch`` is their 0-based epoch ``e`` (the first is 0, giving 0.95); the fixed strategy
    ``"authors_exp"`` passes ``e = t - 1`` for the paper's ``t``.
    """
    _check_concrete_epoch(epoch, minimum=0)
    return jnp.clip(jnp.exp(-rate * jnp.asarray(epoch, dtype=jnp.result_type(float))), lo, hi)


# Crema_epoch.py's getAlpha_Learnable_Fitted: coef_alpha2 (the alignment weight), lowest degree first, a
# polynomial of the 0-based epoch; coef_alpha1 (the classification weight) is its complement to 1
AUTHORS_FITTED_COEFFICIENTS = (7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06,
                               -2.23835486e-08, 5.39717505e-11)


def authors_fitted(epoch):
    """The authors' fitted alpha (``Crema_epoch.py``, the entry point their README runs): the degree-5
    polynomial of the 0-based epoch ``e`` whose coefficients are written there
    (:data:`AUTHORS_FITTED_COEFFICIENTS`), summed as their code sums it and **not clipped**: over 200
    epochs it starts at 0.795 and dips slightly below 0 for epochs 177-188 (their training weight of
    L_MM is then negative, as it is here). The fixed strategy ``"authors_fitted"`` passes ``e = t - 1``.
    """
    _check_concrete_epoch(epoch, minimum=0)
    # a concrete epoch in double precision, as their Python floats: e^5 c_5 is ~17 at e = 200 (float32 loses ~2e-6)
    concrete = isinstance(epoch, (numbers.Number, np.ndarray, np.generic))
    e = np.asarray(epoch, np.float64) if concrete else jnp.asarray(epoch, dtype=jnp.result_type(float))
    return sum(c * e**i for i, c in enumerate(AUTHORS_FITTED_COEFFICIENTS))


def polynomial(epoch, coefficients: Sequence[float], lo: float = 0.0, hi: float = 1.0):
    """``clip(sum_k c_k t^k, lo, hi)`` with ``coefficients`` highest degree first (``np.polyfit`` order).

    Fit one to a learned alpha trajectory with :func:`fit_polynomial` (the authors' own fitted
    curve is :func:`authors_fitted`).
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

    ``"constant:<a>"``, ``"stepwise:<p>"``, ``"heuristic"``, ``"authors_exp"``, ``"authors_fitted"``
    or ``"polynomial:<c5>,<c4>,...,<c0>"``. ``epoch`` counts from 1 (the paper's ``t``); the authors'
    two schedules are functions of their 0-based epoch and get ``t - 1``.
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
            return lambda epoch, num_epochs: authors_exp(epoch - 1)
        if name == "authors_fitted" and not arg:
            return lambda epoch, num_epochs: authors_fitted(epoch - 1)
        if name == "polynomial":
            coeffs = [float(c) for c in arg.split(",")]
            return lambda epoch, num_epochs: polynomial(epoch, coeffs)
    except ValueError as e:
        raise ValueError(f"alpha strategy {spec!r}: {e}") from None
    raise ValueError(
        f"unknown alpha strategy {spec!r}; known: constant:<a>, stepwise:<p>, heuristic, authors_exp, "
        "authors_fitted, polynomial:<c_n,...,c_0> (the learned one is LearnedAlpha)"
    )


@struct.dataclass
class AlphaState:
    """The learned alpha as a pytree (checkpointable, passes through ``jax.jit``).

    ``value``: alpha, a scalar or one weight per modality pair; ``opt_state``: the optax state of
    its optimiser (it carries the step count its schedule reads); ``updates`` and ``skipped``:
    how many alpha steps were applied, and how many were skipped for a non-finite hypergradient.
    ``low``: with ``LearnedAlpha(precision="float64")``, what ``value`` leaves out of alpha (alpha
    is ``value + low`` exactly, two floats kept by error-free sums); None otherwise.
    """

    value: jax.Array
    opt_state: optax.OptState
    updates: jax.Array
    skipped: jax.Array
    low: jax.Array | None = None

    def exact(self) -> np.ndarray:
        """alpha to the state's precision (``value + low``) as a NumPy float64, on the host."""
        value = np.asarray(jax.device_get(self.value), np.float64)
        return value if self.low is None else value + np.asarray(jax.device_get(self.low), np.float64)


class _HalvingSchedule:
    """``rate * 0.5 ** (count // every)``, as an optax schedule (the default float where it is traced: a double
    under JAX's 64-bit mode) and, for a float32 pair alpha, as a pair of float32s (:meth:`pair`) whose sum is
    the double rate exactly (halving is exact)."""

    def __init__(self, rate: float, every: int):
        self.rate, self.every = rate, every

    def __call__(self, count):
        dtype = jnp.result_type(float)
        return jnp.asarray(self.rate, dtype) * jnp.asarray(0.5, dtype) ** (jnp.asarray(count) // self.every)

    def pair(self, count, dtype):
        scale = jnp.asarray(0.5, dtype) ** (jnp.asarray(count) // self.every)
        high, low = _split_double(self.rate, (), dtype)
        return high * scale, low * scale


def authors_lr_schedule(alpha_steps_per_epoch: int = 1) -> optax.Schedule:
    """The authors' learning rate for alpha: 1e-4, halved every 20 epochs (``alpha_steps_per_epoch`` steps an epoch).

    Their Python float, to the precision alpha is kept to: a double under JAX's 64-bit mode (1e-4
    exactly, not float32's 9.999999747e-05, which ``optax.exponential_decay`` on optax's int32 step
    count would give), a pair of float32s for a float32 pair alpha (:class:`LearnedAlpha`'s ``float64``).
    """
    return _HalvingSchedule(1e-4, 20 * alpha_steps_per_epoch)


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
      precision: ``"float32"`` (alpha is one float of the default dtype: float64 under JAX's 64-bit
        mode) or ``"float64"``: alpha is kept to double precision, as the authors' Python float is:
        a float64 under JAX's 64-bit mode, otherwise a pair of float32s (about 48 bits) to which each
        SGD step ``-eta g`` is added without rounding error, the rate ``eta`` itself a pair (its
        double value: a float, or a schedule with a ``pair`` method such as :func:`authors_lr_schedule`)
        and its product with ``g`` exact; so updates far below float32's spacing near alpha (6e-8 at
        0.95; the authors' steps are 1e-4 times a hypergradient) accumulate as in double. The train
        step reads the nearest float32.
    """

    init: float = 0.5
    learning_rate: float | optax.Schedule = 0.05
    clip: tuple[float, float] = (0.0, 1.0)
    num_pairs: int | None = None
    optimizer: str = "sgd"
    precision: str = "float32"

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
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"LearnedAlpha: `precision` must be 'float32' or 'float64', got {self.precision!r}")
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
        dtype = jnp.result_type(float)
        value, low = _split_double(self.init, self.shape, dtype)
        pair = self.precision == "float64" and dtype != jnp.float64  # a double is one float64 under x64
        return AlphaState(
            value=value,
            opt_state=self._tx().init(value),
            updates=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
            low=low if pair else None,
        )

    def _rate_pair(self, count, dtype):
        """The step's learning rate as a pair ``(high, low)`` of ``dtype`` summing to its double value."""
        lr = self.learning_rate
        if callable(lr):
            if hasattr(lr, "pair"):
                return lr.pair(count, dtype)
            return jnp.asarray(lr(count), dtype), jnp.zeros((), dtype)
        return tuple(jnp.asarray(v) for v in _split_double(lr, (), dtype))

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
        ok = jnp.all(jnp.isfinite(g))
        low = None
        if state.low is None:
            stepped = optax.projections.projection_box(optax.apply_updates(state.value, delta), *self.clip)
        else:  # alpha = value + low: add the step without rounding error, then clip as a pair
            if self.optimizer == "sgd":  # the step -eta g as a pair: eta to its double value, the product exact
                rate_high, rate_low = self._rate_pair(state.updates, state.value.dtype)
                p, e = _two_prod(rate_high, g)
                step_high, step_low = -p, -(e + rate_low * g)
            else:
                step_high, step_low = delta.astype(state.value.dtype), jnp.zeros_like(state.value)
            stepped, low = _add_double(state.value, state.low + step_low, step_high)
            stepped, low = _clip_double(stepped, low, self.clip)
            low = jnp.where(ok, low, state.low)
        return AlphaState(
            value=jnp.where(ok, stepped, state.value),
            opt_state=optax.tree_utils.tree_where(ok, opt_state, state.opt_state),
            updates=state.updates + ok.astype(jnp.int32),
            skipped=state.skipped + (~ok).astype(jnp.int32),
            low=low,
        )


def _split_double(x: float, shape, dtype):
    """``x`` (a Python float) as ``(high, low)`` arrays of ``dtype``: ``high`` the nearest float, ``low`` the rest."""
    high = np.asarray(x, dtype=dtype)
    low = np.asarray(float(x) - float(high), dtype=dtype)
    return jnp.full(shape, high, dtype=dtype), jnp.full(shape, low, dtype=dtype)


def _two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split_float(a):
    """Veltkamp's split of a float32: ``a = high + low`` with both halves of 12 bits, so their products are exact."""
    c = 4097.0 * a  # 2^12 + 1
    high = c - (c - a)
    return high, a - high


def _two_prod(a, b):
    """``(p, e)`` with ``p = fl(a b)`` and ``a b = p + e`` exactly (Dekker; float32, no fused multiply-add)."""
    p = a * b
    ah, al = _split_float(a)
    bh, bl = _split_float(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _add_double(high, low, delta):
    """``(high, low) + delta`` as a normalised pair."""
    s, e = _two_sum(high, delta)
    e = e + low
    h = s + e
    return h, e - (h - s)


def _clip_double(high, low, bounds):
    """The pair clipped to ``[lo, hi]`` (bounds as pairs of the same dtype, compared high part first)."""
    for bound, below in ((bounds[0], True), (bounds[1], False)):
        bh, bl = (jnp.asarray(v) for v in _split_double(bound, (), high.dtype))
        outside = (high < bh) | ((high == bh) & (low < bl)) if below else (high > bh) | ((high == bh) & (low > bl))
        high, low = jnp.where(outside, bh, high), jnp.where(outside, bl, low)
    return high, low
