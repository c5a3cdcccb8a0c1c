"""A run's folder: the recorded config (``config.json``) and the metrics log (JSONL + TensorBoard)."""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from dyngap_jax.io import write_json

CONFIG_FILE = "config.json"
# fields that may change between a run and its resumption (display, input workers, device layout)
RESUMABLE_CHANGES = ("progress", "data.worker_count", "parallel")


def comparable_config(cfg: dict) -> dict:
    """``cfg`` as JSON would store it, without the fields a resumed run may change."""
    out = json.loads(json.dumps(cfg, default=str))
    for key in RESUMABLE_CHANGES:
        *parents, leaf = key.split(".")
        d = out
        for p in parents:
            d = d.get(p, {})
        d.pop(leaf, None)
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: dict, b: dict) -> list[str]:
    """The dotted fields in which two configs differ (resumable fields left out)."""
    fa, fb = _flat(comparable_config(a)), _flat(comparable_config(b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def check_config(cfg: dict, workdir: str) -> None:
    """Refuse a workdir that holds a run of another config (naming the differing fields)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        diff = config_differences(json.load(f), cfg)
    if diff:
        raise ValueError(f"{workdir} holds a run of another config (differs in {', '.join(diff[:8])}); "
                         "use a new --workdir, or the same config to resume")


def record_config(cfg: dict, workdir: str) -> None:
    """Write the run's config to ``config.json`` once (process 0); :func:`check_config` first."""
    check_config(cfg, workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    if jax.process_index() == 0 and not os.path.exists(path):
        write_json(path, cfg)


def recorded_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was trained with (its ``config.json``)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no recorded config (is {workdir} a run folder? give --config)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


class MetricsLogger:
    """``metrics.jsonl`` and TensorBoard events in the workdir (process 0 only)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
