"""OGM-GE (Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022), as the
authors' code computes it (GeWu-Lab/OGM-GE_CVPR2022, ``main.py``, ``train_epoch``).

On each batch, after the backward pass of the fused cross-entropy (the only loss trained):

* each modality's score is the batch's **sum** of the softmax probability of the true class under its own
  logits: for the ``concat`` head, its block of the weight matrix and half the bias (the per-modality logits of
  :class:`~dyngap_jax.models.fusion.ConcatFusion`); for ``sum``, its own head;
* with ``rho = s_b / s_a`` (the config's modality order, ``a`` first), the modality that scores higher gets the
  coefficient ``1 - tanh(alpha * rho)`` (its own ratio, which exceeds 1; the code's ``relu(ratio)`` with no
  ``- 1``, as the paper's Eq. 10), the other 1. At a tie (``rho == 1``) the first modality is the one damped,
  as in their ``if ratio_v > 1 ... else`` (their audio is first);
* inside the epoch window ``modulation_starts <= epoch <= modulation_ends`` (from 0, both ends included),
  every encoder weight tensor of two or more dimensions becomes ``k g + N(0, (std(g) + 1e-8)^2)``, ``std`` the
  unbiased standard deviation of that tensor's unscaled gradient, the noise drawn for both modalities (also
  the one whose ``k`` is 1): "GE", generalisation enhancement (``noise=False``: OGM, the scaling alone).
  Outside the window the gradients are left as they are.

Which tensors: their code selects ``grad.ndim == 4`` inside ``audio_net`` / ``visual_net``, which on their
ResNet-18 encoders is every convolution kernel (no conv there has a bias; the 1-D normalisation parameters and
the fusion head are never touched). Here it is every encoder (and projection) tensor of ``ndim >= 2``: the same
tensors on a ResNet encoder, and on an MLP or transformer encoder its weight matrices, where the 4-D rule would
silently modulate nothing (BalanceBenchmark's port, ``OGM_trainer.py``, selects the same way).

The optimiser and its schedule are the data set's config (their code: SGD 1e-3, momentum 0.9, weight decay
1e-4, StepLR(70, 0.1)), so that every method of a data set trains with one recipe. Two modalities only, as
their code.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dyngap_jax.methods.base import Method, StepContext, check_window, modality_keys

NOISE_SALT = 0x06E6  # the step key is folded with this for GE's noise (apart from the dropout it also keys)


@dataclasses.dataclass(frozen=True)
class OGMGEOptions:
    """``config.balance.options`` of ``ogm_ge``; defaults the original's (their ``--alpha`` has none: 0.1 is
    their README's default setting, which recommends 0.8 for CREMA-D: the CREMA-D config sets it)."""

    alpha: float = 0.1  # --alpha: the modulation's strength
    modulation_starts: int = 0  # --modulation_starts (epochs from 0)
    modulation_ends: int = 50  # --modulation_ends (included)
    noise: bool = True  # GE: OGM_GE; False: OGM (the scaling alone)

    def __post_init__(self):
        if not self.alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0, got {self.alpha}")
        check_window(self)


def coefficients(s_a, s_b, alpha):
    """``(k_a, k_b)`` from the two scores: the higher-scoring modality ``1 - tanh(alpha * ratio)``, the other 1
    (a tie damps ``a``)."""
    ratio = s_b / s_a
    k_b = jnp.where(ratio > 1, 1 - jnp.tanh(alpha * jax.nn.relu(ratio)), 1.0)
    k_a = jnp.where(ratio > 1, 1.0, 1 - jnp.tanh(alpha * jax.nn.relu(1 / ratio)))
    return k_a, k_b


def modulated(grads, modalities):
    """``[(top-level key, path, leaf)]`` of the tensors OGM-GE modulates: each modality's encoder and projection
    tensors of ``ndim >= 2``, in the parameter tree's order."""
    keys = modality_keys(grads, modalities)
    out = []
    for m in modalities:
        for k in keys[m]:
            for path, leaf in jax.tree_util.tree_flatten_with_path(grads[k])[0]:
                if leaf.ndim >= 2:
                    out.append((m, k, path, leaf))
    return out


def noise_draws(key, grads, modalities) -> list:
    """The standard normal draws of GE's noise, one array per modulated tensor (:func:`modulated`'s order): the
    ``i``-th from ``fold_in(fold_in(key, NOISE_SALT), i)``. ``key`` is the step's (the loop's dropout key)."""
    key = jax.random.fold_in(key, NOISE_SALT)
    return [jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
            for i, (*_, leaf) in enumerate(modulated(grads, modalities))]


class OGMGE(Method):
    """OGM-GE's training step (the module docstring): the fused cross-entropy, its encoder gradients modulated."""

    name = "ogm_ge"
    Options = OGMGEOptions
    modalities = (2, 2)

    def __init__(self, cfg, info, options=None):
        super().__init__(cfg, info, options)
        a, b = cfg.model.modalities
        self.logged = ("loss", "ogm_ratio", f"ogm_coeff/{a}", f"ogm_coeff/{b}")

    @classmethod
    def check(cls, cfg, options) -> None:
        super().check(cfg, options)
        fusion = dict(cfg.model.fusion)
        if fusion.get("name") not in ("concat", "sum"):
            raise ValueError(f"config.model.fusion.name: {cls.name!r} scores each modality by its share of a concat "
                             f"head or its own head of a sum; got fusion {fusion.get('name')!r}")
        if fusion.get("unimodal_heads"):
            raise ValueError(f"config.model.fusion.unimodal_heads: {cls.name!r} scores each modality by its share of "
                             "the concat head, which its loss trains; separate unimodal heads are never trained by it")

    def line(self, record: dict) -> str:
        a, b = self.cfg.model.modalities
        if "ogm_ratio" not in record:
            return ""
        return (f"ogm {b}/{a} {record['ogm_ratio']:.2f}, k {a} {record[f'ogm_coeff/{a}']:.3f} "
                f"{b} {record[f'ogm_coeff/{b}']:.3f}")

    def loss(self, ctx: StepContext, params):
        value, aux = super().loss(ctx, params)
        logits = aux["outputs"]["modality_logits"]
        rows = jnp.arange(ctx.labels.shape[0])
        score = lambda m: jnp.sum(jax.nn.softmax(logits[m].astype(value.dtype), axis=-1)[rows, ctx.labels])
        aux["ogm_scores"] = jax.lax.stop_gradient(jnp.stack([score(m) for m in ctx.modalities]))
        return value, aux

    def transform_gradients(self, ctx: StepContext, grads, aux):
        o = self.options
        a, b = ctx.modalities
        s = aux["ogm_scores"]
        coeff = dict(zip((a, b), coefficients(s[0], s[1], o.alpha)))
        on = self.in_window(ctx.state.step)

        def modulate(grads):  # only inside the window: outside it no noise is drawn
            chosen = modulated(grads, ctx.modalities)
            draws = noise_draws(ctx.rng, grads, ctx.modalities) if o.noise else [None] * len(chosen)
            new = {}
            for (m, k, path, g), z in zip(chosen, draws):
                update = coeff[m].astype(g.dtype) * g
                new[(k, path)] = update if z is None else update + (jnp.std(g, ddof=1) + 1e-8) * z
            out = dict(grads)
            for k in {k for (k, _) in new}:
                out[k] = jax.tree_util.tree_map_with_path(lambda p, g, k=k: new.get((k, p), g), grads[k])
            return out

        out = jax.lax.cond(on, modulate, lambda g: dict(g), grads)
        aux["metrics"].update({"ogm_ratio": s[1] / s[0], f"ogm_coeff/{a}": jnp.where(on, coeff[a], 1.0),
                               f"ogm_coeff/{b}": jnp.where(on, coeff[b], 1.0)})
        return out


__all__ = ["OGMGE", "OGMGEOptions", "coefficients", "modulated", "noise_draws"]
