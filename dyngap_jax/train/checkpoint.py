"""Orbax checkpoints of the train state plus the loop's JSON (epoch, data iterator states, history).

Every checkpoint carries a content hash: after orbax has written and renamed step ``S``, the
SHA-256 of its files goes to ``<directory>/S.sha256`` (written atomically). :meth:`Checkpointer.restore`
checks it, and :meth:`Checkpointer.restore_latest` falls back from a damaged or unreadable latest
checkpoint to the newest good one, moving the bad one to ``<directory>.damaged/`` with a warning
that names it (so that the resumed run can write that step again).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct

from dyngap_jax import faults
from dyngap_jax.io import atomic_write_text

HASH_SUFFIX = ".sha256"


@struct.dataclass
class _BeforeMethods:
    """The train state's tree before the method interface added ``method_state`` (its checkpoints restore into it)."""

    step: Any
    params: Any
    model_state: Any
    opt_state: Any
    alpha: Any
    rng: Any
    alpha_solution: Any = None


_BEFORE_METHODS = tuple(f.name for f in dataclasses.fields(_BeforeMethods))


def _legacy_target(like, message: str):
    """The tree an older checkpoint of ``like``'s run was written in, from orbax's mismatch ``message`` (None: not
    one of them): no ``method_state`` (before the method interface), and alpha kept as a pair of doubles where
    it is now one (a float64 alpha under JAX's 64-bit mode, before issue 22)."""
    if "method_state" not in message and "low" not in message:
        return None
    if "method_state" in message and getattr(like, "method_state", 0) is not None:
        return None
    alpha = like.alpha
    if "low" in message and getattr(alpha, "low", 0) is None:
        alpha = alpha.replace(low=jax.numpy.zeros_like(alpha.value))
    fields = {f: getattr(like, f) for f in _BEFORE_METHODS}
    fields["alpha"] = alpha
    return _BeforeMethods(**fields) if "method_state" in message else like.replace(alpha=alpha)


def _from_legacy(like, restored):
    """``restored`` (an older tree) in ``like``'s: a pair-of-doubles alpha summed into its one double."""
    alpha = restored.alpha
    if getattr(like.alpha, "low", 0) is None and getattr(alpha, "low", None) is not None:
        alpha = alpha.replace(value=alpha.value + alpha.low, low=None)
    rest = [f for f in _BEFORE_METHODS + ("method_state",) if f != "alpha" and hasattr(restored, f)]
    return like.replace(**{f: getattr(restored, f) for f in rest}, alpha=alpha)


class CheckpointError(RuntimeError):
    """A checkpoint whose files do not match the hash written with it, or that orbax cannot read."""


def content_hash(step_dir: str) -> str:
    """SHA-256 over the relative paths and bytes of every file below ``step_dir`` (sorted)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, step_dir).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


class Checkpointer:
    """``save(step, state, extra, keep=...)`` / ``restore_latest(like_state)``.

    Orbax writes each checkpoint to a temporary name and renames it when complete. Saves are
    asynchronous: :meth:`save` returns once the arrays are on the host (so the caller may reuse
    or donate their device buffers), orbax writes the files in the background, and a thread of
    ours writes the content hash the moment orbax has finished. The next :meth:`save`,
    :meth:`wait` and :meth:`close` wait for both. Retention is ours: after each finished save the
    newest ``max_to_keep`` checkpoints are kept, and so is every step named in ``keep`` (the run's
    best epoch), however old.
    """

    def __init__(self, directory: str, max_to_keep: int | None = 2):
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True,
                                               preservation_policy=ocp.checkpoint_managers.preservation_policy.PreserveAll())
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._keep: tuple[int, ...] = ()
        self._saved = False  # retention applies after this checkpointer's own saves, never to one opened to read

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _hash_file(self, step: int) -> str:
        return os.path.join(self.directory, f"{step}{HASH_SUFFIX}")

    def save(self, step: int, state, extra: dict, keep=()) -> None:
        """Start writing checkpoint ``step`` (returns when the arrays are copied to the host).

        A checkpoint already at ``step`` (a killed run's) is replaced. ``keep``: steps retention must
        not delete (besides the newest ``max_to_keep``).
        """
        self.wait()
        self._keep, self._saved = tuple(int(k) for k in keep), True
        if step in self.manager.all_steps():
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
                          force=True)
        faults.point("checkpoint_writing")
        self._pending = threading.Thread(target=self._finish, args=(step,), name=f"checkpoint-{step}", daemon=True)
        self._pending.start()

    def _finish(self, step: int) -> None:
        try:
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                atomic_write_text(self._hash_file(step), content_hash(self._step_dir(step)) + "\n")
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by wait()
            self._pending_error = e

    def wait(self) -> None:
        """Block until the last save is written and hashed, then apply retention; re-raise its error."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
            faults.point("checkpoint_finished")
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise CheckpointError(f"{self.directory}: writing a checkpoint failed ({type(error).__name__}: {error})") \
                from error
        self._retain()

    def _retain(self) -> None:
        if self.max_to_keep is None or not self._saved:
            return
        steps = self.all_steps()
        newest = set(steps[-self.max_to_keep:])
        for step in steps:
            if step not in newest and step not in self._keep:
                self.manager.delete(step)
        if jax.process_index() == 0:
            kept = {str(s) for s in self.manager.all_steps()}
            for name in os.listdir(self.directory):  # hashes of deleted checkpoints
                if name.endswith(HASH_SUFFIX) and name[:-len(HASH_SUFFIX)] not in kept:
                    os.remove(os.path.join(self.directory, name))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def verify(self, step: int) -> None:
        """Raise :class:`CheckpointError` naming the folder when step ``step``'s files differ from its hash.

        A checkpoint without a hash file (written before hashes were kept, or killed between orbax's
        rename and the hash's write) is not checked here; orbax's own reading still is.
        """
        path = self._hash_file(step)
        if not os.path.exists(path):
            return
        with open(path) as f:
            want = f.read().strip()
        if content_hash(self._step_dir(step)) != want:
            raise CheckpointError(f"{self._step_dir(step)}: the files differ from the hash written with them "
                                  f"({path}); the checkpoint was changed or damaged after it was saved")

    def _restore(self, step: int, like_state):
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like_state),
                                                                  extra=ocp.args.JsonRestore()))

    def restore(self, step: int, like_state):
        """``(state, extra)`` of checkpoint ``step``, restored into ``like_state``'s tree (and shardings).

        A checkpoint written before train states had ``method_state`` restores into a state whose
        ``method_state`` is None (LFM's, which keeps its state in ``alpha``)."""
        self.verify(step)
        try:
            try:
                r = self._restore(step, like_state)
                return r.state, r.extra
            except ValueError as e:
                legacy = _legacy_target(like_state, str(e))
                if legacy is None:
                    raise
            r = self._restore(step, legacy)
            return _from_legacy(like_state, r.state), r.extra
        except Exception as e:  # orbax raises many types for unreadable files; name the folder
            raise CheckpointError(f"{self._step_dir(step)}: cannot be restored ({type(e).__name__}: {e})") from e

    def restore_extra(self, step: int) -> dict:
        """Only the loop's JSON of a checkpoint (epoch, iterator states, history)."""
        self.verify(step)
        return self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra

    def restore_latest(self, like_state):
        """The newest checkpoint that verifies and restores, or None when there is none at all.

        A damaged or unreadable newer one is moved to ``<directory>.damaged/<step>`` with a warning;
        when every checkpoint is bad, :class:`CheckpointError` names them rather than starting over.
        """
        bad = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, like_state)
            except CheckpointError as e:
                bad.append((step, str(e)))
                continue
            for bad_step, message in bad:
                self._set_aside(bad_step, message)
            return restored
        if bad:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored:\n  "
                                  + "\n  ".join(m for _, m in bad))
        return None

    def _set_aside(self, step: int, message: str) -> None:
        target = os.path.join(self.directory + ".damaged", str(step))
        logging.warning("%s; resuming from an older checkpoint, the damaged one moved to %s", message, target)
        print(f"warning: {message}; moved to {target}, resuming from an older checkpoint")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(self._step_dir(step), target)
            if os.path.exists(self._hash_file(step)):
                os.replace(self._hash_file(step), target + HASH_SUFFIX)
        self.manager.reload()

    def close(self) -> None:
        """Finish the pending save (its hash and retention), then close orbax's manager."""
        try:
            self.wait()
        finally:
            self.manager.close()
