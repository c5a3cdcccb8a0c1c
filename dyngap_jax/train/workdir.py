"""A run's folder: the recorded config (``config.json``) and the metrics log (JSONL + TensorBoard)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket

import jax
import ml_collections

from dyngap_jax.io import atomic_write_text, write_json
from dyngap_jax.train.config import ConfigError

CONFIG_FILE = "config.json"
DEFAULTS_FILE = "defaults.json"
LOCK_FILE = ".lock"
# fields that may change between a run and its resumption (display, input workers, device layout, where the
# solver loops run)
RESUMABLE_CHANGES = ("progress", "data.worker_count", "data.verify_checksums", "parallel", "train.log_every_steps",
                     "train.preempt_signal", "alpha.hypergrad.loop")


def _validated(cfg):
    """``cfg`` as a :class:`~dyngap_jax.train.config.Config` (a config dict validated here: the fields it leaves out
    take their defaults, so a run recorded before a field existed compares equal); as it stands if it cannot be."""
    from dyngap_jax.train.config import validate

    if isinstance(cfg, dict):
        try:
            return validate(cfg)[0]
        except ValueError:  # a recorded config this version cannot read: compared as it stands
            pass
    return cfg


def _plain(cfg) -> dict:
    """A Config or config dict as JSON would store it."""
    return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg, default=str))


def comparable_config(cfg, leave_out=()) -> dict:
    """``cfg`` (a Config or a config dict) as JSON would store it, without the fields a resumed run may change
    and without ``leave_out`` (dotted fields)."""
    out = _plain(_validated(cfg))
    for key in list(RESUMABLE_CHANGES) + list(leave_out):
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


def config_differences(a, b) -> list[str]:
    """The dotted fields in which two configs differ, leaving out the resumable fields and those either setup
    does not read (a concat run is the same run whatever ``alpha.hypergrad`` says, so a grid's overrides for the
    learned alpha leave the other methods' finished runs valid; where one setup reads a field the other does
    not, the fields that decide it, always read, differ and are named)."""
    from dyngap_jax.train.config import Config, unread

    a, b = _validated(a), _validated(b)
    leave_out = set()
    for cfg in (a, b):
        if isinstance(cfg, Config):
            leave_out |= set(unread(cfg))
    fa, fb = _flat(comparable_config(a, leave_out)), _flat(comparable_config(b, leave_out))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def code_defaults(cfg) -> dict:
    """What the config leaves to the code and a later version may resolve otherwise: the learned alpha's solver
    options as its method resolves them (``{"alpha.hypergrad.options": {...}}``, every option, ``None`` kept; a
    damping left unset is the method's default damping of this version). ``{}`` where the setup reads no solver."""
    from dyngap_jax.train.config import Config, unread

    cfg = _validated(cfg)
    estimator = getattr(getattr(getattr(cfg, "alpha", None), "hypergrad", None), "estimator", None)
    if not isinstance(cfg, Config) or estimator is None or "alpha.hypergrad.options" in unread(cfg):
        return {}
    options = dict(estimator.options())
    if hasattr(estimator, "damping_value"):
        options["damping"] = estimator.damping_value
    return {"alpha.hypergrad.options": json.loads(json.dumps(options, default=str))}


def _options(plain: dict) -> dict:
    options = plain.get("alpha", {}).get("hypergrad", {}).get("options")
    return options if isinstance(options, dict) else {}


def _resolved(cfg, defaults: dict, keys) -> dict:
    """``cfg`` as a config dict with its unset options among ``keys`` filled from ``defaults`` (:func:`code_defaults`)."""
    out = _plain(cfg)
    options, values = _options(out), defaults.get("alpha.hypergrad.options", {})
    for k in keys:
        if options.get(k) is None and k in values:
            options[k] = values[k]  # (a config without options: the dict _options returned is not its own)
    return out


def check_config(cfg, workdir: str) -> None:
    """Refuse a workdir that holds a run of another config (naming the differing fields).

    Where the run recorded the solver options it left to the code (``defaults.json``; runs from before it are
    compared as they stand), those options are compared as they resolved then and as the given config resolves
    them now, so a run resumed after a default changed is refused; where the recorded config itself resolves
    otherwise today, the code's default moved, and the message names the option with both values. Options the
    record does not hold (added to the code since) are compared as the configs state them."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    then_path = os.path.join(workdir, DEFAULTS_FILE)
    changed = ""
    if os.path.exists(then_path):
        with open(then_path) as f:
            then = json.load(f)
        t = then.get("alpha.hypergrad.options", {})
        keys = sorted(t)
        today = code_defaults(recorded).get("alpha.hypergrad.options", {})  # the recorded config, resolved by this code
        unset = _options(_plain(recorded))
        moved = [f"alpha.hypergrad.options.{k}: {t[k]!r} then, {today.get(k)!r} now" for k in keys
                 if unset.get(k) is None and k in today and today[k] != t[k]]
        if moved:
            changed = (f"; the code's defaults for options the run left unset have changed ({'; '.join(moved)}): "
                       "set them to the values of then to resume the run as it was")
        recorded, cfg = _resolved(recorded, then, keys), _resolved(cfg, code_defaults(cfg), keys)
    diff = config_differences(recorded, cfg)
    if diff:
        raise ConfigError(f"{workdir} holds a run of another config (differs in {', '.join(diff[:8])}){changed}; "
                         "use a new --workdir, or the same config to resume")


def record_config(cfg, workdir: str) -> None:
    """Write the run's config to ``config.json`` once (process 0), and beside it (first) the solver options it
    leaves to the code as they resolve today (``defaults.json``); :func:`check_config` first."""
    check_config(cfg, workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    if jax.process_index() == 0 and not os.path.exists(path):
        write_json(os.path.join(workdir, DEFAULTS_FILE), code_defaults(cfg))
        write_json(path, cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


class WorkdirBusy(RuntimeError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold an exclusive lock on ``workdir`` (its ``.lock`` file, ``flock``) for the block; process 0 takes it.

    A second run into the same folder (another seed started with the same ``--workdir``, the same
    command twice) fails at once with :class:`WorkdirBusy` naming the holder, instead of both
    writing checkpoints and ``metrics.jsonl``. The kernel drops the lock when its process dies, so a
    killed run never leaves the folder locked. (``flock`` on network file systems is only as good
    as their locking.)
    """
    if jax.process_index() != 0:
        yield
        return
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise WorkdirBusy(f"{workdir} is in use by another run ({holder}); wait for it to end, or use "
                          "another --workdir") from None
    try:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    except BaseException:
        if created and os.listdir(workdir) == [LOCK_FILE]:  # a start that failed leaves no folder behind
            os.remove(path)
            os.rmdir(workdir)
        raise
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


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
        self.tb_dir = os.path.join(workdir, "tensorboard")
        self.tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(self.tb_dir)

    def rewind(self, step: int) -> None:
        """Forget what was logged after ``step`` (the checkpoint a run resumes from): a killed run may
        have logged an epoch whose checkpoint it never wrote, and the resumed run logs it again.

        ``metrics.jsonl`` keeps its records with ``step <= step`` (a line cut short by the kill is
        dropped; rewritten atomically); TensorBoard is reopened with ``purge_step = step + 1``, which
        hides the older events past it.
        """
        if not self.enabled or not os.path.exists(self.path):
            return
        kept, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    keep = json.loads(line).get("step", 0) <= step
                except json.JSONDecodeError:
                    keep = False
                if keep:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        if not dropped:  # write() puts the line before the events: no line past step, no event past it
            return
        atomic_write_text(self.path, "".join(kept))
        if self.tb is not None:
            from tensorboardX import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(self.tb_dir, purge_step=step + 1)

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
