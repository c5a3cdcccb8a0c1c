"""Train (or resume) one run: ``python -m scripts.train --config configs/cremad.py:ours_lb --workdir runs/x``.

Any config field can be overridden, e.g. ``--config.train.num_epochs=5``. The whole config is
checked before anything runs (a mistake names the field; nothing is written). Rerunning with the
same workdir resumes from its latest checkpoint. Ends with a table of fused and per-modality
metrics at the best validation epoch, the gap and the final alpha.
"""
import dataclasses

import jax
from absl import flags
from ml_collections import config_flags

from dyngap_jax import parallel
from dyngap_jax.train import summary_table, train, validate
from scripts import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "(required) A configs/<dataset>.py:<method> file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "(required) Run folder (checkpoints, metrics.jsonl, TensorBoard, plots).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cfg = _CONFIG.value
    checked, _ = validate(cfg)  # the whole config, before anything: its multi-process settings included
    parallel.initialize(dataclasses.asdict(checked.parallel.distributed))  # multi-host: before anything uses JAX
    summary = train(cfg, _WORKDIR.value)
    if jax.process_index() != 0:
        return
    print()
    print(f"{cfg.dataset} / {cfg.method} — {_WORKDIR.value}")
    print(summary_table(summary, list(cfg.model.modalities)))


if __name__ == "__main__":
    common.run(main)
