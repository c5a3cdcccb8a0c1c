"""grain loaders over the converters' ArrayRecord files, giving DESIGN.md's batch dicts.

A batch is a dict of numpy arrays: one per modality plus ``"label"`` (int32). Shuffling is
seeded, each JAX process reads its own shard (``ShardByJaxProcess``), and the iterator's state can
be saved and restored (``iterator.get_state()`` / ``set_state``), so a resumed run sees the same
batches. Before reading, the manifest is checked against what the caller expects.

Frames leave the loader as they are stored (uint8): for training each example also carries its
random resized crop box and flip (:class:`TrainFrames`, drawn as torchvision draws them, the same
box for every frame of a clip), and the steps crop, resize, flip and normalise on the device
(:func:`dyngap_jax.data.augment.prepare`); evaluation's deterministic resize runs there too. The
host does no per-pixel work, so one process feeds a GPU's step (``python -m scripts.bench_data``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from dyngap_jax.data.augment import BOX, FLIP, FrameAugment, sample_crop
from dyngap_jax.data.memory import InMemoryLoader, even_part
from dyngap_jax.data.workers import loader_worker_setup
from dyngap_jax.data.records import Manifest, RecordError, decode_example, load_manifest, verify_shards

IN_MEMORY_MAX_BYTES = 256 << 20

def _mark_flags_parsed() -> None:
    # grain's worker processes read absl flags; library use (no app.run) must mark them parsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _split_bytes(manifest: Manifest, split: str) -> int:
    per = sum(int(np.prod(f.shape, dtype=np.int64)) * np.dtype(f.dtype).itemsize for f in manifest.features.values())
    return per * manifest.splits[split]["num_examples"]


def ops_apply(ops, record):
    for op in ops:
        record = op.map(record)
    return record


def check_manifest(manifest: Manifest, *, folder: str, name: str | None = None,
                   modalities: Mapping[str, Sequence[int] | None] | None = None,
                   num_classes: int | None = None, split: str | None = None) -> None:
    """Refuse records that do not match the config, naming the mismatch.

    ``modalities``: ``{modality: expected per-example shape or None}``; every one must be in the
    records (records may hold more modalities than a config uses).
    """
    where = os.path.join(folder, "manifest.json")
    if name is not None and manifest.name != name:
        raise RecordError(f"{where}: records are of data set {manifest.name!r}, the config says {name!r}")
    if num_classes is not None and manifest.num_classes != num_classes:
        raise RecordError(f"{where}: {manifest.num_classes} classes in the records, the config says num_classes={num_classes}")
    if split is not None and split not in manifest.splits:
        raise RecordError(f"{where}: no split {split!r} (have {sorted(manifest.splits)})")
    for m, shape in (modalities or {}).items():
        if m not in manifest.features or m == "label":
            raise RecordError(f"{where}: no modality {m!r} in the records (have {manifest.modalities})")
        if shape is not None and list(shape) != list(manifest.features[m].shape):
            raise RecordError(
                f"{where}: modality {m!r} has shape {manifest.features[m].shape} in the records, "
                f"the config expects {list(shape)}"
            )


class Decode(grain.transforms.Map):
    """A record's bytes -> its example dict (the ``keep`` features and the label); the first operation of every
    loader, so a worker process sets itself up when it unpickles it (:func:`~dyngap_jax.data.workers.loader_worker_setup`)."""

    def __init__(self, keep: Sequence[str] | None = None):
        self.keep = None if keep is None else tuple(keep) + ("label",)

    def __setstate__(self, state):
        self.__dict__.update(state)
        loader_worker_setup()

    def map(self, data: bytes):
        ex = decode_example(data)
        return ex if self.keep is None else {k: ex[k] for k in self.keep}


class SelectFrames(grain.transforms.Map):
    """Keep some of a clip's stored frames (``FrameAugment.select``: indices into the clip's time axis)."""

    def __init__(self, specs: Mapping[str, FrameAugment]):
        self.select = {m: tuple(sp.select) for m, sp in specs.items() if sp.select is not None}

    def map(self, ex):
        ex = dict(ex)
        for m, idx in self.select.items():
            clip = ex[m]
            if clip.ndim != 4 or max(idx) >= clip.shape[0]:
                raise RecordError(f"config.data.frames.{m}.select={list(idx)}: the records store {m} as "
                                  f"{list(clip.shape)} (clips [T, H, W, C] with frames 0..{clip.shape[0] - 1})"
                                  if clip.ndim == 4 else f"config.data.frames.{m}.select: {m} is not a clip of frames")
            ex[m] = clip[list(idx)]
        return ex


class Standardize(grain.transforms.Map):
    """``(x - mean) / std`` per feature with the train statistics the converter recorded."""

    def __init__(self, stats: Mapping[str, Mapping[str, Sequence[float]]]):
        self.stats = {m: (np.asarray(s["mean"], np.float32), np.maximum(np.asarray(s["std"], np.float32), 1e-6))
                      for m, s in stats.items()}

    def map(self, ex):
        ex = dict(ex)
        for m, (mean, std) in self.stats.items():
            if m in ex:
                ex[m] = (ex[m] - mean) / std
        return ex


def host_crop_resize(frames: np.ndarray, box: tuple[int, int, int, int] | None, size, flip: bool) -> np.ndarray:
    """The host path, example by example with PIL (what the loader did before augmentation moved to the
    device; kept as the reference :mod:`dyngap_jax.data.augment` is tested against): crop
    ``box = (top, left, h, w)`` from each frame ``[T, H, W, C]``, resize each channel to ``size`` with
    PIL's bilinear filter (uint8 frames stay uint8), maybe flip."""
    out = []
    for f in frames:
        if box is not None:
            t, l, h, w = box
            f = f[t:t + h, l:l + w]
        if size is not None and f.shape[:2] != tuple(size):
            chans = [np.asarray(Image.fromarray(f[..., c]).resize((size[1], size[0]), Image.BILINEAR)) for c in range(f.shape[-1])]
            f = np.stack(chans, axis=-1)
        out.append(f[:, ::-1] if flip else f)
    return np.stack(out)


class TrainFrames(grain.transforms.RandomMap):
    """Draws each example's random resized crop (one box for all frames of a clip) and flip.

    The frames stay as stored; ``<modality>_box`` (int32 ``[4]``: top, left, height, width) and
    ``<modality>_flip`` (bool) are added, and the training step crops, resizes, flips and
    normalises on the device (:func:`dyngap_jax.data.augment.prepare`).
    """

    def __init__(self, specs: Mapping[str, FrameAugment]):
        self.specs = dict(specs)

    def random_map(self, ex, rng: np.random.Generator):
        ex = dict(ex)
        for m, spec in self.specs.items():
            h, w = ex[m].shape[-3:-1]
            box = sample_crop(rng, h, w, spec.scale, spec.ratio) if spec.random_resized_crop else (0, 0, h, w)
            ex[m + BOX] = np.asarray(box, np.int32)
            ex[m + FLIP] = np.asarray(bool(spec.flip and rng.random() < 0.5))
        return ex


class _SliceSource:
    """Records ``[start, end)`` of a random-access source."""

    def __init__(self, source, start: int, end: int):
        self.source, self.start, self.end = source, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.source[self.start + i]

    def __repr__(self) -> str:
        return f"_SliceSource({self.source!r}, {self.start}, {self.end})"


class _SubsetSource:
    """The records at ``indices`` of a random-access source (a low-data split)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]

    def __repr__(self) -> str:
        return f"_SubsetSource({self.source!r}, {len(self.indices)} records)"


def heldout_indices(num_examples: int, count: int, seed: int) -> np.ndarray:
    """``count`` record indices drawn once by a seeded permutation (in the order drawn): the training
    examples the authors' alpha step holds out of training (``config.alpha.heldout``)."""
    if not 0 <= count < num_examples:
        raise ValueError(f"cannot hold out {count} of {num_examples} training examples")
    return np.random.default_rng([seed, 104729]).permutation(num_examples)[:count]


def kept_indices(num_examples: int, fraction: float = 1.0, fraction_seed: int = 0, exclude=()) -> np.ndarray:
    """The records a split serves: every one but ``exclude``, then a seeded ``fraction`` of those
    (:func:`subset_indices`), sorted."""
    keep = np.setdiff1d(np.arange(num_examples), np.asarray(exclude, np.int64))
    return keep[subset_indices(len(keep), fraction, fraction_seed)]


def subset_indices(num_examples: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The sorted indices of a seeded random ``fraction`` of ``num_examples`` records (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(num_examples)
    keep = max(1, int(round(fraction * num_examples)))
    return np.sort(np.random.default_rng([seed, 7919]).permutation(num_examples)[:keep])


# (folder, split, the manifest's shard hashes) already checked by this process: a split is hashed once
_VERIFIED: set[tuple[str, str, tuple[str, ...]]] = set()
# in-memory splits decoded by this process, by (folder, split, shard hashes, modalities, standardize, fraction)
_DECODED: dict[tuple, dict[str, np.ndarray]] = {}


def open_split(folder: str, split: str, verify: bool = True,
               **expect) -> tuple[grain.sources.ArrayRecordDataSource, Manifest]:
    """The ArrayRecord source of one split and the manifest, after :func:`check_manifest`.

    ``verify``: the first time this process opens the split, every shard's SHA-256 is recomputed
    against the manifest (a flipped byte, a truncated or swapped shard fails here naming the file,
    not later inside the reader or, worse, not at all); about a second a GB. ``False`` skips it
    (``config.data.verify_checksums``, for very large data).
    """
    manifest = load_manifest(folder)
    check_manifest(manifest, folder=folder, split=split, **expect)
    shards = manifest.splits[split]["shards"]
    paths = [os.path.join(folder, s["file"]) for s in shards]
    for p in paths:
        if not os.path.isfile(p):
            raise RecordError(f"{p}: listed in manifest.json but missing")
    key = (os.path.abspath(folder), split, tuple(s["sha256"] for s in shards))
    if verify and key not in _VERIFIED:
        verify_shards(folder, manifest, split)
        _VERIFIED.add(key)
    source = grain.sources.ArrayRecordDataSource(paths)
    if len(source) != manifest.splits[split]["num_examples"]:
        raise RecordError(f"{folder}: split {split!r} holds {len(source)} records, manifest.json says "
                          f"{manifest.splits[split]['num_examples']}")
    return source, manifest


def _record_ops(folder: str, manifest: Manifest, modalities, frames, standardize: bool) -> list:
    """A record's per-example operations: decode (the modalities asked for), keep the frames a config
    selects, standardise with the converter's train statistics."""
    ops: list = [Decode(modalities)]
    if frames and any(sp.select is not None for sp in frames.values()):
        ops.append(SelectFrames(frames))
    if standardize:
        stats = manifest.stats.get("train_standardization")
        if not stats:
            raise RecordError(f"{folder}/manifest.json: no train_standardization statistics; set standardize=False")
        ops.append(Standardize({m: s for m, s in stats.items() if modalities is None or m in modalities}))
    return ops


def make_loader(
    folder: str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_epochs: int | None = 1,
    modalities: Sequence[str] | None = None,
    frames: Mapping[str, FrameAugment] | None = None,
    standardize: bool = False,
    drop_remainder: bool | None = None,
    worker_count: int | None = 0,
    shard_by_process: bool = True,
    shard: tuple[int, int] | None = None,
    in_memory: bool | None = None,
    expect: Mapping[str, Any] | None = None,
    fraction: float = 1.0,
    fraction_seed: int = 0,
    exclude: Sequence[int] = (),
    verify: bool = True,
) -> grain.DataLoader | InMemoryLoader:
    """A grain ``DataLoader`` of batch dicts for ``split`` of the records in ``folder``.

    ``train`` shuffles (seeded), draws a crop box and flip per example for the ``frames`` modalities
    (:class:`TrainFrames`; the pixels are left as stored for the device) and drops the last partial
    batch; evaluation keeps order and every example. ``batch_size`` is per process.
    ``worker_count``: grain worker processes (``None``: :func:`default_worker_count`).
    ``standardize`` applies the converter's train mean/std (tabular views). ``expect`` goes to
    :func:`check_manifest`. With ``shard_by_process`` each JAX process reads a disjoint part;
    ``shard=(index, count)`` picks a part explicitly instead. ``in_memory`` (default: splits
    without frame modalities under ``IN_MEMORY_MAX_BYTES``) decodes the split once and serves
    batches from arrays (:class:`InMemoryLoader`, same contract). ``exclude``: record indices left out
    (held out for the alpha step); ``fraction`` < 1 then serves a seeded random subset of the rest
    (:func:`kept_indices`; the same records in every run and process), before the per-process sharding. ``verify``: check the shards' SHA-256 the
    first time this process opens the split (:func:`open_split`).
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    _mark_flags_parsed()
    source, manifest = open_split(folder, split, verify=verify, **(expect or {}))
    exclude = tuple(int(i) for i in exclude)
    if fraction != 1.0 or exclude:
        source = _SubsetSource(source, kept_indices(len(source), fraction, fraction_seed, exclude))
    ops = _record_ops(folder, manifest, modalities, frames, standardize)
    drop = train if drop_remainder is None else drop_remainder
    if shard is None and shard_by_process:
        import jax

        shard = (jax.process_index(), jax.process_count())
    if in_memory is None:
        in_memory = not frames and _split_bytes(manifest, split) <= IN_MEMORY_MAX_BYTES
    if in_memory:
        if frames:
            raise ValueError("in_memory loading serves fixed arrays; frame augmentation needs the grain pipeline")
        shards = tuple(sh["sha256"] for sh in manifest.splits[split]["shards"])
        key = (os.path.abspath(folder), split, shards, tuple(modalities or ()), standardize, fraction, fraction_seed,
               exclude)
        arrays = _DECODED.get(key)
        if arrays is None:  # decoded once a process: a run opens its splits again every epoch
            rows = [ops_apply(ops, source[i]) for i in range(len(source))]
            arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            for a in arrays.values():
                a.flags.writeable = False
            _DECODED[key] = arrays
        return InMemoryLoader(arrays, batch_size=batch_size, train=train, seed=seed, num_epochs=num_epochs,
                              drop_remainder=drop, shard=shard or (0, 1))
    if frames and train:
        ops.append(TrainFrames(frames))
    ops.append(grain.transforms.Batch(batch_size, drop_remainder=drop))
    options = grain.sharding.NoSharding()
    if shard is not None and shard[1] > 1:
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"`shard` index {index} is outside 0..{count - 1}")
        if train:  # equal shards (the remainder dropped), so every process takes the same number of steps
            options = grain.sharding.ShardOptions(shard_index=index, shard_count=count, drop_remainder=True)
        else:  # evaluation reads every example exactly once: contiguous parts, sizes differing by at most one
            source = _SliceSource(source, *even_part(len(source), index, count))
    sampler = grain.samplers.IndexSampler(len(source), shard_options=options, shuffle=train, num_epochs=num_epochs, seed=seed)
    workers = default_worker_count() if worker_count is None else worker_count
    # grain's default (16 reading threads, 500 records in flight) is tuned for KB-sized records on remote disks;
    # for examples of a few MB it spends more time polling its buffer than reading (Kinetics-Sounds: 762 ex/s
    # against 1,168 with 2 threads and two batches in flight; scripts/bench_data.py)
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(2 * batch_size, 16))
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops, worker_count=workers,
                            read_options=read)


def load_examples(folder: str, split: str, indices: Sequence[int], *, seed: int,
                  modalities: Sequence[str] | None = None, frames: Mapping[str, FrameAugment] | None = None,
                  standardize: bool = False, expect: Mapping[str, Any] | None = None, verify: bool = True) -> dict:
    """One batch of the records at ``indices`` of ``split``, in that order, augmented once for training
    (each example's crop box and flip drawn from ``seed``): a batch that stays fixed (the authors'
    held-out alpha batch, drawn once from their training loader)."""
    _mark_flags_parsed()
    source, manifest = open_split(folder, split, verify=verify, **(expect or {}))
    ops = _record_ops(folder, manifest, modalities, frames, standardize)
    rng = np.random.default_rng([seed, 7907])
    augment = TrainFrames(frames) if frames else None
    rows = []
    for i in indices:
        ex = ops_apply(ops, source[int(i)])
        rows.append(augment.random_map(ex, rng) if augment is not None else ex)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def default_worker_count() -> int:
    """grain worker processes when a config leaves ``data.worker_count`` unset: the cores this process
    may use, less two (the training process and the device's own threads), at most 16; 0 on a
    machine of two cores or fewer."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(16, cores - 2))
