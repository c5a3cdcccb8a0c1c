"""Small splits served from memory: the whole split decoded once into arrays, batches by indexing.

Per-record pipelines cost tens of microseconds an example; for a few-MB tabular split like mfeat
that is the whole step, so :func:`dyngap_jax.data.loader.make_loader` serves such splits from here,
with the grain loader's contract (seeded shuffling, per-process shards, resumable iterators).
"""
from __future__ import annotations

import numpy as np


def even_part(n: int, index: int, count: int) -> tuple[int, int]:
    """``[start, end)`` of part ``index`` of ``n`` items cut into ``count`` contiguous parts (sizes differ by at most one)."""
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


class InMemoryLoader:
    """The whole split decoded once into arrays; batches by indexing (small tabular data sets).

    Same contract as the grain loader: a seeded permutation per epoch when training (with the
    last partial batch dropped), every example once in order for evaluation, this process's
    shard only, and iterators whose ``get_state`` / ``set_state`` resume exactly. Per-record
    pipelines cost tens of microseconds an example; for a few-MB split like mfeat that is the
    whole step, so this path skips them.
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, train: bool, seed: int,
                 num_epochs: int | None, drop_remainder: bool, shard: tuple[int, int]):
        self.arrays, self.batch_size, self.train, self.seed = arrays, batch_size, train, seed
        self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
        n = len(arrays["label"])
        index, count = shard
        if train:  # this process's rows of each global batch of a per-epoch permutation (as one process would batch)
            self.part = (index, count, n // count)
        else:
            self.part = (index, count, None)
            self.start, self.end = even_part(n, index, count)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.arrays["label"])
        if not self.train:
            return np.arange(self.start, self.end)
        index, count, _ = self.part
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        if count == 1:
            return perm
        # global batch j is perm[j G:(j + 1) G] with G = count x the local batch, process p's share of it the
        # p-th local batch: the processes together train on exactly the batches one process would
        local, whole = self.batch_size, self.batch_size * count
        return perm[:(n // whole) * whole].reshape(-1, count, local)[:, index].ravel()

    def __iter__(self):
        return _InMemoryIterator(self)


class _InMemoryIterator:
    def __init__(self, loader: InMemoryLoader):
        self.loader, self.epoch, self.position = loader, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        ld = self.loader
        while True:
            if ld.num_epochs is not None and self.epoch >= ld.num_epochs:
                raise StopIteration
            order = ld._order(self.epoch)
            take = order[self.position:self.position + ld.batch_size]
            if len(take) == ld.batch_size or (len(take) > 0 and not ld.drop_remainder):
                self.position += len(take)
                return {k: v[take] for k, v in ld.arrays.items()}
            self.epoch, self.position = self.epoch + 1, 0

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


__all__ = ["InMemoryLoader", "even_part"]
