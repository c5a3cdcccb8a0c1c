"""Metrics of a run's checkpoint on one split: ``python -m scripts.evaluate --workdir runs/x --split test``.

``--config`` is optional: without it the run's recorded config (``<workdir>/config.json``) is used.
``--which best`` (default: the best-on-validation checkpoint), ``latest``, or a step number.
"""
from absl import app, flags
from ml_collections import config_flags

from dyngap_jax.train import evaluate_checkpoint, metrics_table
from scripts import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's configs/<dataset>.py:<method> (default: the "
                                          "config recorded in --workdir).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "(required) The run folder.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_WHICH = flags.DEFINE_string("which", "best", "Which checkpoint: best, latest, or a step number.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    which = _WHICH.value
    if which not in ("best", "latest"):
        if not which.isdigit():
            raise app.UsageError(f"--which: best, latest or a step number, got {which!r}")
        which = int(which)
    step, res = evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _SPLIT.value, which)
    modalities = [k.split("/", 1)[1] for k in res if k.startswith("acc/")]
    print(f"{_WORKDIR.value}: {_WHICH.value} checkpoint (step {step}), split {_SPLIT.value}")
    print(metrics_table({_SPLIT.value: res}, modalities))


if __name__ == "__main__":
    common.run(main)
