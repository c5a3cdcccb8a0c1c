"""Algorithm 1 end to end: ``train(config, workdir)`` runs (or resumes) a run.

Per epoch (:func:`_train_epoch`): ``steps_per_epoch`` train steps on L_total with the current alpha;
for the learned strategy an alpha step (:func:`dyngap_jax.train.steps.make_alpha_step`) after every
``config.alpha.inner_iters`` train steps, counted over the run (0: once per epoch, after its last step). Then
(:func:`_end_epoch`) every metric on validation and test, the best epoch chosen on validation (never
on test), the epoch's checkpoint and plots. Everything the run is made of comes from
:func:`dyngap_jax.train.setup.setup`, before anything is written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from dyngap_jax import faults, parallel
from dyngap_jax.io import write_json
from dyngap_jax.train import plots
from dyngap_jax.train.checkpoint import Checkpointer
from dyngap_jax.train.evaluation import evaluate
from dyngap_jax.train.setup import Run, setup
from dyngap_jax.train.steps import TrainState
from dyngap_jax.train.workdir import MetricsLogger, check_config, record_config, workdir_lock


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class _Folder:
    """The run folder's writers: checkpoints (latest and best) and the metrics log."""

    workdir: str
    ckpt: Checkpointer
    best: Checkpointer
    log: MetricsLogger


@contextlib.contextmanager
def _open_folder(run: Run, workdir: str):
    """Record the config (refusing another run's folder), open the writers; close them all on exit."""
    record_config(run.cfg, workdir)
    with contextlib.ExitStack() as stack:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=run.cfg["train"]["keep_checkpoints"])
        stack.callback(ckpt.close)
        best = Checkpointer(os.path.join(workdir, "best"), max_to_keep=1)
        stack.callback(best.close)
        log = MetricsLogger(workdir)
        stack.callback(log.close)
        yield _Folder(workdir, ckpt, best, log)


def _iter_state(it):
    s = it.get_state()
    return s.decode() if isinstance(s, bytes) else s


def _set_iter_state(it, state) -> None:
    if state is not None:
        it.set_state(state.encode() if isinstance(state, str) else state)


@dataclasses.dataclass
class _Steps:
    train: Any
    eval: Any
    alpha: Any
    outer_it: Any  # the outer batches' loader (learned alpha only)


def _alpha_step(run: Run, steps: _Steps, state: TrainState, local_np: dict, batch, hyper_log: list):
    """Algorithm 1's alpha step on this train step's batch (its first ``alpha.batch_size`` examples)
    and the next outer batch; its diagnostics go to ``hyper_log``."""
    inner = batch if run.batch.local_alpha == run.batch.local_train else parallel.shard_batch(
        {k: v[:run.batch.local_alpha] for k, v in local_np.items()}, run.mesh)
    state, res, usable = steps.alpha(state, inner, parallel.shard_batch(next(steps.outer_it), run.mesh))
    info = {k: (bool(v) if np.asarray(v).dtype == bool else float(v)) for k, v in jax.device_get(res.info).items()}
    info["hypergradient"] = float(np.mean(np.asarray(res.value)))
    info["applied"] = bool(usable)
    hyper_log.append(info)
    if not info["applied"]:
        logging.warning("alpha step at %d skipped: %s", int(state.step), info)
    return state


def _train_epoch(run: Run, steps: _Steps, state: TrainState, extra: dict, folder: _Folder, max_steps):
    """Train steps (and alpha steps) to the end of the epoch ``extra["epoch"]``, or to ``max_steps``.

    Returns ``(state, record or None)``: the epoch's training record, or None when it stopped at
    ``max_steps`` inside the epoch (after a checkpoint to resume from).
    """
    cfg, epoch, num_epochs = run.cfg, extra["epoch"], run.cfg["train"]["num_epochs"]
    t_epoch = epoch + 1  # the paper's t counts from 1
    if run.strategy.fixed is not None:
        value = jnp.asarray(run.strategy.value(t_epoch, num_epochs), state.alpha.value.dtype)
        state = jax.device_put(state.replace(alpha=state.alpha.replace(value=value)), run.shardings(state)[0])
    train_it = iter(run.loader("train", train=True, epoch=epoch))
    start = extra["step_in_epoch"]
    _set_iter_state(train_it, extra["train_iter"] if start else None)
    inner_iters = cfg["alpha"]["inner_iters"]
    # a resumed epoch continues the epoch's running sums from the checkpoint
    partial = extra.get("partial") if start else None
    sums, count, hyper_log = (dict(partial["sums"]), partial["count"], list(partial["hyper_log"])) if partial else ({}, 0, [])
    every = cfg["train"]["checkpoint_every_steps"]
    bar = tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {t_epoch}/{num_epochs}", unit="step",
               dynamic_ncols=True, disable=jax.process_index() != 0 or not cfg["progress"])
    t0, count0 = time.time(), count
    with bar:
        for i in range(start, run.steps_per_epoch):
            local_np = next(train_it)
            batch = parallel.shard_batch(local_np, run.mesh)
            new_state, m = steps.train(state, batch, state.alpha.value)
            m = jax.device_get(m)
            if not (m["finite"] and m["params_finite"]):
                last = folder.ckpt.latest_step()
                what = "loss or gradients" if not m["finite"] else "parameters after the update"
                where = f"non-finite {what} at step {int(state.step) + 1} (epoch {t_epoch}, batch {i + 1}); "
                raise TrainingDiverged(where + (f"the last good checkpoint is step {last} in {folder.ckpt.directory}"
                                                if last is not None else "no checkpoint yet"))
            state = new_state
            for k in ("loss", "l_cls", "l_mm"):
                sums[k] = sums.get(k, 0.0) + float(m[k])
            count += 1
            # Algorithm 1: an alpha step after every inner_iters train steps (counted over the run), or once an epoch
            due = int(state.step) % inner_iters == 0 if inner_iters else i + 1 == run.steps_per_epoch
            if steps.alpha is not None and due:
                state = _alpha_step(run, steps, state, local_np, batch, hyper_log)
            bar.set_postfix(loss=f"{m['loss']:.4f}", alpha=np.array2string(np.asarray(state.alpha.value), precision=3),
                            rate=f"{(count - count0) / max(time.time() - t0, 1e-9):.1f}/s")
            bar.update(1)
            stop = max_steps is not None and int(state.step) >= max_steps
            if (stop or (every and int(state.step) % every == 0)) and i + 1 < run.steps_per_epoch:
                extra.update(step_in_epoch=i + 1, train_iter=_iter_state(train_it),
                             outer_iter=_iter_state(steps.outer_it) if steps.outer_it is not None else None,
                             partial={"sums": sums, "count": count, "hyper_log": hyper_log})
                folder.ckpt.save(int(state.step), state, extra)
                if stop:
                    return state, None
    record = {"epoch": t_epoch, "split": "train", "step": int(state.step),
              "alpha": np.asarray(state.alpha.value).tolist(), "alpha_mean": float(np.mean(state.alpha.value)),
              "alpha_skipped": int(state.alpha.skipped), **{k: v / max(count, 1) for k, v in sums.items()},
              "steps_per_s": (count - count0) / max(time.time() - t0, 1e-9)}
    record.update(alpha_diagnostics(hyper_log))
    return state, record


def alpha_diagnostics(hyper_log: list[dict]) -> dict:
    """An epoch's alpha steps: how many, converged, skipped; iterations, HVPs, residuals, damping."""
    if not hyper_log:
        return {}
    finite = lambda k: [h[k] for h in hyper_log if k in h and np.isfinite(h[k])]
    out = {"alpha_steps": len(hyper_log), "alpha_converged": sum(bool(h["converged"]) for h in hyper_log),
           "hypergrad_skipped": sum(not h["applied"] for h in hyper_log),
           "hypergrad_iterations": float(np.mean([h["iterations"] for h in hyper_log])),
           "hypergrad_iterations_max": float(np.max([h["iterations"] for h in hyper_log])),
           "hypergrad_hvps": float(np.sum([h["hvp_count"] for h in hyper_log])),
           "hypergrad_hypergradient": float(np.mean([h["hypergradient"] for h in hyper_log]))}
    residuals = finite("residual")
    if residuals:
        out.update(hypergrad_residual=float(np.mean(residuals)), hypergrad_residual_max=float(np.max(residuals)))
    if finite("damping"):
        out["hypergrad_damping"] = float(np.mean(finite("damping")))
    return out


ALPHA_KEYS = ("alpha_steps", "alpha_converged", "hypergrad_skipped", "hypergrad_iterations", "hypergrad_iterations_max",
              "hypergrad_hvps", "hypergrad_residual", "hypergrad_residual_max", "hypergrad_damping")


def alpha_summary(history: list[dict]) -> dict:
    """The run's alpha steps from the epochs' diagnostics: ``count``, ``converged``, ``skipped``,
    ``max_residual``, ``mean_iterations``, ``hvps`` (all 0 for a fixed strategy)."""
    eps = [h for h in history if h.get("alpha_steps")]
    count = sum(h["alpha_steps"] for h in eps)
    residuals = [h["hypergrad_residual_max"] for h in eps if "hypergrad_residual_max" in h]
    return {"count": count, "converged": sum(h["alpha_converged"] for h in eps),
            "skipped": sum(h["hypergrad_skipped"] for h in eps),
            "max_residual": max(residuals) if residuals else None,
            "mean_iterations": sum(h["hypergrad_iterations"] * h["alpha_steps"] for h in eps) / count if count else 0.0,
            "hvps": sum(h["hypergrad_hvps"] for h in eps)}


def _end_epoch(run: Run, steps: _Steps, state: TrainState, extra: dict, record: dict, folder: _Folder) -> None:
    """Evaluate on validation and test, select the best epoch on validation, checkpoint, plot (updates ``extra``)."""
    t_epoch, step = record["epoch"], int(state.step)
    folder.log.write(record, step)
    evals = {}
    for split in ("validation", "test"):
        if split in run.manifest.splits:
            evals[split] = evaluate(state, steps.eval, run, split)
            folder.log.write({"epoch": t_epoch, "split": split, "step": step, **evals[split]}, step)
    extra["history"].append({"epoch": t_epoch, "alpha": record["alpha"], "train_loss": record.get("loss"),
                             "alpha_skipped": record["alpha_skipped"],
                             **{k: record[k] for k in ALPHA_KEYS if k in record},
                             **{f"{s}/{k}": v for s, e in evals.items() for k, v in e.items()}})
    if record.get("alpha_steps"):
        logging.info("epoch %d: %d alpha steps, %d converged, %d skipped; %.0f iterations (max %.0f), %.0f HVPs, "
                     "residual mean %.2e max %.2e, damping %.2e", t_epoch, record["alpha_steps"],
                     record["alpha_converged"], record["hypergrad_skipped"], record["hypergrad_iterations"],
                     record["hypergrad_iterations_max"], record["hypergrad_hvps"],
                     record.get("hypergrad_residual", float("nan")), record.get("hypergrad_residual_max", float("nan")),
                     record.get("hypergrad_damping", float("nan")))
    faults.point("metrics_written")
    select = run.cfg["train"]["select_metric"]
    score = evals["validation"][select]
    if extra["best"] is None or score > extra["best"]["score"]:
        extra["best"] = {"epoch": t_epoch, "score": score, "metric": f"validation/{select}",
                         "validation": evals["validation"], "test": evals.get("test")}
        # a run killed after this save and before the checkpoint's retrains the epoch to this same step
        folder.best.save(step, state, {"epoch": t_epoch}, replace=True)
        faults.point("best_saved")
    extra.update(epoch=t_epoch, step_in_epoch=0, train_iter=None, partial=None,
                 outer_iter=_iter_state(steps.outer_it) if steps.outer_it is not None else None)
    folder.ckpt.save(step, state, extra)
    faults.point("checkpoint_saved")
    if jax.process_index() == 0:
        plots.write_all(folder.workdir, extra["history"], run.modalities, run.cfg["train"]["num_epochs"])


def train(config, workdir: str, max_steps: int | None = None) -> dict:
    """Run (or resume) a training run; returns the final summary (best-on-validation epoch and its metrics).

    The config is validated and the run built (:func:`~dyngap_jax.train.setup.setup`) before the
    workdir is touched: a mistake fails with the field named and nothing written. ``max_steps`` stops
    after that many train steps in all, with a checkpoint (data iterators included) from which a
    later call resumes exactly; the summary then has ``"stopped_at"``.
    """
    run = setup(config)
    with workdir_lock(workdir):  # one run at a time in a folder
        return _train(run, workdir, max_steps)


def _train(run: Run, workdir: str, max_steps: int | None) -> dict:
    check_config(run.cfg, workdir)  # refuse another run's folder before any work
    state = run.create_train_state()
    state = jax.device_put(state, run.shardings(state)[0])
    train_step, eval_step, alpha_step = run.compile_steps(state)
    with _open_folder(run, workdir) as folder:
        extra = {"epoch": 0, "step_in_epoch": 0, "train_iter": None, "outer_iter": None, "history": [], "best": None}
        restored = folder.ckpt.restore_latest(state)
        if restored is not None:
            state, extra = restored
            logging.info("resumed from step %d (epoch %d)", int(state.step), extra["epoch"] + 1)
            print(f"resuming {workdir} at step {int(state.step)} (epoch {extra['epoch'] + 1})")
        # what a killed run logged after its last checkpoint is logged again by this one
        folder.log.rewind(int(state.step))
        outer_it = None
        if alpha_step is not None:
            outer_split = run.cfg["alpha"]["outer"]
            outer_it = iter(run.loader(outer_split, train=True, infinite=True, batch_size=run.batch.alpha))
            _set_iter_state(outer_it, extra["outer_iter"])
        steps = _Steps(train_step, eval_step, alpha_step, outer_it)
        num_epochs = run.cfg["train"]["num_epochs"]
        while extra["epoch"] < num_epochs and (max_steps is None or int(state.step) < max_steps):
            state, record = _train_epoch(run, steps, state, extra, folder, max_steps)
            if record is None:  # stopped at max_steps inside the epoch
                break
            _end_epoch(run, steps, state, extra, record, folder)
        if extra["epoch"] < num_epochs:
            summary = {"stopped_at": int(state.step), "best": extra["best"], "history": extra["history"]}
        else:
            summary = {"best": extra["best"], "final_alpha": np.asarray(state.alpha.value).tolist(),
                       "alpha_steps": alpha_summary(extra["history"]), "history": extra["history"]}
            if jax.process_index() == 0:
                write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
