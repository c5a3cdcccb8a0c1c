"""Where a run is, on the host: what every checkpoint saves beside the train state, as JSON.

:class:`LoopState` is shared by the training loop (which changes it) and evaluation (which reads a
run's best epoch and its epoch checkpoints back from it).
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class LoopState:
    """The loop's progress and results.

    ``step``: train steps (batches) done in all, the loop's count that names checkpoints and metrics
    records (a method may take several optimiser steps a batch: ``state.step`` counts those; None in
    checkpoints written before the count was kept, where the two were equal).
    ``epoch``: epochs finished (the next epoch's index, from 0). ``step_in_epoch``: train steps of
    the current epoch done (0 at an epoch's boundary); mid-epoch, ``train_iter`` is the training
    loader's iterator state and ``sums`` / ``count`` the epoch's running sums of the logged step
    metrics. ``history``: one entry per finished epoch (its training record's and evaluations'
    numbers). ``best``: the best epoch so far (``epoch``, ``step``, ``score``, ``metric``,
    ``validation`` and ``test`` metrics). ``parts``: each method part's own state
    (:meth:`dyngap_jax.methods.Part.to_json`), by name.
    """

    step: int | None = None
    epoch: int = 0
    step_in_epoch: int = 0
    train_iter: Any = None
    sums: dict | None = None
    count: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict | None = None
    parts: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def best_step(self) -> int | None:
        return None if not self.best else self.best.get("step")

    def to_json(self) -> dict:
        partial = {"sums": self.sums, "count": self.count} if self.step_in_epoch else None
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "train_iter": self.train_iter,
                "partial": partial, "history": self.history, "best": self.best, "parts": self.parts}

    @classmethod
    def from_json(cls, d: dict) -> "LoopState":
        """The state a checkpoint saved, including those written before the method interface (which kept
        the alpha step's outer-iterator state at the top level and its epoch log in ``partial``)."""
        partial = d.get("partial") or {}
        parts = dict(d.get("parts") or {})
        if "parts" not in d:  # the layout before the method interface: the alpha step's state at the top level
            parts["alpha"] = {"outer_iter": d.get("outer_iter"), "log": list(partial.get("hyper_log") or []),
                              "evaluated": int(d.get("epoch", 0)) > 0}
        return cls(step=None if d.get("step") is None else int(d["step"]), epoch=int(d.get("epoch", 0)), step_in_epoch=int(d.get("step_in_epoch") or 0),
                   train_iter=d.get("train_iter"), sums=dict(partial["sums"]) if partial.get("sums") is not None
                   else None, count=int(partial.get("count") or 0), history=list(d.get("history") or []),
                   best=d.get("best"), parts=parts)


__all__ = ["LoopState"]
