"""Named places where a test can kill or signal the process, to check what a crash or a preemption leaves behind.

``DYNGAP_FAULT=name`` sends SIGKILL to this process the first time the code reaches
``point("name")``; ``name@N`` the N-th time; ``name@N:SIGTERM`` (or ``:SIGUSR1``, ...) sends that
signal instead, as a scheduler's preemption warning does. Unset (always, outside tests) it costs one
environment lookup. The places are listed in :data:`POINTS`.
"""
from __future__ import annotations

import os
import signal

ENV = "DYNGAP_FAULT"
POINTS = (
    "train_step",  # a train step has been dispatched (mid-epoch; counted over this process's steps)
    "checkpoint_writing",  # orbax has started writing a checkpoint (in the background), it has not finished
    "checkpoint_finished",  # a checkpoint and its hash are written, older ones not yet deleted
    "metrics_written",  # an epoch's train and evaluation records are in metrics.jsonl, its checkpoint is not
    "checkpoint_saved",  # the epoch's checkpoint is started and (the epoch's end) waited for
)
SIGNALS = ("SIGKILL", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
_reached: dict[str, int] = {}


def parse(spec: str) -> tuple[str, int, str]:
    """``(place, n, signal name)`` of a ``DYNGAP_FAULT`` value, or a ValueError naming what is wrong."""
    place, _, rest = spec.partition("@")
    nth, _, sig = rest.partition(":")
    if place not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown place {place!r}; one of {POINTS}")
    sig = sig or "SIGKILL"
    if sig not in SIGNALS:
        raise ValueError(f"{ENV}={spec!r}: unknown signal {sig!r}; one of {SIGNALS}")
    return place, int(nth or 1), sig


def point(name: str) -> None:
    """Signal this process here if ``DYNGAP_FAULT`` names ``name`` (and this is the N-th time it is reached)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    place, nth, sig = parse(spec)
    if place != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == nth:
        os.kill(os.getpid(), getattr(signal, sig))
