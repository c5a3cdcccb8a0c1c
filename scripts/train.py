"""Train (or resume) one run: ``python scripts/train.py --config configs/cremad.py:ours_lb --workdir runs/x``.

Any config field can be overridden, e.g. ``--config.train.num_epochs=5``. Rerunning with the same
workdir resumes from its latest checkpoint. Ends with a table of fused and per-modality metrics
at the best validation epoch, the gap and the final alpha.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dyngap_jax import parallel  # noqa: E402
from dyngap_jax.train import summary_table, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<dataset>.py:<method> file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics.jsonl, TensorBoard, plots).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cfg = _CONFIG.value
    parallel.initialize(cfg.parallel.distributed.to_dict())  # multi-host: before anything else uses JAX
    summary = train(cfg, _WORKDIR.value)
    if jax.process_index() != 0:
        return
    print()
    print(f"{cfg.dataset} / {cfg.method} — {_WORKDIR.value}")
    print(summary_table(summary, list(cfg.model.modalities)))


if __name__ == "__main__":
    app.run(main)
