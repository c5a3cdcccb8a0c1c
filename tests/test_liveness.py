"""The liveness watchdog's rules on a stand-in for the coordination service's key-value store (the real one runs in
tests/test_parallel.py): a peer whose count stops is named after the timeout, one that failed at once, one that
exited never; a final mark is never overwritten by a beat."""
import threading
import time

import pytest

from dyngap_jax.parallel import liveness

# the stand-in for os._exit ends the watchdog's thread with SystemExit, which pytest would report
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class Store:
    """The key-value calls the watchdog makes, over a dict."""

    def __init__(self):
        self.data, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            self.data[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.data.items() if k.startswith(prefix + "/")]


@pytest.fixture
def exits(monkeypatch):
    """os._exit replaced: the watchdog's verdicts are recorded (and its thread ends) instead of ending pytest."""
    verdicts = []

    def fake_exit(status):
        verdicts.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(liveness.os, "_exit", fake_exit)
    return verdicts


def wait_for(cond, limit=5.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not cond():
        time.sleep(0.05)
    return cond()


def test_a_peer_that_stops_counting_is_named_after_the_timeout(exits, capsys):
    store = Store()
    store.key_value_set(f"{liveness.PREFIX}/1", "7 hostB pid 42")  # process 1 beat once, then nothing
    w = liveness.Watchdog(store, 0, 2, timeout=0.6, period=0.1)
    w.start()
    assert wait_for(lambda: exits == [liveness.LOST_STATUS])
    assert "process 1 of 2 (hostB pid 42) stopped responding" in w.lost
    assert "error: process 1 of 2 (hostB pid 42) stopped responding" in capsys.readouterr().err


def test_a_peer_that_failed_is_named_at_once_and_one_that_exited_never(exits):
    store = Store()
    store.key_value_set(f"{liveness.PREFIX}/1", liveness.EXITED)
    w = liveness.Watchdog(store, 0, 3, timeout=0.5, period=0.1)
    w.start()
    time.sleep(0.8)  # an exited peer: no verdict past the timeout
    assert exits == [] and w.lost is None
    store.key_value_set(f"{liveness.PREFIX}/2", "failed hostC pid 9: TrainingDiverged: non-finite loss")
    assert wait_for(lambda: exits == [liveness.LOST_STATUS], limit=0.4)  # well before the timeout
    assert w.lost == "process 2 of 3 stopped with an error (hostC pid 9: TrainingDiverged: non-finite loss)"


def test_this_processs_final_mark_is_never_overwritten_and_ends_its_verdicts(exits):
    store = Store()
    w = liveness.Watchdog(store, 0, 2, timeout=0.3, period=0.05)
    w.start()
    w.failed("ValueError: boom")
    mark = store.data[f"{liveness.PREFIX}/0"]
    assert mark.startswith("failed ") and mark.endswith(": ValueError: boom")
    store.key_value_set(f"{liveness.PREFIX}/1", "3 hostB pid 1")  # a silent peer: this process is ending anyway
    time.sleep(0.6)
    assert store.data[f"{liveness.PREFIX}/0"] == mark and exits == []
    w.exited()  # a second final mark changes nothing
    assert store.data[f"{liveness.PREFIX}/0"] == mark
