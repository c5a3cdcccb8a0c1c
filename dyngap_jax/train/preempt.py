"""Preemption: a scheduler's warning signal becomes a checkpoint at a step every process agrees on, then an exit.

SLURM and cloud schedulers send SIGTERM (or, asked to, SIGUSR1 some time) before they kill a job.
Inside :func:`dyngap_jax.train.train` (from the moment its config is validated) the signal only sets a
flag; the loop finishes the train step it is in, writes a checkpoint there (at an epoch's last step:
the epoch's own, after its evaluation), closes its writers and raises :class:`Preempted`; a signal
while the run is set up and compiled stops it before its first step, its latest checkpoint standing.
The entry points exit with :data:`EXIT_STATUS` (75, ``EX_TEMPFAIL``: try again). Rerunning the
same command resumes to exactly the uninterrupted result.

With several processes (``jax.distributed``), a signal reaches them at different moments, and all
must stop at the same step (a checkpoint is written by all of them together). JAX's preemption
service catches SIGTERM in every process and agrees on a step with the others
(``multihost_utils.reached_preemption_sync_point``); SIGUSR1/2, where ``train.preempt_signal`` names
one, is handed to it as a SIGTERM.
"""
from __future__ import annotations

import os
import signal
import threading

import jax

EXIT_STATUS = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the command may be retried (and resumes)


class Preempted(RuntimeError):
    """The run stopped on a preemption signal after writing a checkpoint at ``step``; rerun it to resume."""

    def __init__(self, step: int, signal_name: str, workdir: str, saved: bool = True):
        where = (f"at step {step}: a checkpoint is saved in {workdir}; rerun the same command to resume" if saved
                 else f"before its first step: nothing to save in {workdir}; rerun the same command to start")
        super().__init__(f"preempted by {signal_name} {where}")
        self.step, self.signal_name, self.workdir = step, signal_name, workdir


class Preemption:
    """Context manager: while it is open, the configured signals ask the run to stop (``config.train.preempt_signal``:
    ``SIGTERM``, or ``SIGUSR1`` / ``SIGUSR2`` as well as SIGTERM, or ``none``).

    :meth:`requested` is asked after every train step with the run's step count; it is the same on
    every process. Signal handlers can only be set from the main thread; elsewhere (a notebook's
    worker thread) nothing is installed and the signals keep their default effect.
    """

    def __init__(self, setting: str):
        self.setting = setting
        self.signals = [] if setting == "none" else (["SIGTERM"] + ([setting] if setting != "SIGTERM" else []))
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self.distributed = jax.process_count() > 1

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def _forward(self, signum, frame) -> None:  # several processes: JAX's preemption service listens to SIGTERM
        self.received = self.received or signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():
            return self
        if self.distributed:
            extra = [s for s in self.signals if s != "SIGTERM"]
            for name in extra:
                self._install(name, self._forward)
            if not self.signals:  # JAX's service catches SIGTERM; without preemption it must kill as usual
                self._install("SIGTERM", signal.SIG_DFL)
        else:
            for name in self.signals:
                self._install(name, self._handle)
        return self

    def _install(self, name: str, handler) -> None:
        signum = getattr(signal, name)
        self._previous[signum] = signal.signal(signum, handler)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:  # None: a handler not set from Python (JAX's C++ one), which cannot be put back
                signal.signal(signum, handler)
        self._previous = {}

    def requested(self, step: int) -> bool:
        """Whether the run stops after train step ``step`` (every process gets the same answer)."""
        if not self.signals:
            return False
        if self.distributed:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        return self.received is not None


__all__ = ["EXIT_STATUS", "Preempted", "Preemption"]
