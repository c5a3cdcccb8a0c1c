"""Evaluation metrics on collected predictions (NumPy): ACC, mAP, macro-F1, per-modality scores, gaps.

Conventions follow the field (OGM-GE, PMR, MLA) and the paper: mAP is the mean over classes of
one-vs-rest average precision of the softmax probabilities (scikit-learn's
``average_precision_score(..., average="macro")``); macro-F1 is scikit-learn's
``f1_score(average="macro")`` (labels present in truth or prediction, 0 where undefined). The
tests check each against scikit-learn.
"""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np


def _probs(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if np.all(x >= 0) and np.allclose(x.sum(-1), 1.0, atol=1e-4):
        return x
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"metrics: scores must be [n, classes] and labels [n], got {scores.shape} and {labels.shape}")
    return scores, labels


def accuracy(probs_or_logits, labels) -> float:
    scores, labels = _check(probs_or_logits, labels)
    return float(np.mean(np.argmax(scores, -1) == labels))


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """AP of binary truth ``y`` under scores ``s``: sum_n (R_n - R_{n-1}) P_n over distinct thresholds."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tied group
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    positives = tp[-1]
    if positives == 0:
        return 0.0
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(probs, labels, num_classes: int | None = None) -> float:
    """Macro mAP over classes of one-vs-rest average precision (classes without positives give 0, as sklearn)."""
    scores, labels = _check(probs, labels)
    scores = _probs(scores)
    c = num_classes or scores.shape[1]
    return float(np.mean([_average_precision((labels == k).astype(np.float64), scores[:, k]) for k in range(c)]))


def macro_f1(probs_or_logits, labels) -> float:
    scores, labels = _check(probs_or_logits, labels)
    pred = np.argmax(scores, -1)
    f1s = []
    for k in np.union1d(labels, pred):
        tp = np.sum((pred == k) & (labels == k))
        denom = np.sum(pred == k) + np.sum(labels == k)
        f1s.append(0.0 if denom == 0 else 2 * tp / denom)
    return float(np.mean(f1s))


METRICS = {"acc": accuracy, "map": mean_average_precision, "f1": macro_f1}


def gap(per_modality: Mapping[str, float]) -> float:
    """The performance gap between modalities: |a - b| for two, max - min for more."""
    values = list(per_modality.values())
    return float(max(values) - min(values)) if len(values) > 1 else 0.0


def modality_gap_distance(features: Mapping[str, np.ndarray], modalities: Sequence[str] | None = None) -> dict[str, float]:
    """Liang et al. 2022: distance between the centroids of each modality's L2-normalised features.

    Returns one entry per pair ``"a|b"`` and their ``"mean"``.
    """
    names = list(modalities or features)
    cent = {}
    for m in names:
        z = np.asarray(features[m], np.float64)
        z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
        cent[m] = z.mean(0)
    out = {f"{a}|{b}": float(np.linalg.norm(cent[a] - cent[b])) for a, b in itertools.combinations(names, 2)}
    out["mean"] = float(np.mean(list(out.values()))) if out else 0.0
    return out


def evaluate_predictions(logits: np.ndarray, modality_logits: Mapping[str, np.ndarray], labels: np.ndarray,
                         features: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """Every metric for the fused prediction and each modality, the gaps, and the modality-gap distance.

    Keys: ``acc``, ``map``, ``f1`` (fused); ``<metric>/<modality>``; ``gap_<metric>`` (the gap
    between the modalities' scores); ``modality_gap`` (mean centroid distance) when features given.
    """
    out = {}
    for name, fn in METRICS.items():
        out[name] = fn(logits, labels)
        per = {m: fn(v, labels) for m, v in modality_logits.items()}
        for m, v in per.items():
            out[f"{name}/{m}"] = v
        out[f"gap_{name}"] = gap(per)
    if features is not None and len(features) > 1:
        out["modality_gap"] = modality_gap_distance(features)["mean"]
    return out
