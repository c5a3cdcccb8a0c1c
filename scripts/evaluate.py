"""Metrics of a run's checkpoint on one split: ``python scripts/evaluate.py --config ... --workdir runs/x --split test``.

``--which best`` (default: the best-on-validation checkpoint) or ``latest``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dyngap_jax.train.evaluation import evaluate_checkpoint, metrics_table  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's configs/<dataset>.py:<method>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run folder.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cfg = _CONFIG.value
    step, res = evaluate_checkpoint(cfg, _WORKDIR.value, _SPLIT.value, _WHICH.value)
    print(f"{cfg.dataset} / {cfg.method} — {_WORKDIR.value}, {_WHICH.value} checkpoint (step {step}), split {_SPLIT.value}")
    print(metrics_table(res, list(cfg.model.modalities)))


if __name__ == "__main__":
    app.run(main)
