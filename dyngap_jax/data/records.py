"""The record format shared by the converters (``data_prep/``) and the loaders.

A data set folder holds, per split, ArrayRecord shards ``<split>-<i>-of-<n>.array_record`` and
one ``manifest.json`` (written last, atomically: its presence means the conversion finished).
Each record is one example: a msgpack dict of numpy arrays, one per modality plus ``label``.

The manifest carries what a loader needs to refuse records that do not match its config: the
data set's name and converter version, split sizes, each feature's dtype and shape, class names,
the converter's parameters, a SHA-256 per shard, and the bad inputs a ``--skip_bad`` run left out.

Why ArrayRecord directly rather than a TFDS builder: the converters need resumable, atomic,
per-shard writes and a record of skipped inputs, which we would build around a TFDS builder
anyway, and grain reads ArrayRecord files natively; a TFDS builder adds tensorflow-datasets and
its dependency tree (and the package-folder workarounds a builder outside a package needs) for
no reading speed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Any, Iterable, Mapping

import numpy as np
from flax import serialization

from dyngap_jax.io import atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class RecordError(ValueError):
    """Records that are missing, incomplete or do not match what the caller expects (names the file or field)."""


def encode_example(example: Mapping[str, Any]) -> bytes:
    return serialization.msgpack_serialize({k: np.asarray(v) for k, v in example.items()})


def decode_example(data: bytes) -> dict[str, np.ndarray]:
    """The example dict of one record. Arrays are read-only views into ``data`` (no copy).

    Records are flax's msgpack of ``{name: ndarray}``; this reads that layout directly (a map of
    ``str -> ext 1 (shape, dtype name, bytes)``) so that a 1 MB example is not copied twice, as
    msgpack's generic unpacking does; anything else falls back to flax's reader.
    """
    try:
        return _decode_views(data)
    except (_NotPlain, struct.error, IndexError, ValueError):  # another layout, or cut short: flax's reader says
        return serialization.msgpack_restore(data)


class _NotPlain(Exception):
    pass


_INT = {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q"}
_LEN = {0xc4: ">B", 0xc5: ">H", 0xc6: ">I", 0xd9: ">B", 0xda: ">H", 0xdb: ">I", 0xdc: ">H", 0xdd: ">I",
        0xde: ">H", 0xdf: ">I", 0xc7: ">B", 0xc8: ">H", 0xc9: ">I"}


def _decode_views(data) -> dict[str, np.ndarray]:
    buf = memoryview(data)
    pos = 0

    def unpack(fmt: str | None) -> int:  # one big-endian unsigned number, of the format its tag names
        nonlocal pos
        if fmt is None:
            raise _NotPlain
        (n,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return n

    def length(tag: int, fix_lo: int, fix_hi: int) -> int:
        if fix_lo <= tag <= fix_hi:
            return tag - fix_lo
        return unpack(_LEN.get(tag))

    def string(tag: int) -> str:
        nonlocal pos
        n = length(tag, 0xa0, 0xbf) if (0xa0 <= tag <= 0xbf or tag in (0xd9, 0xda, 0xdb)) else -1
        if n < 0:
            raise _NotPlain
        s = bytes(buf[pos:pos + n]).decode()
        pos += n
        return s

    def byte() -> int:
        nonlocal pos
        pos += 1
        return buf[pos - 1]

    def integer() -> int:
        tag = byte()
        if tag <= 0x7f:
            return tag
        return unpack(_INT.get(tag))

    tag = byte()
    if not (0x80 <= tag <= 0x8f or tag in (0xde, 0xdf)):
        raise _NotPlain
    out = {}
    for _ in range(length(tag, 0x80, 0x8f)):
        key = string(byte())
        tag = byte()
        if tag not in (0xc7, 0xc8, 0xc9):
            raise _NotPlain
        length(tag, -1, -2)
        if byte() != 1 or byte() != 0x93:  # ext type 1 (ndarray) holding (shape, dtype, data)
            raise _NotPlain
        tag = byte()
        if not (0x90 <= tag <= 0x9f or tag in (0xdc, 0xdd)):
            raise _NotPlain
        shape = tuple(integer() for _ in range(length(tag, 0x90, 0x9f)))
        dtype = np.dtype(string(byte()))
        tag = byte()
        if tag not in (0xc4, 0xc5, 0xc6):
            raise _NotPlain
        n = length(tag, -1, -2)
        if dtype.hasobject or n != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise _NotPlain
        out[key] = np.frombuffer(data, dtype=dtype, count=n // dtype.itemsize, offset=pos).reshape(shape)
        pos += n
    if pos != len(buf):
        raise _NotPlain
    return out


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: str, examples: Iterable[Mapping[str, Any]]) -> tuple[int, str]:
    """Write ``examples`` to an ArrayRecord file at ``path`` atomically; return (count, sha256)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    count = 0
    try:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for ex in examples:
            writer.write(encode_example(ex))
            count += 1
        writer.close()
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return count, digest


@dataclasses.dataclass
class FeatureSpec:
    dtype: str
    shape: list[int]


@dataclasses.dataclass
class Manifest:
    """What ``manifest.json`` holds; see the module docstring."""

    name: str
    converter_version: str
    features: dict[str, FeatureSpec]
    class_names: list[str]
    splits: dict[str, dict[str, Any]]  # split -> {"num_examples": n, "shards": [{"file", "num_examples", "sha256"}]}
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def modalities(self) -> list[str]:
        return [k for k in self.features if k != "label"]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["features"] = {k: FeatureSpec(**v) for k, v in d["features"].items()}
        return cls(**d)

    def save(self, folder: str) -> None:
        atomic_write_text(os.path.join(folder, MANIFEST), self.to_json())


def load_manifest(folder: str) -> Manifest:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise RecordError(f"record folder {folder!r} does not exist (run the data set's converter in data_prep/)")
    if not os.path.isfile(path):
        raise RecordError(f"{path}: missing; the conversion into {folder!r} did not finish (rerun the converter)")
    with open(path) as f:
        try:
            manifest = Manifest.from_dict(json.load(f))
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise RecordError(f"{path}: not a valid manifest ({e})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise RecordError(f"{path}: record format {manifest.format_version}, this code reads {FORMAT_VERSION}")
    return manifest


def shard_names(split: str, num_shards: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def verify_shards(folder: str, manifest: Manifest, split: str) -> None:
    """Recompute each shard's SHA-256 against the manifest (slow on big data; the loaders check sizes)."""
    for shard in manifest.splits[split]["shards"]:
        path = os.path.join(folder, shard["file"])
        if sha256_file(path) != shard["sha256"]:
            raise RecordError(f"{path}: checksum differs from {MANIFEST}; the file changed after conversion")
