"""Losses against NumPy / scikit-learn / PyTorch references and their known properties."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss

from dyngap_jax import losses

# comparisons with PyTorch and closed forms: full float32, whatever the backend's default (TF32 on GPUs)
pytestmark = pytest.mark.usefixtures("highest_precision")


def np_info_nce(za, zb, tau):
    """Symmetric InfoNCE written from the paper's formula, in NumPy float64."""
    za = za / np.linalg.norm(za, axis=1, keepdims=True)
    zb = zb / np.linalg.norm(zb, axis=1, keepdims=True)
    s = za @ zb.T / tau
    n = s.shape[0]
    total = 0.0
    for i in range(n):
        total += np.log(np.exp(s[i, i]) / np.exp(s[i, :]).sum())
        total += np.log(np.exp(s[i, i]) / np.exp(s[:, i]).sum())
    return -total / (2 * n)


def test_cross_entropy_matches_sklearn():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 5))
    labels = rng.integers(0, 5, 16)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = log_loss(labels, probs, labels=range(5))
    got = losses.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("tau", [0.07, 0.5, 2.0])
def test_info_nce_matches_numpy(x64, tau):
    rng = np.random.default_rng(1)
    za, zb = rng.standard_normal((8, 6)), rng.standard_normal((8, 6))
    got = losses.modality_matching([jnp.asarray(za), jnp.asarray(zb)], tau)
    np.testing.assert_allclose(got, np_info_nce(za, zb, tau), rtol=1e-10)


def test_modality_matching_is_mean_over_pairs(x64):
    rng = np.random.default_rng(2)
    feats = [rng.standard_normal((6, 4)) for _ in range(3)]
    per_pair = losses.modality_matching([jnp.asarray(f) for f in feats], 0.2, reduce=False)
    ref = [np_info_nce(feats[j], feats[l], 0.2) for j, l in itertools.combinations(range(3), 2)]
    np.testing.assert_allclose(per_pair, ref, rtol=1e-10)
    np.testing.assert_allclose(losses.modality_matching([jnp.asarray(f) for f in feats], 0.2), np.mean(ref), rtol=1e-10)
    assert losses.modality_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert losses.num_pairs(6) == 15


def test_info_nce_properties(x64):
    rng = np.random.default_rng(3)
    za, zb = jnp.asarray(rng.standard_normal((8, 5))), jnp.asarray(rng.standard_normal((8, 5)))
    # symmetric in the two modalities; invariant to feature scale (features are L2-normalised)
    np.testing.assert_allclose(losses.info_nce(za, zb, 0.1), losses.info_nce(zb, za, 0.1), rtol=1e-12)
    np.testing.assert_allclose(losses.info_nce(3.0 * za, zb, 0.1), losses.info_nce(za, zb, 0.1), rtol=1e-12)
    # temperature -> infinity: all logits equal, loss -> log n
    np.testing.assert_allclose(losses.info_nce(za, zb, 1e8), np.log(8), rtol=1e-6)
    # perfectly aligned orthonormal features reach the minimum for a given tau, below random ones
    z = jnp.eye(8)
    aligned = losses.info_nce(z, z, 0.1)
    closed = -np.log(np.exp(10.0) / (np.exp(10.0) + 7.0))
    np.testing.assert_allclose(aligned, closed, rtol=1e-10)
    assert aligned < losses.info_nce(za, zb, 0.1)
    # and as tau -> 0 aligned features give zero loss
    assert losses.info_nce(z, z, 1e-3) < 1e-12


def test_js_alignment_matches_authors_torch_code(x64):
    rng = np.random.default_rng(4)
    logits = [rng.standard_normal((10, 6)) for _ in range(3)]

    def torch_alignment(p, q):  # the authors' Alignment(p, q), on softmaxed logits
        p, q = F.softmax(torch.tensor(p), dim=-1), F.softmax(torch.tensor(q), dim=-1)
        m = 0.5 * (p + q)
        return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))

    ref = np.mean([torch_alignment(logits[j], logits[l]).item() for j, l in itertools.combinations(range(3), 2)])
    got = losses.js_alignment([jnp.asarray(x) for x in logits])
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    same = losses.js_alignment([jnp.asarray(logits[0]), jnp.asarray(logits[0])])
    assert abs(float(same)) < 1e-14


def test_uniform_label_loss(x64):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((7, 4))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ref = -(np.full((7, 4), 0.25) * logp).sum(1).mean()
    np.testing.assert_allclose(losses.uniform_label_loss(jnp.asarray(logits)), ref, rtol=1e-12)
    np.testing.assert_allclose(losses.uniform_label_loss(jnp.zeros((3, 5))), np.log(5), rtol=1e-12)


def test_total_scalar_and_vector(x64):
    np.testing.assert_allclose(losses.total(2.0, 4.0, 0.25), 0.75 * 2 + 0.25 * 4)
    l_mm = jnp.asarray([1.0, 3.0, 5.0])
    # equal per-pair weights reduce to Eq. 1 with the pair-averaged L_MM
    np.testing.assert_allclose(losses.total(2.0, l_mm, jnp.full(3, 0.4)), losses.total(2.0, jnp.mean(l_mm), 0.4))
    np.testing.assert_allclose(losses.total(2.0, l_mm, jnp.asarray([0.0, 0.3, 0.6])), 0.7 * 2 + (0.9 + 3.0) / 3)


def test_loss_errors_name_the_argument():
    with pytest.raises(ValueError, match="labels"):
        losses.cross_entropy(jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32))
    with pytest.raises(TypeError, match="labels"):
        losses.cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4,)))
    with pytest.raises(ValueError, match="at least 2"):
        losses.modality_matching([jnp.zeros((4, 3))])
    with pytest.raises(TypeError, match="sequence"):
        losses.modality_matching({"a": jnp.zeros((4, 3)), "b": jnp.zeros((4, 3))})
    with pytest.raises(ValueError, match="l_mm"):
        losses.total(1.0, jnp.ones(3), 0.5)
    with pytest.raises(ValueError, match="vector `a`"):
        losses.total(1.0, jnp.ones(2), jnp.ones(3) * 0.5)


def test_losses_jit_and_grad():
    rng = np.random.default_rng(6)
    feats = [jnp.asarray(rng.standard_normal((8, 4)), jnp.float32) for _ in range(2)]
    g = jax.jit(jax.grad(lambda f: losses.modality_matching(f, 0.1)))(feats)
    assert all(np.all(np.isfinite(x)) for x in g)
