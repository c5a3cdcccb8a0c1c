"""Named places where a test can kill the process, to check what a crash leaves behind.

``DYNGAP_FAULT=name`` sends SIGKILL to this process the first time the code reaches
``point("name")``; ``name@N`` the N-th time. Unset (always, outside tests) it costs one
environment lookup. The places are listed in :data:`POINTS`.
"""
from __future__ import annotations

import os
import signal

ENV = "DYNGAP_FAULT"
POINTS = (
    "checkpoint_writing",  # orbax has started writing a checkpoint (in the background), it has not finished
    "checkpoint_finished",  # a checkpoint and its hash are written, older ones not yet deleted
    "metrics_written",  # an epoch's train and evaluation records are in metrics.jsonl, its checkpoint is not
    "checkpoint_saved",  # the epoch's checkpoint is started and (the epoch's end) waited for
)
_reached: dict[str, int] = {}


def point(name: str) -> None:
    """Kill this process here if ``DYNGAP_FAULT`` names ``name`` (and this is the N-th time it is reached)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, nth = spec.partition("@")
    if want not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown place {want!r}; one of {POINTS}")
    if want != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
