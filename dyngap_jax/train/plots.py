"""PNG plots of a run: alpha against epoch fraction beside 1 - exp(-1/t) (the paper's Figure 3), and
per-modality validation accuracy with the gap over epochs."""
from __future__ import annotations

import os

import numpy as np

from dyngap_jax.io import new_figure, save_figure


def write_all(workdir: str, history: list[dict], modalities, num_epochs: int) -> None:
    """``alpha.png`` and ``modalities.png`` in ``workdir`` from the run's per-epoch history."""
    if not history:
        return
    epochs = np.asarray([h["epoch"] for h in history], float)
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
