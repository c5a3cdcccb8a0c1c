"""Bilevel problems with a closed-form answer, for checking hypergradient estimators.

:class:`QuadraticBilevel` has quadratic L_CLS and L_MM, so ``theta*(alpha)`` and
``d L_outer(theta*(alpha)) / d alpha`` are linear solves. The demo and the comparison script
use it as ground truth; the tests check its closed form against finite differences.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _spd(rng: np.random.Generator, n: int, condition: float) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.geomspace(1.0, condition, n)
    return (q * eig) @ q.T


@dataclasses.dataclass(frozen=True)
class QuadraticBilevel:
    """``L_CLS = 1/2 (x - c)^T A (x - c)``, ``L_MM = 1/2 (x - m)^T B (x - m)``, ``L_outer = 1/2 (x - t)^T C (x - t)``.

    ``params`` is the pytree ``{"w": x[:k], "b": x[k:]}`` so the estimators see more than one
    leaf. ``A``, ``B``, ``C`` are symmetric positive definite, so L_total is strongly convex for
    every alpha in [0, 1].
    """

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    c: np.ndarray
    m: np.ndarray
    t: np.ndarray

    @classmethod
    def random(cls, n: int = 12, seed: int = 0, condition: float = 10.0) -> "QuadraticBilevel":
        rng = np.random.default_rng(seed)
        return cls(
            A=_spd(rng, n, condition),
            B=_spd(rng, n, condition),
            C=_spd(rng, n, condition),
            c=rng.standard_normal(n),
            m=rng.standard_normal(n),
            t=rng.standard_normal(n),
        )

    @property
    def n(self) -> int:
        return self.c.shape[0]

    def pack(self, x) -> dict:
        k = self.n // 2
        return {"w": jnp.asarray(x[:k]), "b": jnp.asarray(x[k:])}

    @staticmethod
    def unpack(params) -> jax.Array:
        return jnp.concatenate([params["w"], params["b"]])

    def _quad(self, M, center):
        M, center = jnp.asarray(M), jnp.asarray(center)

        def f(params):
            d = self.unpack(params) - center
            return 0.5 * d @ (M @ d)

        return f

    def cls_loss(self, params):
        return self._quad(self.A, self.c)(params)

    def mm_loss(self, params):
        return self._quad(self.B, self.m)(params)

    def outer_loss(self, params):
        return self._quad(self.C, self.t)(params)

    def solution(self, alpha: float) -> np.ndarray:
        """``theta*(alpha)``: solves ``((1-a) A + a B) x = (1-a) A c + a B m``."""
        M = (1 - alpha) * self.A + alpha * self.B
        return np.linalg.solve(M, (1 - alpha) * self.A @ self.c + alpha * self.B @ self.m)

    def hypergradient(self, alpha: float) -> float:
        """The exact ``d L_outer(theta*(alpha)) / d alpha``."""
        M = (1 - alpha) * self.A + alpha * self.B
        x = self.solution(alpha)
        dx = np.linalg.solve(M, (self.B @ self.m - self.A @ self.c) - (self.B - self.A) @ x)
        return float((self.C @ (x - self.t)) @ dx)
