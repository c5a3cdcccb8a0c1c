"""PNG plots of a run: alpha against epoch fraction beside 1 - exp(-1/t) (the paper's Figure 3), and
per-modality validation accuracy with the gap over epochs; :class:`Plotter` draws them in the background."""
from __future__ import annotations

import os
import threading

import jax
import numpy as np
from absl import logging

from dyngap_jax.io import new_figure, save_figure


def write_all(workdir: str, history: list[dict], modalities, num_epochs: int) -> None:
    """``alpha.png`` and ``modalities.png`` in ``workdir`` from the run's per-epoch history."""
    if not history:
        return
    epochs = np.asarray([h["epoch"] for h in history], float)
    if "alpha" in history[0]:
        _alpha(workdir, history, epochs, num_epochs)
    _modalities(workdir, history, epochs, modalities)


def _alpha(workdir: str, history: list[dict], epochs: np.ndarray, num_epochs: int) -> None:
    frac = epochs / num_epochs
    alpha = np.asarray([np.atleast_1d(h["alpha"]) for h in history], float)

    fig, ax = new_figure(figsize=(5, 3.5))
    if alpha.shape[1] == 1:
        ax.plot(frac, alpha[:, 0], "o-", label="alpha (this run)")
    else:
        for p in range(alpha.shape[1]):
            ax.plot(frac, alpha[:, p], "o-", label=f"alpha, pair {p}")
    t = np.linspace(1, num_epochs, 200)
    ax.plot(t / num_epochs, 1 - np.exp(-1 / t), "--", color="gray", label=r"$\omega(t)=1-e^{-1/t}$")
    ax.set_xlabel("epoch / total epochs")
    ax.set_ylabel("alpha")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title("alpha over training (cf. Figure 3)")
    save_figure(fig, os.path.join(workdir, "alpha.png"))


def _modalities(workdir: str, history: list[dict], epochs: np.ndarray, modalities) -> None:
    fig, (a1, a2) = new_figure(1, 2, figsize=(9, 3.5))
    for m in modalities:
        key = f"validation/acc/{m}"
        if key in history[0]:
            a1.plot(epochs, [h[key] for h in history], "o-", label=m)
    if "validation/acc" in history[0]:
        a1.plot(epochs, [h["validation/acc"] for h in history], "k-", label="fused")
    a1.set_xlabel("epoch")
    a1.set_ylabel("validation accuracy")
    a1.legend()
    if "validation/gap_acc" in history[0]:
        a2.plot(epochs, [h["validation/gap_acc"] for h in history], "o-", label="accuracy gap")
    if "validation/modality_gap" in history[0]:
        a2.plot(epochs, [h["validation/modality_gap"] for h in history], "s-", label="modality-gap distance")
    a2.set_xlabel("epoch")
    a2.legend()
    save_figure(fig, os.path.join(workdir, "modalities.png"))


class Plotter:
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
                    write_all(self.args[0], history, self.args[1], self.args[2])
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
