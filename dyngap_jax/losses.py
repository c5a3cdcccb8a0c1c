"""Losses of LFM: L_CLS, L_MM (Eq. 1's two terms), the authors' JS alignment, L_U and L_total.

Every loss is a pure ``jnp`` function, differentiable twice (the hypergradient takes
Hessian-vector products through them) and safe under ``jax.jit``.

Conventions
-----------
* ``features``: a sequence of ``[B, d]`` arrays, one per modality (the model's
  ``out["features"]`` values in a fixed modality order). With ``m`` modalities there are
  ``m (m - 1) / 2`` pairs ``(j, l)``, ``j < l``, in the order of :func:`modality_pairs`.
* A scalar ``a`` weights L_MM as a whole (the paper). A vector ``a`` of shape ``[P]`` gives
  one weight per modality pair (beyond the paper); :func:`total` then takes the per-pair
  losses ``[P]`` (``modality_matching(..., reduce=False)``).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "cross_entropy",
    "modality_pairs",
    "num_pairs",
    "info_nce",
    "modality_matching",
    "js_alignment",
    "uniform_label_loss",
    "total",
]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """L_CLS: mean softmax cross-entropy of ``logits [B, C]`` against integer ``labels [B]``."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: `logits` must be [batch, classes], got shape {logits.shape}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: `labels` must be [batch] = {logits.shape[:1]}, got shape {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"cross_entropy: `labels` must be integer class ids, got dtype {labels.dtype}")
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def modality_pairs(m: int) -> list[tuple[int, int]]:
    """The pairs ``(j, l)``, ``j < l``, of ``m`` modalities, in the order L_MM and vector alpha use."""
    if m < 2:
        raise ValueError(f"modality pairs need at least 2 modalities, got m={m}")
    return list(itertools.combinations(range(m), 2))


def num_pairs(m: int) -> int:
    """``m (m - 1) / 2``: the length of a per-pair (vector) alpha for ``m`` modalities."""
    return len(modality_pairs(m))


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    # Differentiable everywhere except x = 0, where the clamp keeps the value finite.
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def info_nce(z_a: jax.Array, z_b: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """Symmetric InfoNCE between two modalities (the paper's L_MM for one pair).

    ``s_ik = <z_a_i, z_b_k> / (|z_a_i| |z_b_k|)``;
    ``L = -1/(2 n) sum_i [log softmax_k(s_ik / tau)_i + log softmax_k(s_ki / tau)_i]``:
    the mean of the a->b and b->a cross-entropies with the matching index as the target.
    """
    if z_a.ndim != 2 or z_b.ndim != 2 or z_a.shape[0] != z_b.shape[0]:
        raise ValueError(
            f"info_nce: features must be [batch, dim] with equal batch sizes, got {z_a.shape} and {z_b.shape}"
        )
    sim = _l2_normalize(z_a) @ _l2_normalize(z_b).T / temperature
    targets = jnp.arange(sim.shape[0])
    a_to_b = optax.softmax_cross_entropy_with_integer_labels(sim, targets)
    b_to_a = optax.softmax_cross_entropy_with_integer_labels(sim.T, targets)
    return 0.5 * (jnp.mean(a_to_b) + jnp.mean(b_to_a))


def _as_feature_list(features, name: str) -> list[jax.Array]:
    if isinstance(features, dict):
        raise TypeError(
            f"{name}: pass a sequence of per-modality arrays in a fixed order, e.g. "
            f"[out['features'][k] for k in modality_names], not a dict"
        )
    feats = [jnp.asarray(f) for f in features]
    if len(feats) < 2:
        raise ValueError(f"{name} needs at least 2 modalities, got {len(feats)}")
    return feats


def modality_matching(
    features: Sequence[jax.Array], temperature: float | jax.Array = 0.07, *, reduce: bool = True
) -> jax.Array:
    """L_MM: symmetric InfoNCE between L2-normalised features, averaged over all modality pairs.

    With ``reduce=False`` returns the per-pair losses ``[P]`` in :func:`modality_pairs` order,
    the input of :func:`total` for a vector alpha.
    """
    feats = _as_feature_list(features, "modality_matching")
    per_pair = jnp.stack([info_nce(feats[j], feats[l], temperature) for j, l in modality_pairs(len(feats))])
    return jnp.mean(per_pair) if reduce else per_pair


def _js_pair(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    # The authors' code computes torch's kl_div(p.log(), m, 'batchmean') = KL(m || p) per row
    # (kl_div(input, target) = sum target * (log target - input)), i.e. the mixture-to-member
    # KL, not the textbook JS's KL(p || m). We keep their form exactly.
    log_p = jax.nn.log_softmax(logits_p, axis=-1)
    log_q = jax.nn.log_softmax(logits_q, axis=-1)
    m = 0.5 * (jnp.exp(log_p) + jnp.exp(log_q))
    log_m = jnp.log(m)
    kl_m_p = jnp.sum(m * (log_m - log_p), axis=-1)
    kl_m_q = jnp.sum(m * (log_m - log_q), axis=-1)
    return 0.5 * (jnp.mean(kl_m_p) + jnp.mean(kl_m_q))


def js_alignment(logits_list: Sequence[jax.Array], *, reduce: bool = True) -> jax.Array:
    """The authors' alignment loss: their Jensen-Shannon variant between softmaxed per-modality logits.

    For a pair ``(p, q) = (softmax(o_j), softmax(o_l))`` and ``m = (p + q) / 2`` it is
    ``0.5 * (KL(m || p) + KL(m || q))`` averaged over the batch (what ``F.kl_div(p.log(), m,
    reduction='batchmean')`` computes in their code), with no temperature; the mean over all
    pairs for ``m > 2`` modalities, or the per-pair values with ``reduce=False``.
    """
    logits = _as_feature_list(logits_list, "js_alignment")
    per_pair = jnp.stack([_js_pair(logits[j], logits[l]) for j, l in modality_pairs(len(logits))])
    return jnp.mean(per_pair) if reduce else per_pair


def uniform_label_loss(logits: jax.Array) -> jax.Array:
    """L_U of the paper's Figure 1: cross-entropy against the uniform label ``1/c`` for every sample."""
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"uniform_label_loss: `logits` must be [batch, classes], got shape {logits.shape}")
    return -jnp.mean(jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=-1))


def total(l_cls: jax.Array, l_mm: jax.Array, a: jax.Array | float) -> jax.Array:
    """Eq. 1: ``L_total = (1 - a) L_CLS + a L_MM``.

    For a vector alpha ``a [P]`` with per-pair losses ``l_mm [P]`` it is
    ``(1 - mean(a)) L_CLS + mean(a * l_mm)``, which equals Eq. 1 when all ``a_p`` are equal.
    """
    a = jnp.asarray(a)
    l_mm = jnp.asarray(l_mm)
    if jnp.ndim(l_cls) != 0:
        raise ValueError(f"total: `l_cls` must be a scalar, got shape {jnp.shape(l_cls)}")
    if a.ndim == 0:
        if l_mm.ndim != 0:
            raise ValueError(
                f"total: a scalar `a` needs a scalar `l_mm`, got shape {l_mm.shape} "
                "(use a vector alpha of that length, or reduce the per-pair losses)"
            )
        return (1.0 - a) * l_cls + a * l_mm
    if a.ndim != 1 or l_mm.shape != a.shape:
        raise ValueError(
            f"total: a vector `a` of shape {a.shape} needs per-pair `l_mm` of the same shape, got {l_mm.shape}"
        )
    return (1.0 - jnp.mean(a)) * l_cls + jnp.mean(a * l_mm)
