"""Evaluation: predictions and metrics on a split, restoring a run's checkpoints, and the results table."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
import numpy as np

from dyngap_jax import metrics, parallel
from dyngap_jax.methods import TrainState
from dyngap_jax.train.checkpoint import Checkpointer
from dyngap_jax.train.loop_state import LoopState
from dyngap_jax.train.setup import Run, setup
from dyngap_jax.train.workdir import recorded_config


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def predict(state: TrainState, eval_step, run: Run, split: str):
    """``(logits, modality_logits, features, labels)`` on every example of ``split`` once, as NumPy.

    Every batch is padded (last example repeated) to one fixed size that divides over this
    process's devices, with a mask of the real rows; the padding is dropped from the outputs.
    With several processes, each reads its own contiguous part of the split (parts differ by at
    most one example), all run the same number of batches (a process whose part is used up feeds
    padding only), and the outputs and masks are gathered and put back in split order, so every
    process returns the whole split.
    """
    mesh, processes = run.mesh, jax.process_count()
    local_devices = mesh.shape["data"] // processes
    size = _ceil_div(run.batch.local_eval, local_devices) * local_devices
    steps = _ceil_div(_ceil_div(run.manifest.splits[split]["num_examples"], processes), size)
    it, template = iter(run.loader(split, train=False, batch_size=size * processes)), None
    rows = [[] for _ in range(processes)]  # per process, per batch: (outputs, labels) of the real rows
    for _ in range(steps):
        batch = next(it, None)
        if batch is None:  # this process's part is used up; the others still have batches
            batch = {k: v[:0] for k, v in (template or run.example_batch()).items()}
        template = template or batch
        n = len(batch["label"])
        padded = ({k: np.concatenate([v, np.repeat(v[-1:] if n else template[k][:1], size - n, axis=0)])
                   for k, v in batch.items()} if n < size else dict(batch))
        out = eval_step(state, parallel.shard_batch(padded, mesh))
        gathered = (out, padded["label"], np.arange(size) < n)
        if processes > 1:
            from jax.experimental import multihost_utils

            gathered = multihost_utils.process_allgather(gathered, tiled=True)
        out, label, valid = jax.tree_util.tree_map(np.asarray, jax.device_get(gathered))
        for p in range(processes):  # the gathered rows are process 0's batch, then process 1's, ...
            keep = np.zeros_like(valid)
            keep[p * size:(p + 1) * size] = valid[p * size:(p + 1) * size]
            rows[p].append((jax.tree_util.tree_map(lambda x: x[keep], out), label[keep]))
    ordered = [r for part in rows for r in part]
    cat = lambda get: np.concatenate([get(o, y) for o, y in ordered])
    modalities = ordered[0][0]["modality_logits"].keys()
    return (cat(lambda o, y: o["logits"]), {m: cat(lambda o, y: o["modality_logits"][m]) for m in modalities},
            {m: cat(lambda o, y: o["features"][m]) for m in ordered[0][0]["features"]}, cat(lambda o, y: y))


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
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)  # reading: never deletes
    out = {}
    try:
        for step in ckpt.all_steps():
            loop = LoopState.from_json(ckpt.restore_extra(step))
            if not loop.step_in_epoch:
                out[loop.epoch] = step  # loop.epoch: the epochs done
    finally:
        ckpt.close()
    return out


def best_step(workdir: str) -> int:
    """The step of the best-on-validation epoch's checkpoint, as the run's latest checkpoint records it."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)  # reading: never deletes
    try:
        latest = ckpt.latest_step()
        if latest is None:
            raise FileNotFoundError(f"{ckpt.directory}: no checkpoint (has the run in {workdir} saved one?)")
        best = LoopState.from_json(ckpt.restore_extra(latest)).best_step
    finally:
        ckpt.close()
    if best is None:
        raise FileNotFoundError(f"{workdir}: no epoch has finished yet, so there is no best checkpoint")
    return int(best)


def load_run_state(config, workdir: str, which: str | int = "latest") -> tuple[Run, TrainState, int]:
    """``(run, state, step)`` of a run's ``latest`` checkpoint, its ``best`` (on validation) one, or step ``which``.

    ``config=None`` reads the config the run recorded (``config.json``). The state to restore into
    comes from :meth:`Run.create_train_state`, the same tree training saved, placed with the run's
    shardings first, so that every process restores its own shards (as training does). The best
    epoch's checkpoint is the one its latest checkpoint names (runs from before the single save per
    epoch kept it in ``<workdir>/best``, which is read when present).
    """
    if which not in ("latest", "best") and not isinstance(which, (int, np.integer)):
        raise ValueError(f"load_run_state: `which` must be 'latest', 'best' or a step, got {which!r}")
    run = setup(recorded_config(workdir) if config is None else config)
    legacy_best = os.path.join(workdir, "best")
    folder = legacy_best if which == "best" and os.path.isdir(legacy_best) else os.path.join(workdir, "checkpoints")
    if which == "best" and folder != legacy_best:
        which = best_step(workdir)
    ckpt = Checkpointer(folder, max_to_keep=None)
    try:
        if isinstance(which, (int, np.integer)):
            if int(which) not in ckpt.all_steps():
                raise FileNotFoundError(f"{folder}: no checkpoint at step {which}; retained steps: {ckpt.all_steps()}")
            step = int(which)
        else:
            step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{folder}: no checkpoint (has the run in {workdir} saved one?)")
        like = run.create_train_state()
        state, _ = ckpt.restore(step, jax.device_put(like, run.shardings(like)[0]))
    finally:
        ckpt.close()
    return run, state, step


def evaluate_checkpoint(config, workdir: str, split: str, which: str | int = "best"):
    """``(step, metrics)`` of the ``best`` (on validation) or ``latest`` checkpoint of ``workdir`` on ``split``."""
    run, state, step = load_run_state(config, workdir, which)
    return step, evaluate(state, run.eval_step(state), run, split)


def predict_checkpoint(config, workdir: str, split: str, which: str | int = "best"):
    """``(logits, modality_logits, features, labels)`` of a checkpoint on every example of ``split``."""
    run, state, _ = load_run_state(config, workdir, which)
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
    """The end-of-run table: :func:`metrics_table` at the best validation epoch, and the final alpha (where the
    method has one) with the alpha steps' totals."""
    best = summary["best"]
    chosen = ("test never used for selection" if not best["metric"].startswith("test/")
              else "chosen on test, the authors' protocol: the test scores below are not an unbiased estimate")
    lines = [f"best epoch {best['epoch']} by {best['metric']} ({chosen})", "",
             metrics_table({s: best.get(s) for s in ("validation", "test")}, modalities)]
    if "final_alpha" in summary:  # a method that weighs L_MM (LFM)
        lines += ["", f"final alpha: {np.array2string(np.asarray(summary['final_alpha']), precision=4)}"]
    a = summary.get("alpha_steps") or {}
    if a.get("count"):
        residual = "n/a" if a["max_residual"] is None else f"{a['max_residual']:.2e}"
        lines.append(f"alpha steps: {a['count']} ({a['converged']} converged, {a['skipped']} skipped), "
                     f"{a['mean_iterations']:.0f} iterations on average, max residual {residual}, {a['hvps']:,.0f} HVPs")
    return "\n".join(lines)
