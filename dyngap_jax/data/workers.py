"""Worker processes (grain's loaders, the converters): they die with their parent, and leave preemption to it.

SLURM signals every process of a job step on preemption (SIGTERM, or the ``--signal`` one), grain's
worker processes among them; a worker killed by it would end the run with a loader error instead of
the checkpoint the training process is about to write. So a loader's worker ignores those signals,
and the kernel kills it when the training process ends (``PR_SET_PDEATHSIG``, Linux).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
_SET = False


def die_with_parent(parent: int | None = None) -> None:
    """On Linux, have the kernel kill this process when its parent dies (even by SIGKILL); exits at once if the
    parent ``parent`` (a pid) died before the call."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if parent is not None and os.getppid() != parent:
            os._exit(1)


def loader_worker_setup() -> None:
    """In a loader's worker process (a ``multiprocessing`` child; called when it unpickles the loader's first
    operation): ignore the preemption signals and die with the parent. Once a process; nothing elsewhere."""
    global _SET
    if _SET or multiprocessing.parent_process() is None or threading.current_thread() is not threading.main_thread():
        return
    _SET = True
    for name in PREEMPTION_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    die_with_parent()


__all__ = ["PREEMPTION_SIGNALS", "die_with_parent", "loader_worker_setup"]
