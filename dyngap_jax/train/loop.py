"""Algorithm 1 end to end: ``train(config, workdir)`` runs (or resumes) a run.

Per epoch (:func:`_train_epoch`): ``steps_per_epoch`` train steps (the training method's step,
:meth:`dyngap_jax.methods.Method.step`), with the method's parts called around them (LFM: alpha set
before each epoch, or its alpha step after every ``alpha.inner_iters`` train steps). Then
(:func:`_end_epoch`) every metric on validation and test, the best epoch chosen on
``train.select_split`` (validation unless the authors' protocol is asked for), the epoch's one
checkpoint (the best epoch is recorded in it and kept) and plots. The loop knows nothing of any
method: it calls the parts' hooks (:class:`dyngap_jax.methods.Part`) and saves their JSON state with
its own (:class:`~dyngap_jax.train.loop_state.LoopState`). Everything the run is made of comes from
:func:`dyngap_jax.train.setup.setup`, before anything is written.

The host never waits for a step: the step metrics (and the parts' device results) stay on the device
and are fetched every ``config.train.log_every_steps`` steps, before a checkpoint and at the epoch's
end; that is also when a non-finite step is found and the run stopped (no checkpoint is written
after one). The train step donates the state's buffers and compiles once. A preemption signal
(:mod:`dyngap_jax.train.preempt`) stops the run after its current step with a checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
from absl import logging
from tqdm import tqdm

from dyngap_jax import faults, parallel
from dyngap_jax.compilation import CompileCounter
from dyngap_jax.data.records import RecordError
from dyngap_jax.io import write_json
from dyngap_jax.methods import Part, StepInfo, TrainState
from dyngap_jax.parallel import liveness
from dyngap_jax.train.checkpoint import CheckpointError, Checkpointer
from dyngap_jax.train.config import ConfigError, validate
from dyngap_jax.train.evaluation import evaluate
from dyngap_jax.train.loop_state import LoopState
from dyngap_jax.train.plots import Plotter
from dyngap_jax.train.preempt import Preempted, Preemption
from dyngap_jax.train.setup import Run, setup
from dyngap_jax.train.workdir import MetricsLogger, WorkdirBusy, check_config, record_config, workdir_lock


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class _Folder:
    """The run folder's writers: checkpoints, the metrics log, the plots."""

    workdir: str
    ckpt: Checkpointer
    log: MetricsLogger
    plots: Plotter


@contextlib.contextmanager
def _open_folder(run: Run, workdir: str):
    """Record the config (refusing another run's folder), open the writers; close them all on exit."""
    record_config(run.cfg, workdir)
    with contextlib.ExitStack() as stack:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=run.cfg.train.keep_checkpoints)
        stack.callback(ckpt.close)
        log = MetricsLogger(workdir)
        stack.callback(log.close)
        plotter = Plotter(workdir, run.modalities, run.cfg.train.num_epochs)
        stack.callback(plotter.close)
        yield _Folder(workdir, ckpt, log, plotter)


def _iter_state(it):
    s = it.get_state()
    return s.decode() if isinstance(s, bytes) else s


@dataclasses.dataclass
class _Loop:
    """What one ``train`` call runs with: the run, its compiled steps, the method's parts, the folder,
    where to stop (``max_steps``) and the preemption signals."""

    run: Run
    train_step: Any
    eval_step: Any
    parts: list[Part]
    folder: _Folder
    max_steps: int | None
    preempt: Preemption
    stop: str | None = None  # "max_steps" or "preempted": the loop ends after this step (or this epoch)
    shape_checked: bool = False  # the first step kept the state's tree (a method's state has its shape from init)


@dataclasses.dataclass
class _Epoch:
    """One epoch's accounting on the host: the running sums (checkpointed for a resumed epoch) and the
    step metrics not fetched from the device yet."""

    t_epoch: int
    sums: dict
    count: int
    step: int  # train steps done in all (the host's count, so that nothing waits for state.step)
    pending: list = dataclasses.field(default_factory=list)  # (step, batch number, metrics on device)
    last: dict | None = None  # the newest fetched step metrics


def _fetch(lp: _Loop, ep: _Epoch) -> None:
    """Bring the pending step metrics to the host (and the parts' results): add them to the epoch's sums, and
    stop the run at the first non-finite step."""
    if ep.pending:
        metrics = jax.device_get([m for *_, m in ep.pending])
        for (step, batch_no, _), m in zip(ep.pending, metrics):
            if not (m["finite"] and m["params_finite"]):
                last = lp.folder.ckpt.latest_step()
                what = "loss or gradients" if not m["finite"] else "parameters after the update"
                where = f"non-finite {what} at step {step} (epoch {ep.t_epoch}, batch {batch_no}); "
                raise TrainingDiverged(where + (f"the last good checkpoint is step {last} in {lp.folder.ckpt.directory}"
                                                if last is not None else "no checkpoint yet"))
            for k in lp.run.method.logged:
                ep.sums[k] = ep.sums.get(k, 0.0) + float(m[k])
            ep.count += 1
            ep.last = m
        ep.pending = []
    for part in lp.parts:
        part.fetch()


def _save(lp: _Loop, step: int, state: TrainState, loop: LoopState) -> None:
    loop.step, loop.parts = step, {p.name: p.to_json() for p in lp.parts}
    lp.folder.ckpt.save(step, state, loop.to_json(), keep=(loop.best_step,) if loop.best_step is not None else ())


def _progress_bar(run: Run, t_epoch: int, start: int):
    """A progress bar on a terminal only (a log file gets the per-epoch lines instead)."""
    on = run.cfg.progress and jax.process_index() == 0 and sys.stderr.isatty()
    return tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {t_epoch}/{run.cfg.train.num_epochs}",
                unit="step", dynamic_ncols=True, leave=False, disable=not on)


def _train_epoch(lp: _Loop, state: TrainState, loop: LoopState, step: int):
    """Train steps (and the parts' work) to the end of the epoch ``loop.epoch``, or to a stop.

    Returns ``(state, record or None, step)``: the epoch's training record, or None when the run
    stopped inside the epoch (``max_steps`` or a preemption; after a checkpoint to resume from).
    """
    run, epoch = lp.run, loop.epoch
    for part in lp.parts:
        state = part.epoch_start(state, epoch)
    train_it = iter(run.loader("train", train=True, epoch=epoch))
    start = loop.step_in_epoch
    if start and loop.train_iter is not None:
        train_it.set_state(loop.train_iter.encode() if isinstance(loop.train_iter, str) else loop.train_iter)
    # a resumed epoch continues the epoch's running sums from the checkpoint
    ep = _Epoch(epoch + 1, dict(loop.sums or {}) if start else {}, loop.count if start else 0, step)
    every, log_every = run.cfg.train.checkpoint_every_steps, run.cfg.train.log_every_steps
    t0, count0 = time.time(), ep.count
    with _progress_bar(run, ep.t_epoch, start) as bar:
        for i in range(start, run.steps_per_epoch):
            local = next(train_it)
            info = StepInfo(step=ep.step, index=i, epoch=epoch, batch=parallel.shard_batch(local, run.mesh), local=local,
                            last=i + 1 == run.steps_per_epoch)
            for part in lp.parts:
                state = part.before_step(state, info)
            before = None if lp.shape_checked else jax.tree_util.tree_structure(state)
            state, m = lp.train_step(state, info.batch)
            if before is not None and jax.tree_util.tree_structure(state) != before:
                raise ValueError(f"config.balance.method={run.cfg.balance.method!r}: its step changed the train "
                                 "state's structure; a method's state must have its shape from the start "
                                 "(Method.init_state)")
            lp.shape_checked = True
            ep.step += 1
            ep.pending.append((ep.step, i + 1, m))
            faults.point("train_step")
            info = dataclasses.replace(info, step=ep.step)
            for part in lp.parts:
                state = part.after_step(state, info)
            bar.update(1)
            if lp.max_steps is not None and ep.step >= lp.max_steps:
                lp.stop = "max_steps"
            if lp.preempt.requested(ep.step):  # asked after every step: every process stops at the same one
                lp.stop = "preempted"
            checkpoint = (lp.stop or (every and ep.step % every == 0)) and not info.last
            if checkpoint or len(ep.pending) >= log_every:
                _fetch(lp, ep)  # and a non-finite step stops the run before anything is saved
                bar.set_postfix(loss=f"{ep.last['loss']:.4f}", rate=f"{(ep.count - count0) / max(time.time() - t0, 1e-9):.1f}/s")
            if checkpoint:
                loop.step_in_epoch, loop.train_iter = i + 1, _iter_state(train_it)
                loop.sums, loop.count = ep.sums, ep.count
                _save(lp, ep.step, state, loop)
                if lp.stop:
                    return state, None, ep.step
    _fetch(lp, ep)
    elapsed = max(time.time() - t0, 1e-9)
    record = {"epoch": ep.t_epoch, "split": "train", "step": ep.step,
              **{k: v / max(ep.count, 1) for k, v in ep.sums.items()},
              "steps_per_s": (ep.count - count0) / elapsed, "seconds": elapsed}
    for part in lp.parts:
        record.update(part.epoch_record(state))
    return state, record, ep.step


def epoch_line(lp: _Loop, record: dict, evals: dict) -> str:
    """The epoch's one line: train loss, validation accuracy fused and per modality, the gap, the parts' words
    (LFM: alpha and its alpha steps' convergence)."""
    run, num_epochs = lp.run, lp.run.cfg.train.num_epochs
    width = len(str(num_epochs))
    parts = [f"epoch {record['epoch']:>{width}}/{num_epochs}", f"loss {record.get('loss', float('nan')):.4f}"]
    val = evals.get("validation")
    if val:
        per = ", ".join(f"{m} {val[f'acc/{m}']:.4f}" for m in run.modalities if f"acc/{m}" in val)
        parts.append(f"val acc {val['acc']:.4f}" + (f" ({per})" if per else ""))
        if "gap_acc" in val:
            parts.append(f"gap {val['gap_acc']:.4f}")
    parts += [w for w in [run.method.line(record)] + [p.line(record) for p in lp.parts] if w]
    parts.append(f"{record['seconds']:.1f} s")
    return "  ".join(parts)


def _end_epoch(lp: _Loop, state: TrainState, loop: LoopState, record: dict) -> None:
    """Evaluate on validation and test, select the best epoch, checkpoint once, plot (updates ``loop``)."""
    run, folder = lp.run, lp.folder
    t_epoch, step = record["epoch"], record["step"]
    folder.log.write(record, step)
    evals = {}
    for split in ("validation", "test"):
        if split in run.manifest.splits:
            evals[split] = evaluate(state, lp.eval_step, run, split)
            folder.log.write({"epoch": t_epoch, "split": split, "step": step, **evals[split]}, step)
    for part in lp.parts:
        part.evaluated(evals)
    kept = [k for p in lp.parts for k in p.history_keys if k in record]
    loop.history.append({"epoch": t_epoch, "train_loss": record.get("loss"), **{k: record[k] for k in kept},
                         **{f"{s}/{k}": v for s, e in evals.items() for k, v in e.items()}})
    faults.point("metrics_written")
    select, on = run.cfg.train.select_metric, run.cfg.train.select_split
    score = evals[on][select]
    if loop.best is None or score > loop.best["score"]:
        # the epoch's checkpoint is the best one's: recorded here, kept by the checkpointer's retention
        loop.best = {"epoch": t_epoch, "step": step, "score": score, "metric": f"{on}/{select}",
                     "validation": evals["validation"], "test": evals.get("test")}
    loop.epoch, loop.step_in_epoch, loop.train_iter, loop.sums, loop.count = t_epoch, 0, None, None, 0
    _save(lp, step, state, loop)
    faults.point("checkpoint_saved")
    if jax.process_index() == 0:
        print(epoch_line(lp, record, evals), flush=True)
    folder.plots.submit(loop.history)


def train(config, workdir: str, max_steps: int | None = None) -> dict:
    """Run (or resume) a training run; returns the final summary (the best epoch and its metrics).

    The config is validated and the run built (:func:`~dyngap_jax.train.setup.setup`) before the
    workdir is touched: a mistake fails with the field named and nothing written. ``max_steps`` stops
    after that many train steps in all, with a checkpoint (data iterators included) from which a
    later call resumes exactly; the summary then has ``"stopped_at"``. A preemption signal
    (``config.train.preempt_signal``) stops it the same way and raises
    :class:`~dyngap_jax.train.preempt.Preempted` once every writer is closed. With several processes,
    one that is lost (killed outright) makes the others stop within ``parallel.distributed.heartbeat_timeout``
    seconds, naming it (:mod:`dyngap_jax.parallel.liveness`).
    """
    counter = CompileCounter().start()
    cfg, _ = validate(config)  # the preemption setting first: a signal while the run is set up and compiled counts too
    with Preemption(cfg.train.preempt_signal) as preempt:
        return _guarded(config, workdir, max_steps, counter, preempt)


def _guarded(config, workdir: str, max_steps: int | None, counter: CompileCounter, preempt: Preemption) -> dict:
    run = setup(config)
    try:
        with workdir_lock(workdir):  # one run at a time in a folder
            return _train(run, workdir, max_steps, counter, preempt)
    except Exception as e:
        if jax.process_count() > 1 and not isinstance(e, Preempted):
            # a failed collective may mean a lost process (the watchdog then names it and ends this one); the
            # run's own errors (divergence, a damaged checkpoint, a refused config) end every process alike
            own = (TrainingDiverged, CheckpointError, ConfigError, RecordError, WorkdirBusy)
            liveness.after_error(e, lost_possible=not isinstance(e, own))
        raise


def _train(run: Run, workdir: str, max_steps: int | None, counter: CompileCounter, preempt: Preemption) -> dict:
    check_config(run.cfg, workdir)  # refuse another run's folder before any work
    state = run.create_train_state()
    state = jax.device_put(state, run.shardings(state)[0])
    train_step, eval_step = run.train_step(state), run.eval_step(state)
    num_epochs = run.cfg.train.num_epochs
    with _open_folder(run, workdir) as folder:
        loop = LoopState()
        restored = folder.ckpt.restore_latest(state)
        summary_path = os.path.join(workdir, "summary.json")
        if restored is not None:
            loop = LoopState.from_json(restored[1])
            if loop.epoch >= num_epochs and os.path.exists(summary_path):
                with open(summary_path) as f:  # finished before: nothing to redo, nothing rewritten
                    return json.load(f)
            state = restored[0]
            step = int(state.step) if loop.step is None else loop.step
            logging.info("resumed from step %d (epoch %d)", step, loop.epoch + 1)
            print(f"resuming {workdir} at step {step} (epoch {loop.epoch + 1})")
        step = 0 if restored is None else step
        folder.log.rewind(step)  # what a killed run logged after its last checkpoint is logged again by this one
        lp = _Loop(run, train_step, eval_step, run.method.parts(), folder, max_steps, preempt)
        if max_steps is not None and step >= max_steps:  # asked again for a stop already reached: train nothing
            lp.stop = "max_steps"
        elif preempt.requested(step):  # signalled while the run was set up: its latest checkpoint stands
            lp.stop = "preempted"
        for part in lp.parts:
            part.open(run, state, loop.parts.get(part.name))
        while loop.epoch < num_epochs and not lp.stop:
            state, record, step = _train_epoch(lp, state, loop, step)
            if record is None:  # stopped inside the epoch
                break
            _end_epoch(lp, state, loop, record)
        folder.ckpt.wait()
        compilations = counter.summary()
        summary = {"best": loop.best, "compilations": compilations, "history": loop.history}
        if loop.epoch < num_epochs:
            summary["stopped_at"] = step
        else:
            for part in lp.parts:
                summary.update(part.summary(state, loop.history))
            if jax.process_index() == 0:
                write_json(summary_path, summary)
    if lp.stop == "preempted" and loop.epoch < num_epochs:
        raise Preempted(step, preempt.received or "SIGTERM", workdir, saved=restored is not None or step > 0)
    return summary
