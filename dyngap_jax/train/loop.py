"""Algorithm 1 end to end: ``train(config, workdir)`` runs (or resumes) a run.

Per epoch (:func:`_train_epoch`): ``steps_per_epoch`` train steps on L_total with the current alpha;
for the learned strategy an alpha step (:func:`dyngap_jax.train.steps.make_alpha_step`) after every
``config.alpha.inner_iters`` train steps, counted over the run (0: once per epoch, after its last step). Then
(:func:`_end_epoch`) every metric on validation and test, the best epoch chosen on validation (never
on test), the epoch's one checkpoint (the best epoch is recorded in it and kept) and plots.
Everything the run is made of comes from :func:`dyngap_jax.train.setup.setup`, before anything is
written.

The host never waits for a step: the steps' metrics and the alpha steps' diagnostics stay on the
device and are fetched together every ``config.train.log_every_steps`` steps, before a checkpoint
and at the epoch's end; that is also when a non-finite step is found and the run stopped (no
checkpoint is written after one). The train and alpha steps donate the state's buffers. The
train, evaluation and alpha steps compile once each (``summary.json``'s ``compilations``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from dyngap_jax import faults, parallel
from dyngap_jax.compilation import CompileCounter
from dyngap_jax.io import write_json
from dyngap_jax.train import plots
from dyngap_jax.train.checkpoint import Checkpointer
from dyngap_jax.train.config import ConfigError
from dyngap_jax.train.evaluation import evaluate
from dyngap_jax.train.setup import Run, setup
from dyngap_jax.train.steps import TrainState
from dyngap_jax.train.workdir import MetricsLogger, check_config, record_config, workdir_lock


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class _Plotter:
    """Writes the run's plots in a background thread (matplotlib's first use builds its font cache,
    seconds on a fresh machine; every epoch's two figures cost as much again): the training loop
    hands over the history and goes on; :meth:`close` writes the last one and waits."""

    def __init__(self, workdir: str, modalities, num_epochs: int):
        self.args = (workdir, list(modalities), num_epochs)
        self.enabled = jax.process_index() == 0
        self._latest, self._cond, self._closed = None, threading.Condition(), False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="plots", daemon=True) if self.enabled else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, history: list[dict]) -> None:
        if self.enabled:
            with self._cond:
                self._latest = [dict(h) for h in history]
                self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._latest is None and not self._closed:
                    self._cond.wait()
                history, self._latest = self._latest, None
                closed = self._closed
            if history is not None:
                try:
                    plots.write_all(self.args[0], history, self.args[1], self.args[2])
                except BaseException as e:  # noqa: BLE001 - reported by close()
                    self._error = e
            if closed and history is None:
                return

    def close(self) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            logging.warning("writing the plots failed: %s", self._error)


@dataclasses.dataclass
class _Folder:
    """The run folder's writers: checkpoints, the metrics log, the plots."""

    workdir: str
    ckpt: Checkpointer
    log: MetricsLogger
    plots: _Plotter


@contextlib.contextmanager
def _open_folder(run: Run, workdir: str):
    """Record the config (refusing another run's folder), open the writers; close them all on exit."""
    record_config(run.cfg, workdir)
    with contextlib.ExitStack() as stack:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=run.cfg["train"]["keep_checkpoints"])
        stack.callback(ckpt.close)
        log = MetricsLogger(workdir)
        stack.callback(log.close)
        plotter = _Plotter(workdir, run.modalities, run.cfg["train"]["num_epochs"])
        stack.callback(plotter.close)
        yield _Folder(workdir, ckpt, log, plotter)


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
    outer_it: Any  # the outer batches' loader (learned alpha only; None with the fixed held-out batch)
    outer_fixed: Any = None  # alpha.outer="heldout": the one outer batch, on the device


@dataclasses.dataclass
class _Epoch:
    """One epoch's accounting on the host: the running sums and the alpha steps' diagnostics (both
    checkpointed for a resumed epoch), and the device results not fetched yet."""

    t_epoch: int
    sums: dict
    count: int
    hyper_log: list
    step: int  # train steps done in all (the host's count, so that nothing waits for state.step)
    pending_train: list = dataclasses.field(default_factory=list)  # (step, batch number, metrics on device)
    pending_alpha: list = dataclasses.field(default_factory=list)  # (step, result, applied on device)
    last: dict | None = None  # the newest fetched step metrics


def _fetch(ep: _Epoch, folder: _Folder) -> None:
    """Bring the pending step metrics and alpha diagnostics to the host (one transfer): add them to the
    epoch's sums, and stop the run at the first non-finite step."""
    if not ep.pending_train and not ep.pending_alpha:
        return
    train_m, alpha_r = jax.device_get(([m for *_, m in ep.pending_train], [r[1:] for r in ep.pending_alpha]))
    for (step, batch_no, _), m in zip(ep.pending_train, train_m):
        if not (m["finite"] and m["params_finite"]):
            last = folder.ckpt.latest_step()
            what = "loss or gradients" if not m["finite"] else "parameters after the update"
            where = f"non-finite {what} at step {step} (epoch {ep.t_epoch}, batch {batch_no}); "
            raise TrainingDiverged(where + (f"the last good checkpoint is step {last} in {folder.ckpt.directory}"
                                            if last is not None else "no checkpoint yet"))
        for k in ("loss", "l_cls", "l_mm"):
            ep.sums[k] = ep.sums.get(k, 0.0) + float(m[k])
        ep.count += 1
        ep.last = m
    for (step, _, _), (res, applied) in zip(ep.pending_alpha, alpha_r):
        info = {k: (bool(v) if np.asarray(v).dtype == bool else float(v)) for k, v in res.info.items()}
        info["hypergradient"] = float(np.mean(np.asarray(res.value)))
        info["applied"] = bool(applied)
        ep.hyper_log.append(info)
        if not info["applied"]:
            logging.warning("alpha step at %d skipped: %s", step, info)
    ep.pending_train, ep.pending_alpha = [], []


def _alpha_step(run: Run, steps: _Steps, state: TrainState, local_np: dict, batch, ep: _Epoch, epoch: int):
    """Algorithm 1's alpha step; its diagnostics stay on the device until the next fetch.

    The outer batch: the next of ``alpha.outer``'s loader, or the fixed held-out batch. The inner
    batch: this train step's batch (its first ``alpha.batch_size`` examples), or with
    ``alpha.inner="outer"`` the outer batch itself. BatchNorm in training mode until the run's first
    evaluation (what ``alpha.batch_norm="authors"`` reads; epoch 0 is the only one before it).
    """
    outer = steps.outer_fixed if steps.outer_fixed is not None else parallel.shard_batch(next(steps.outer_it), run.mesh)
    if run.cfg["alpha"]["inner"] == "outer":
        inner = outer
    elif run.batch.local_alpha == run.batch.local_train:
        inner = batch
    else:
        inner = parallel.shard_batch({k: v[:run.batch.local_alpha] for k, v in local_np.items()}, run.mesh)
    state, res, usable = steps.alpha(state, inner, outer, epoch == 0)
    ep.pending_alpha.append((ep.step, res, usable))
    return state


def _progress_bar(run: Run, t_epoch: int, start: int):
    """A progress bar on a terminal only (a log file gets the per-epoch lines instead)."""
    on = run.cfg["progress"] and jax.process_index() == 0 and sys.stderr.isatty()
    return tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {t_epoch}/{run.cfg['train']['num_epochs']}",
                unit="step", dynamic_ncols=True, leave=False, disable=not on)


def _train_epoch(run: Run, steps: _Steps, state: TrainState, extra: dict, folder: _Folder, max_steps, step: int):
    """Train steps (and alpha steps) to the end of the epoch ``extra["epoch"]``, or to ``max_steps``.

    Returns ``(state, record or None, step)``: the epoch's training record, or None when it stopped at
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
    ep = (_Epoch(t_epoch, dict(partial["sums"]), partial["count"], list(partial["hyper_log"]), step) if partial
          else _Epoch(t_epoch, {}, 0, [], step))
    every, log_every = cfg["train"]["checkpoint_every_steps"], cfg["train"]["log_every_steps"]
    at_start = cfg["alpha"]["when"] == "epoch_start"
    t0, count0 = time.time(), ep.count
    with _progress_bar(run, t_epoch, start) as bar:
        for i in range(start, run.steps_per_epoch):
            local_np = next(train_it)
            batch = parallel.shard_batch(local_np, run.mesh)
            if steps.alpha is not None and at_start and i == 0:  # the authors' order: alpha first, then the epoch
                state = _alpha_step(run, steps, state, local_np, batch, ep, epoch)
            state, m = steps.train(state, batch)
            ep.step += 1
            ep.pending_train.append((ep.step, i + 1, m))
            # Algorithm 1: an alpha step after every inner_iters train steps (counted over the run), or once an epoch
            due = ep.step % inner_iters == 0 if inner_iters else i + 1 == run.steps_per_epoch
            if steps.alpha is not None and due and not at_start:
                state = _alpha_step(run, steps, state, local_np, batch, ep, epoch)
            bar.update(1)
            stop = max_steps is not None and ep.step >= max_steps
            checkpoint = (stop or (every and ep.step % every == 0)) and i + 1 < run.steps_per_epoch
            if checkpoint or len(ep.pending_train) >= log_every:
                _fetch(ep, folder)  # and a non-finite step stops the run before anything is saved
                bar.set_postfix(loss=f"{ep.last['loss']:.4f}", rate=f"{(ep.count - count0) / max(time.time() - t0, 1e-9):.1f}/s")
            if checkpoint:
                extra.update(step_in_epoch=i + 1, train_iter=_iter_state(train_it),
                             outer_iter=_iter_state(steps.outer_it) if steps.outer_it is not None else None,
                             partial={"sums": ep.sums, "count": ep.count, "hyper_log": ep.hyper_log})
                folder.ckpt.save(ep.step, state, extra, keep=_best_steps(extra))
                if stop:
                    return state, None, ep.step
    _fetch(ep, folder)
    elapsed = max(time.time() - t0, 1e-9)
    alpha = state.alpha.exact()  # to the precision alpha is kept to (config.alpha.learned.precision)
    record = {"epoch": t_epoch, "split": "train", "step": ep.step,
              "alpha": alpha.tolist(), "alpha_mean": float(np.mean(alpha)),
              "alpha_skipped": int(jax.device_get(state.alpha.skipped)), **{k: v / max(ep.count, 1) for k, v in ep.sums.items()},
              "steps_per_s": (ep.count - count0) / elapsed, "seconds": elapsed}
    record.update(alpha_diagnostics(ep.hyper_log))
    return state, record, ep.step


def _best_steps(extra: dict) -> tuple[int, ...]:
    best = extra.get("best")
    return (best["step"],) if best and best.get("step") is not None else ()


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
              "hypergrad_hvps", "hypergrad_residual", "hypergrad_residual_max", "hypergrad_damping",
              "hypergrad_hypergradient")


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


def epoch_line(run: Run, record: dict, evals: dict) -> str:
    """The epoch's one line: train loss, validation accuracy fused and per modality, the gap, alpha
    and the alpha steps' convergence."""
    num_epochs = run.cfg["train"]["num_epochs"]
    width = len(str(num_epochs))
    parts = [f"epoch {record['epoch']:>{width}}/{num_epochs}", f"loss {record.get('loss', float('nan')):.4f}"]
    val = evals.get("validation")
    if val:
        per = ", ".join(f"{m} {val[f'acc/{m}']:.4f}" for m in run.modalities if f"acc/{m}" in val)
        parts.append(f"val acc {val['acc']:.4f}" + (f" ({per})" if per else ""))
        if "gap_acc" in val:
            parts.append(f"gap {val['gap_acc']:.4f}")
    a = np.asarray(record["alpha"])
    parts.append(f"alpha {float(a):.4f}" if a.ndim == 0 else "alpha " + np.array2string(a, precision=4))
    if record.get("alpha_steps"):
        skipped = f", {record['hypergrad_skipped']} skipped" if record["hypergrad_skipped"] else ""
        if "hypergrad_residual_max" in record:  # a solve: did it reach its tolerance
            parts.append(f"alpha steps {record['alpha_converged']}/{record['alpha_steps']} converged "
                         f"({record['hypergrad_iterations']:.0f} it, residual max {record['hypergrad_residual_max']:.1e})"
                         + skipped)
        else:  # an estimate that solves nothing (the authors' H g, a series)
            parts.append(f"alpha steps {record['alpha_steps'] - record['hypergrad_skipped']}/{record['alpha_steps']} "
                         f"applied (hypergradient {record['hypergrad_hypergradient']:.3g})" + skipped)
    parts.append(f"{record['seconds']:.1f} s")
    return "  ".join(parts)


def _end_epoch(run: Run, steps: _Steps, state: TrainState, extra: dict, record: dict, folder: _Folder) -> None:
    """Evaluate on validation and test, select the best epoch on validation, checkpoint once, plot (updates ``extra``)."""
    t_epoch, step = record["epoch"], record["step"]
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
    faults.point("metrics_written")
    select, on = run.cfg["train"]["select_metric"], run.cfg["train"]["select_split"]
    if on not in evals:
        raise ConfigError(f"config.train.select_split={on!r}: {run.cfg['data_dir']} has no {on} split")
    score = evals[on][select]
    if extra["best"] is None or score > extra["best"]["score"]:
        # the epoch's checkpoint is the best one's: recorded here, kept by the checkpointer's retention
        extra["best"] = {"epoch": t_epoch, "step": step, "score": score, "metric": f"{on}/{select}",
                         "validation": evals["validation"], "test": evals.get("test")}
    extra.update(epoch=t_epoch, step_in_epoch=0, train_iter=None, partial=None,
                 outer_iter=_iter_state(steps.outer_it) if steps.outer_it is not None else None)
    folder.ckpt.save(step, state, extra, keep=_best_steps(extra))
    faults.point("checkpoint_saved")
    if jax.process_index() == 0:
        print(epoch_line(run, record, evals), flush=True)
    folder.plots.submit(extra["history"])


def train(config, workdir: str, max_steps: int | None = None) -> dict:
    """Run (or resume) a training run; returns the final summary (best-on-validation epoch and its metrics).

    The config is validated and the run built (:func:`~dyngap_jax.train.setup.setup`) before the
    workdir is touched: a mistake fails with the field named and nothing written. ``max_steps`` stops
    after that many train steps in all, with a checkpoint (data iterators included) from which a
    later call resumes exactly; the summary then has ``"stopped_at"``.
    """
    counter = CompileCounter().start()
    run = setup(config)
    with workdir_lock(workdir):  # one run at a time in a folder
        return _train(run, workdir, max_steps, counter)


def _train(run: Run, workdir: str, max_steps: int | None, counter: CompileCounter) -> dict:
    check_config(run.cfg, workdir)  # refuse another run's folder before any work
    state = run.create_train_state()
    state = jax.device_put(state, run.shardings(state)[0])
    train_step, eval_step, alpha_step = run.compile_steps(state)
    with _open_folder(run, workdir) as folder:
        extra = {"epoch": 0, "step_in_epoch": 0, "train_iter": None, "outer_iter": None, "history": [], "best": None}
        restored = folder.ckpt.restore_latest(state)
        num_epochs = run.cfg["train"]["num_epochs"]
        summary_path = os.path.join(workdir, "summary.json")
        if restored is not None and restored[1]["epoch"] >= num_epochs and os.path.exists(summary_path):
            with open(summary_path) as f:  # finished before: nothing to redo, nothing rewritten
                return json.load(f)
        if restored is not None:
            state, extra = restored
            logging.info("resumed from step %d (epoch %d)", int(state.step), extra["epoch"] + 1)
            print(f"resuming {workdir} at step {int(state.step)} (epoch {extra['epoch'] + 1})")
        step = int(state.step)
        # what a killed run logged after its last checkpoint is logged again by this one
        folder.log.rewind(step)
        outer_it, outer_fixed = None, None
        if alpha_step is not None:
            outer_split = run.cfg["alpha"]["outer"]
            if outer_split == "heldout":
                outer_fixed = parallel.shard_batch(run.heldout_batch(), run.mesh)
            else:
                outer_it = iter(run.loader(outer_split, train=True, infinite=True, batch_size=run.batch.alpha))
                _set_iter_state(outer_it, extra["outer_iter"])
        steps = _Steps(train_step, eval_step, alpha_step, outer_it, outer_fixed)
        while extra["epoch"] < num_epochs and (max_steps is None or step < max_steps):
            state, record, step = _train_epoch(run, steps, state, extra, folder, max_steps, step)
            if record is None:  # stopped at max_steps inside the epoch
                break
            _end_epoch(run, steps, state, extra, record, folder)
        folder.ckpt.wait()
        compilations = counter.summary()
        if extra["epoch"] < num_epochs:
            summary = {"stopped_at": step, "best": extra["best"], "history": extra["history"],
                       "compilations": compilations}
        else:
            summary = {"best": extra["best"], "final_alpha": state.alpha.exact().tolist(),
                       "alpha_steps": alpha_summary(extra["history"]), "compilations": compilations,
                       "history": extra["history"]}
            if jax.process_index() == 0:
                write_json(summary_path, summary)
    return summary
