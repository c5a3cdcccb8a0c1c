"""A multi-process run whose process dies: the others stop within a minute, naming it, instead of hanging.

A process killed outright (SIGKILL, the OOM killer, a lost machine) leaves the others in a collective
that never completes, or in a barrier. JAX's coordination service declares it dead after its own
heartbeat timeout and aborts the others with a long C++ log; the gloo and NCCL collectives fail (or
hang) with the peer's address, not its process. Here each process also counts up a key of its own
in the coordination service's key-value store every couple of seconds, from a thread of its own, and
reads the others' counts: one that has not moved for ``config.parallel.distributed.heartbeat_timeout``
seconds is lost, and this process prints one line naming it (index, host, pid) and exits with
status 1 (without waiting on the shutdown barrier the lost process will never reach). A process that
stops with an error says so in its key (:func:`failed`), and the others stop at once, naming it. A
process that exits normally (or preempted) marks its key, so the others do not mistake its end for a
loss. Rerunning every process with the same command resumes from the last checkpoint. JAX's own
heartbeat timeout (twice this) stays as the backstop, also where the coordinator's machine vanishes
and a key-value call blocks. (JAX has no public handle on its distributed client: the watchdog uses
``jax._src.distributed.global_state.client``.)
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time

PREFIX = "dyngap_jax/alive"
EXITED = "exited"
FAILED = "failed"
LOST_STATUS = 1
_WATCHDOG: "Watchdog | None" = None


class Watchdog:
    """Counts this process's key up every ``period`` seconds and watches the others' (see the module docstring)."""

    def __init__(self, client, process_id: int, num_processes: int, timeout: float, period: float | None = None):
        self.client, self.pid, self.n, self.timeout = client, process_id, num_processes, float(timeout)
        self.period = period or max(0.5, min(2.0, self.timeout / 10))
        self.count = 0
        self.who = f"{socket.gethostname()} pid {os.getpid()}"
        self.seen: dict[int, tuple[str, float]] = {}  # process -> (its last value, when it last changed)
        self.failing_since: float | None = None
        self.lost: str | None = None
        self._lock = threading.Lock()  # a beat never overwrites the final mark
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> "Watchdog":
        self._beat()
        self._thread.start()
        atexit.register(self.exited)
        return self

    def _set(self, value: str) -> None:
        self.client.key_value_set(f"{PREFIX}/{self.pid}", value, allow_overwrite=True)

    def _beat(self) -> None:
        with self._lock:
            if not self._stop.is_set():
                self.count += 1
                self._set(f"{self.count} {self.who}")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            now = time.monotonic()
            try:
                self._beat()
                values = dict(self.client.key_value_dir_get(PREFIX))
                self.failing_since = None
            except Exception as e:  # noqa: BLE001 - the coordinator (process 0) is unreachable
                self.failing_since = self.failing_since or now
                if now - self.failing_since > self.timeout:
                    self._give_up(f"process 0 of {self.n} (the coordinator) cannot be reached for "
                                  f"{now - self.failing_since:.0f} s ({type(e).__name__}: {str(e)[:200]})")
                continue
            for key, value in values.items():
                p = int(key.rsplit("/", 1)[-1])
                if p == self.pid or value == EXITED:
                    self.seen.pop(p, None)
                elif value.startswith(FAILED):
                    self._give_up(f"process {p} of {self.n} stopped with an error ({value[len(FAILED) + 1:]})")
                elif p not in self.seen or self.seen[p][0] != value:
                    self.seen[p] = (value, now)
                elif now - self.seen[p][1] > self.timeout:
                    who = value.split(" ", 1)[1] if " " in value else "?"
                    self._give_up(f"process {p} of {self.n} ({who}) stopped responding {now - self.seen[p][1]:.0f} s "
                                  "ago (killed, or its machine lost)")

    def _give_up(self, what: str) -> None:
        if self._stop.is_set():  # this process is ending on its own: let it
            return
        self.lost = what
        sys.stdout.flush()
        sys.stderr.write(f"error: {what}; process {self.pid} stops too. Rerun every process with the same command "
                         "to resume from the last checkpoint.\n")
        sys.stderr.flush()
        os._exit(LOST_STATUS)  # the shutdown barrier would wait for the lost process: leave without it

    def _finish(self, value: str) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            try:
                self._set(value)
            except Exception:  # noqa: BLE001 - the coordinator is gone already
                pass

    def exited(self) -> None:
        """Mark this process as ended normally (its count stops without it being lost)."""
        self._finish(EXITED)

    def failed(self, reason: str) -> None:
        """Mark this process as stopping with an error: the others stop too, naming it."""
        self._finish(f"{FAILED} {self.who}: {reason[:300]}")


def start(timeout: float) -> Watchdog | None:
    """Start this process's watchdog once ``jax.distributed`` is initialised (several processes only)."""
    global _WATCHDOG
    import jax
    from jax._src import distributed

    if _WATCHDOG is not None or jax.process_count() < 2 or distributed.global_state.client is None:
        return _WATCHDOG
    _WATCHDOG = Watchdog(distributed.global_state.client, jax.process_index(), jax.process_count(), timeout).start()
    return _WATCHDOG


def after_error(error: BaseException, *, lost_possible: bool = True) -> None:
    """A process of a multi-process run is about to stop with ``error``. If a collective may have failed on a
    lost process (``lost_possible``), give the watchdog its timeout to name it (it ends this process with that
    message); then tell the others this process stops."""
    w = _WATCHDOG
    if w is None:
        return
    if lost_possible:
        deadline = time.monotonic() + w.timeout + 3 * w.period
        while time.monotonic() < deadline and w.lost is None:
            time.sleep(0.2)
    w.failed(f"{type(error).__name__}: {error}")


__all__ = ["Watchdog", "after_error", "start"]
