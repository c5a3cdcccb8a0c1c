"""Metrics against scikit-learn on the same predictions."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score
from sklearn.preprocessing import label_binarize

from dyngap_jax import metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, c = 60, 5
    logits = rng.standard_normal((n, c))
    logits[:, 2] = np.round(logits[:, 2])  # ties in the scores
    labels = rng.integers(0, c, n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert metrics.accuracy(logits, labels) == pytest.approx(accuracy_score(labels, logits.argmax(1)))
    ref_map = average_precision_score(label_binarize(labels, classes=range(c)), probs, average="macro")
    assert metrics.mean_average_precision(probs, labels) == pytest.approx(ref_map, abs=1e-12)
    assert metrics.mean_average_precision(logits, labels) == pytest.approx(ref_map, abs=1e-12)
    assert metrics.macro_f1(logits, labels) == pytest.approx(f1_score(labels, logits.argmax(1), average="macro"))


def test_f1_with_classes_never_predicted_or_absent():
    labels = np.array([0, 0, 1, 1, 2])
    pred_logits = np.eye(4)[[0, 0, 0, 3, 3]]  # class 2 never predicted, class 3 never true
    assert metrics.macro_f1(pred_logits, labels) == pytest.approx(f1_score(labels, [0, 0, 0, 3, 3], average="macro",
                                                                           zero_division=0))


def test_gap_and_modality_gap_distance():
    assert metrics.gap({"a": 0.7, "v": 0.4}) == pytest.approx(0.3)
    assert metrics.gap({"r": 0.7, "d": 0.2, "f": 0.5}) == pytest.approx(0.5)
    za = np.array([[1.0, 0.0], [2.0, 0.0]])
    zb = np.array([[0.0, 3.0], [0.0, 1.0]])
    d = metrics.modality_gap_distance({"a": za, "b": zb})
    assert d["a|b"] == pytest.approx(np.sqrt(2.0)) and d["mean"] == pytest.approx(np.sqrt(2.0))


def test_evaluate_predictions_keys():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 20)
    per = {"a": rng.standard_normal((20, 3)), "v": rng.standard_normal((20, 3))}
    out = metrics.evaluate_predictions(per["a"] + per["v"], per, labels, {"a": rng.standard_normal((20, 4)),
                                                                             "v": rng.standard_normal((20, 4))})
    for k in ("acc", "map", "f1", "acc/a", "map/v", "f1/a", "gap_acc", "gap_map", "gap_f1", "modality_gap"):
        assert k in out
    assert out["gap_acc"] == pytest.approx(abs(out["acc/a"] - out["acc/v"]))
