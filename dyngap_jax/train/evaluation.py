"""Evaluation: predictions and metrics on a split, restoring a run's checkpoints, and the results table."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
import numpy as np

from dyngap_jax import metrics, parallel
from dyngap_jax.train.checkpoint import Checkpointer
from dyngap_jax.train.setup import Run, setup
from dyngap_jax.train.steps import TrainState
from dyngap_jax.train.workdir import recorded_config


def predict(state: TrainState, eval_step, run: Run, split: str):
    """``(logits, modality_logits, features, labels)`` on every example of ``split`` once, as NumPy.

    On the run's mesh each batch is padded (last example repeated) to divide over the data axis
    and the padding is dropped from the outputs; with several processes the outputs are gathered.
    """
    logits, per, feats, labels = [], {}, {}, []
    mesh = run.mesh
    for batch in run.loader(split, train=False, batch_size=run.batch.eval):
        n = len(batch["label"])
        padded, _ = parallel.pad_to_multiple(batch, mesh.shape["data"] // jax.process_count())
        out = eval_step(state, parallel.shard_batch(padded, mesh))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
            batch = multihost_utils.process_allgather(padded, tiled=True)
            n = len(batch["label"])
        out = jax.tree_util.tree_map(lambda x: np.asarray(x)[:n], jax.device_get(out))
        logits.append(out["logits"])
        labels.append(np.asarray(batch["label"])[:n])
        for m, v in out["modality_logits"].items():
            per.setdefault(m, []).append(v)
        for m, v in out["features"].items():
            feats.setdefault(m, []).append(v)
    return (np.concatenate(logits), {m: np.concatenate(v) for m, v in per.items()},
            {m: np.concatenate(v) for m, v in feats.items()}, np.concatenate(labels))


def _log_softmax_at(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(len(labels)), labels]


def evaluate(state: TrainState, eval_step, run: Run, split: str) -> dict[str, float]:
    """Every metric on ``split`` (each example once), plus the mean L_CLS."""
    logits, per, feats, labels = predict(state, eval_step, run, split)
    res = metrics.evaluate_predictions(logits, per, labels, feats)
    res["l_cls"] = float(np.mean(-_log_softmax_at(logits.astype(np.float64), labels)))
    return res


# --------------------------------------------------------------------------- restoring a run


def epoch_checkpoints(workdir: str) -> dict[int, int]:
    """``{epoch: step}`` of the retained checkpoints saved at an epoch's end (raise
    ``config.train.keep_checkpoints`` to keep every epoch's)."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    out = {}
    try:
        for step in ckpt.all_steps():
            extra = ckpt.restore_extra(step)
            if not extra.get("step_in_epoch"):
                out[int(extra["epoch"])] = step  # extra["epoch"] is the next epoch's index: epochs done
    finally:
        ckpt.close()
    return out


def load_run_state(config, workdir: str, which: str | int = "latest") -> tuple[Run, TrainState, int]:
    """``(run, state, step)`` of a run's ``latest`` checkpoint, its ``best`` (on validation) one, or step ``which``.

    ``config=None`` reads the config the run recorded (``config.json``). The state to restore into
    comes from :meth:`Run.create_train_state`, the same tree training saved.
    """
    if which not in ("latest", "best") and not isinstance(which, (int, np.integer)):
        raise ValueError(f"load_run_state: `which` must be 'latest', 'best' or a step, got {which!r}")
    run = setup(recorded_config(workdir) if config is None else config)
    folder = os.path.join(workdir, "best" if which == "best" else "checkpoints")
    ckpt = Checkpointer(folder)
    try:
        if isinstance(which, (int, np.integer)):
            if int(which) not in ckpt.all_steps():
                raise FileNotFoundError(f"{folder}: no checkpoint at step {which}; retained steps: {ckpt.all_steps()}")
            step = int(which)
        else:
            step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{folder}: no checkpoint (has the run in {workdir} saved one?)")
        state, _ = ckpt.restore(step, run.create_train_state())
    finally:
        ckpt.close()
    return run, state, step


def evaluate_checkpoint(config, workdir: str, split: str, which: str | int = "best"):
    """``(step, metrics)`` of the ``best`` (on validation) or ``latest`` checkpoint of ``workdir`` on ``split``."""
    run, state, step = load_run_state(config, workdir, which)
    state = jax.device_put(state, run.shardings(state)[0])
    return step, evaluate(state, run.eval_step(state), run, split)


def predict_checkpoint(config, workdir: str, split: str, which: str | int = "best"):
    """``(logits, modality_logits, features, labels)`` of a checkpoint on every example of ``split``."""
    run, state, _ = load_run_state(config, workdir, which)
    state = jax.device_put(state, run.shardings(state)[0])
    return predict(state, run.eval_step(state), run, split)


# --------------------------------------------------------------------------- the table


def metrics_table(results: Mapping[str, Mapping[str, float]], modalities: Sequence[str],
                  names: Sequence[str] = ("acc", "map", "f1")) -> str:
    """``{split: metrics}`` as one table: fused and per-modality scores, the gap; then the modality-gap distances."""
    head = f"{'split':<11} {'metric':<6} {'fused':>8} " + " ".join(f"{m:>8}" for m in modalities) + f" {'gap':>8}"
    lines = [head, "-" * len(head)]
    for split, res in results.items():
        if not res:
            continue
        for name in names:
            lines.append(f"{split:<11} {name:<6} {res[name]:>8.4f} "
                         + " ".join(f"{res[f'{name}/{m}']:>8.4f}" for m in modalities) + f" {res[f'gap_{name}']:>8.4f}")
    gaps = [f"{split} {res['modality_gap']:.4f}" for split, res in results.items() if res and "modality_gap" in res]
    if gaps:
        lines += ["", "modality-gap distance: " + ", ".join(gaps)]
    return "\n".join(lines)


def summary_table(summary: Mapping, modalities: Sequence[str]) -> str:
    """The end-of-run table: :func:`metrics_table` at the best validation epoch, and the final alpha."""
    best = summary["best"]
    lines = [f"best epoch {best['epoch']} by {best['metric']} (test never used for selection)", "",
             metrics_table({s: best.get(s) for s in ("validation", "test")}, modalities), "",
             f"final alpha: {np.array2string(np.asarray(summary['final_alpha']), precision=4)}"]
    a = summary.get("alpha_steps") or {}
    if a.get("count"):
        residual = "n/a" if a["max_residual"] is None else f"{a['max_residual']:.2e}"
        lines.append(f"alpha steps: {a['count']} ({a['converged']} converged, {a['skipped']} skipped), "
                     f"{a['mean_iterations']:.0f} iterations on average, max residual {residual}, {a['hvps']:,.0f} HVPs")
    return "\n".join(lines)
