"""The conversion driver every converter uses: parallel, resumable, atomic, with a progress bar.

A converter lists its examples per split as picklable items and gives a module-level
``load(item) -> example dict`` that raises :class:`BadInput` (naming the file) on bad raw data.
:func:`convert` writes the shards and the manifest:

* each shard is written to a temporary name and renamed, with a ``.done`` note beside it; a rerun
  skips shards whose note matches, so a killed run resumes where it stopped;
* ``manifest.json`` is written last (atomically), so a folder without it is visibly incomplete,
  and a rerun over a finished folder with the same parameters does nothing;
* a bad input stops the run with its file named, or with ``skip_bad`` is left out, counted and
  listed in the manifest.
"""
from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import logging
from tqdm import tqdm

from dyngap_jax.data.records import (
    MANIFEST,
    FeatureSpec,
    Manifest,
    RecordError,
    load_manifest,
    sha256_file,
    shard_names,
    write_shard,
)
from dyngap_jax.data.workers import die_with_parent
from dyngap_jax.io import atomic_write_text


class BadInput(Exception):
    """A raw file that cannot become a correct record: ``path`` and what is wrong with it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def define_io_flags(raw_dir_help: str, skip_what: str = "inputs") -> None:
    """--raw_dir and --out_dir (required), --workers and --skip_bad, which every converter but mfeat's has.

    A converter's ``define_flags`` adopts them as key flags (``flags.adopt_module_key_flags(common)``), so
    its ``--help`` lists them."""
    from absl import flags

    flags.DEFINE_string("raw_dir", None, f"(required) {raw_dir_help}")
    flags.DEFINE_string("out_dir", None, "(required) Where the records go.")
    flags.DEFINE_integer("workers", 0, "Parallel decoding processes (0: in this process).")
    flags.DEFINE_bool("skip_bad", False, f"Leave out unreadable {skip_what} (counted and listed in the manifest).")
    flags.mark_flags_as_required(["raw_dir", "out_dir"])


def require_dir(path: str, flag: str = "--raw_dir") -> None:
    if not path:
        raise SystemExit(f"{flag} is required")
    if not os.path.isdir(path):
        raise BadInput(path, f"{flag} does not exist or is not a folder")


def describe(item) -> str:
    """How an item is named in errors: its path (or first path), not the repr of its arrays."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], (str, os.PathLike)):
        return str(item[0])
    if isinstance(item, Mapping) and "source" in item:
        return str(item["source"])
    return "in-memory example"


def check_example(example: Mapping[str, np.ndarray], features: Mapping[str, FeatureSpec], item) -> None:
    """An example must have exactly the manifest's features, with their dtypes and shapes."""
    if set(example) != set(features):
        raise BadInput(describe(item), f"example keys {sorted(example)} differ from the features {sorted(features)}")
    for k, spec in features.items():
        x = np.asarray(example[k])
        if str(x.dtype) != spec.dtype or list(x.shape) != list(spec.shape):
            raise BadInput(describe(item), f"feature {k!r} is {x.dtype}{list(x.shape)}, expected {spec.dtype}{spec.shape}")


def _load_checked(load: Callable, features, item):
    try:
        ex = load(item)
        check_example(ex, features, item)
        return ex, None
    except BadInput as e:
        return None, {"file": e.path, "reason": e.reason}


def convert(
    *,
    name: str,
    version: str,
    out_dir: str,
    splits: Mapping[str, Sequence[Any]],
    load: Callable[[Any], dict],
    features: Mapping[str, FeatureSpec],
    class_names: Sequence[str],
    params: Mapping[str, Any],
    examples_per_shard: int = 1000,
    workers: int = 0,
    skip_bad: bool = False,
    stats: Callable[[str], dict] | None = None,
) -> Manifest:
    """Convert every split's items into ``out_dir``; returns the manifest (see the module docstring)."""
    os.makedirs(out_dir, exist_ok=True)
    params = json.loads(json.dumps(dict(params)))  # what the manifest will hold, for comparison
    done = finished_conversion(out_dir, name, version, params)
    if done is not None:
        return done
    _remove_stale_temporaries(out_dir)
    # what a finished shard's note must match to be reused: this conversion and this shard's items
    identity = _digest({"name": name, "version": version, "params": params,
                        "features": {k: [v.dtype, list(v.shape)] for k, v in features.items()}})
    # spawned, not forked: this process has JAX loaded (its threads do not survive a fork)
    pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent,
                                       initargs=(os.getpid(),)) if workers > 0 else None
    skipped: list[dict] = []
    split_info: dict[str, dict] = {}
    start, total = time.time(), 0
    try:
        for split, items in splits.items():
            items = list(items)
            if not items:
                raise RecordError(f"split {split!r} of {name} has no examples")
            n_shards = max(1, math.ceil(len(items) / examples_per_shard))
            per = math.ceil(len(items) / n_shards)
            shards = []
            bar = tqdm(total=len(items), desc=f"{name}/{split}", unit="ex", dynamic_ncols=True,
                       disable=None if sys.stderr.isatty() else True)  # a bar on a terminal; the summary line in a log
            for i, file in enumerate(shard_names(split, n_shards)):
                chunk = items[i * per:(i + 1) * per]
                path, note = os.path.join(out_dir, file), os.path.join(out_dir, file + ".done")
                chunk_digest = _digest(chunk)
                finished = _finished_shard(path, note, identity, chunk_digest)
                if finished is not None:
                    shards.append(finished["shard"])
                    skipped.extend(finished["skipped"])
                    bar.update(len(chunk))
                    continue
                if pool is not None:
                    results = list(pool.map(_load_checked, [load] * len(chunk), [features] * len(chunk), chunk,
                                            chunksize=max(1, len(chunk) // (4 * workers))))
                else:
                    results = [_load_checked(load, features, item) for item in chunk]
                bad = [b for _, b in results if b is not None]
                if bad and not skip_bad:
                    raise BadInput(bad[0]["file"], bad[0]["reason"] + " (rerun with --skip_bad to leave such inputs out)")
                count, digest = write_shard(path, (ex for ex, b in results if b is None))
                shard = {"file": file, "num_examples": count, "sha256": digest}
                atomic_write_text(note, json.dumps({"items": len(chunk), "identity": identity, "chunk": chunk_digest,
                                                    "shard": shard, "skipped": bad}))
                shards.append(shard)
                skipped.extend(bad)
                bar.update(len(chunk))
                total += count
            bar.close()
            split_info[split] = {"num_examples": sum(s["num_examples"] for s in shards), "shards": shards}
            if split_info[split]["num_examples"] == 0:
                raise RecordError(f"split {split!r} of {name}: every input was bad")
    finally:
        if pool is not None:
            pool.shutdown()
    manifest = Manifest(
        name=name, converter_version=version, features=dict(features), class_names=list(class_names),
        splits=split_info, params=params, skipped=skipped,
    )
    if stats is not None:
        manifest.stats = stats(out_dir)
    manifest.save(out_dir)
    for split in split_info.values():
        for shard in split["shards"]:
            note = os.path.join(out_dir, shard["file"] + ".done")
            if os.path.exists(note):
                os.unlink(note)
    elapsed = time.time() - start
    rate = total / elapsed if elapsed > 0 else float("inf")
    msg = f"{name}: wrote {total} examples in {elapsed:.1f} s ({rate:.1f} examples/s) to {out_dir}"
    if skipped:
        msg += f"; skipped {len(skipped)} bad inputs (listed in {MANIFEST})"
    print(msg)
    logging.info(msg)
    return manifest


def _digest(obj) -> str:
    """SHA-256 of ``obj`` pickled (items are picklable by contract; the same items give the same digest)."""
    return hashlib.sha256(pickle.dumps(obj, protocol=4)).hexdigest()


def _finished_shard(path: str, note: str, identity: str, chunk_digest: str) -> dict | None:
    """The ``.done`` note of a shard a killed run finished, if it may be reused: written by a conversion
    with the same name, version, parameters and features, from the same items, and the file still
    hashing to what was written. Otherwise None (the shard is converted again; the reason is logged)."""
    if not (os.path.isfile(path) and os.path.isfile(note)):
        return None
    try:
        with open(note) as f:
            finished = json.load(f)
    except (OSError, json.JSONDecodeError):
        finished = {}
    if finished.get("identity") != identity:
        reason = "written by a conversion with other parameters"
    elif finished.get("chunk") != chunk_digest:
        reason = "written from other inputs"
    elif sha256_file(path) != finished["shard"]["sha256"]:
        reason = "the file changed after it was written"
    else:
        return finished
    logging.warning("%s: not reused (%s); converting it again", path, reason)
    print(f"{path}: not reused ({reason}); converting it again")
    return None


def _remove_stale_temporaries(out_dir: str) -> None:
    """Delete the ``.tmp-<pid>-*`` shards that killed conversions left (their process is gone)."""
    for name in os.listdir(out_dir):
        if not name.startswith(".tmp-"):
            continue
        pid = name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            os.unlink(os.path.join(out_dir, name))
            logging.info("removed %s, left by a killed conversion", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished_conversion(out_dir: str, name: str, version: str, params: Mapping) -> Manifest | None:
    """The manifest of a finished conversion of the same data set, version and parameters in
    ``out_dir`` (printing that it is reused), None when there is none; another conversion there is
    an error."""
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        return None
    params = json.loads(json.dumps(dict(params)))
    done = load_manifest(out_dir)
    if done.name == name and done.converter_version == version and done.params == params:
        sizes = ", ".join(f"{s} {v['num_examples']}" for s, v in done.splits.items())
        print(f"{out_dir}: already converted ({sizes})")
        return done
    raise RecordError(
        f"{out_dir}/{MANIFEST}: holds {done.name} v{done.converter_version} with other parameters; "
        "use a new --out_dir (or delete this one)"
    )


def run(main) -> None:
    """``absl.app.run(main)`` with the libraries' INFO logging off unless ``--verbosity`` is given."""
    from absl import app

    from dyngap_jax import cli

    def quiet(argv):
        cli.quiet_libraries()
        return main(argv)

    app.run(quiet)


def _die_with_parent(parent: int) -> None:
    """Worker initialiser: on Linux, the kernel kills this worker when the converter dies (even by SIGKILL),
    so no decoding process outlives a killed conversion."""
    die_with_parent(parent)


def stratified_split(labels: np.ndarray, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Index arrays per split, each class divided by ``fractions`` (which sum to 1) with a fixed seed."""
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"split fractions {dict(fractions)} must sum to 1")
    rng = np.random.default_rng(seed)
    out = {s: [] for s in fractions}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.round(np.cumsum([0.0] + list(fractions.values())) * len(idx)).astype(int)
        for s, lo, hi in zip(fractions, bounds[:-1], bounds[1:]):
            out[s].extend(idx[lo:hi].tolist())
    return {s: np.sort(np.asarray(v, dtype=np.int64)) for s, v in out.items()}
