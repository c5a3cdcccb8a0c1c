"""AV-MNIST from the raw downloads: spoken digits (FSDD) paired with handwritten ones (MNIST) -> ArrayRecord.

Raw layouts as distributed (``--raw_dir`` holding both, or ``--fsdd_dir`` / ``--mnist_dir``)::

    <raw_dir>/fsdd/recordings/{digit}_{speaker}_{index}.wav     Free Spoken Digit Dataset, 8 kHz mono
    <raw_dir>/mnist/{train,t10k}-images-idx3-ubyte[.gz]          MNIST, IDX (gzipped or not; either
    <raw_dir>/mnist/{train,t10k}-labels-idx1-ubyte[.gz]          set or both, whichever is there)

AV-MNIST's construction (Vielzeuf et al. 2018; MultiBench): every recording is paired with a distinct
image of its digit (seeded; the pairs are listed in the manifest's ``stats.pairs``). The two
modalities are made unequal by degrading both:

* images: the principal components of the training split's images (their energy measured around
  the training mean) are ranked by energy, and the trailing ones that hold ``--image_energy_removed``
  of it are removed (the boundary component in part), so an image keeps its coarse shape only; the
  PCA is fitted on the training split and applied to every split; the energy removed from each
  split's stored images is measured and recorded (``stats.image_energy_removed``);
* audio: white Gaussian noise added to each recording at ``--audio_snr_db`` (its power set from the
  recording's own, so the SNR is exact; seeded per recording); none with ``--audio_snr_db=none``.

The defaults (75 % of the image energy removed, audio at -5 dB, stratified split) were chosen by
measurement so that the modalities are unequal as in CREMA-D: audio alone ~74 %, the image alone
~62 %, concat above both (docs/results.md, "AV-MNIST").

Audio goes through CREMA-D's front end (tile to a fixed length, STFT, ``log(|S| + 1e-7)``) with
defaults sized for FSDD: 8 kHz, ``n_fft`` 256 (32 ms), hop 80 (10 ms), 101 frames (1 s; 20 of the
3,000 recordings are longer and are cut): ``[129, 101, 1]``. A recording at another sample rate is
refused (resampling would hide a file from another data set). Images are stored as uint8
``[28, 28, 1]`` and take the device-side frames path (``data.frames.image``).

Splits: ``--split=stratified`` (default) divides every digit by ``--test_fraction`` /
``--val_fraction`` (seeded: 2,400 / 300 / 300); ``--split=speaker`` holds out one speaker for test and
one for validation (unseen voices: with four training speakers the audio alone then scores 13-69 %
over seeds on the test speaker, the validation speaker a poor guide to it; docs/results.md).

    python -m data_prep.avmnist --raw_dir ../shared/data --out_dir data/avmnist
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import zlib

import numpy as np
from absl import flags

from data_prep import common, media
from data_prep.common import BadInput, convert, define_io_flags, require_dir, stratified_split
from data_prep.media import SpectrogramParams
from dyngap_jax.data.records import FeatureSpec

NAME = "avmnist"
VERSION = "1.0.0"
CLASS_NAMES = [str(d) for d in range(10)]
SPEC = SpectrogramParams(sample_rate=8000, n_fft=256, hop=80, num_frames=101)
IMAGE_SHAPE = (28, 28)
SPLITS = ("train", "validation", "test")
_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)$")

FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------------- MNIST


def read_idx(path: str, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (``ndim`` 3: images, 1: labels), gzipped or not; a truncated or
    foreign file is a :class:`BadInput` naming it."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut .gz ends in EOFError
        raise BadInput(path, f"unreadable ({type(e).__name__}: {e})") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        raise BadInput(path, f"not an IDX file of unsigned bytes with {ndim} dimension(s) (magic {data[:4].hex()})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    need = int(np.prod(dims))
    if len(data) - header != need:
        raise BadInput(path, f"truncated or padded: the header declares {dims} ({need} bytes of data), "
                             f"the file holds {len(data) - header}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load_mnist(mnist_dir: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images uint8 [N, 28, 28], labels [N], source)``: every MNIST set found (train, then t10k);
    ``source[i]`` names image i as ``<file>:<index>``."""
    require_dir(mnist_dir, "--mnist_dir")
    images, labels, sources = [], [], []
    for prefix in ("train", "t10k"):
        img_path = _find(mnist_dir, f"{prefix}-images-idx3-ubyte")
        lab_path = _find(mnist_dir, f"{prefix}-labels-idx1-ubyte")
        if img_path is None and lab_path is None:
            continue
        if img_path is None or lab_path is None:
            missing = f"{prefix}-images-idx3-ubyte[.gz]" if img_path is None else f"{prefix}-labels-idx1-ubyte[.gz]"
            raise BadInput(os.path.join(mnist_dir, missing), "missing: MNIST's images and labels come as a pair")
        x, y = read_idx(img_path, 3), read_idx(lab_path, 1)
        if x.shape[1:] != IMAGE_SHAPE:
            raise BadInput(img_path, f"images are {list(x.shape[1:])}, MNIST's are {list(IMAGE_SHAPE)}")
        if len(x) != len(y):
            raise BadInput(lab_path, f"{len(y)} labels for the {len(x)} images of {os.path.basename(img_path)}")
        if y.size and y.max() > 9:
            raise BadInput(lab_path, f"label {int(y.max())} is not a digit")
        images.append(x)
        labels.append(y.astype(np.int64))
        sources += [f"{os.path.basename(img_path)}:{i}" for i in range(len(x))]
    if not images:
        raise BadInput(mnist_dir, "no MNIST IDX files: expected train-images-idx3-ubyte[.gz] and "
                                  "train-labels-idx1-ubyte[.gz], and/or the t10k ones")
    return np.concatenate(images), np.concatenate(labels), sources


# ---------------------------------------------------------------------------------------------- FSDD


def list_recordings(fsdd_dir: str, skip_bad: bool, bad: list) -> list[dict]:
    """``[{name, path, digit, speaker, index}]`` sorted by name, from ``<fsdd_dir>/recordings/*.wav``."""
    require_dir(fsdd_dir, "--fsdd_dir")
    rec_dir = os.path.join(fsdd_dir, "recordings")
    if not os.path.isdir(rec_dir):
        raise BadInput(rec_dir, "missing: FSDD's layout is <fsdd_dir>/recordings/{digit}_{speaker}_{index}.wav")
    out = []
    for fname in sorted(os.listdir(rec_dir)):
        if not fname.endswith(".wav"):
            continue
        match = _NAME.match(fname[:-4])
        if match is None:
            error = {"file": os.path.join(rec_dir, fname), "reason": "file name is not {digit}_{speaker}_{index}.wav"}
            if not skip_bad:
                raise BadInput(error["file"], error["reason"])
            bad.append(error)
            continue
        digit, speaker, index = match.groups()
        out.append({"name": fname[:-4], "path": os.path.join(rec_dir, fname), "digit": int(digit), "speaker": speaker,
                    "index": int(index)})
    if not out:
        raise BadInput(rec_dir, "no {digit}_{speaker}_{index}.wav recordings")
    return out


def split_recordings(recs: list[dict], *, split: str, test_speaker: str, val_speaker: str, seed: int,
                     test_fraction: float, val_fraction: float) -> dict[str, list[dict]]:
    if split == "speaker":
        speakers = sorted({r["speaker"] for r in recs})
        for flag, who in (("--test_speaker", test_speaker), ("--val_speaker", val_speaker)):
            if who not in speakers:
                raise ValueError(f"{flag}={who!r}: not a speaker of the recordings {speakers}")
        if test_speaker == val_speaker:
            raise ValueError(f"--test_speaker and --val_speaker are both {test_speaker!r}; hold out two speakers")
        role = {test_speaker: "test", val_speaker: "validation"}
        out = {s: [r for r in recs if role.get(r["speaker"], "train") == s] for s in SPLITS}
        if not out["train"]:
            raise ValueError(f"no speakers left for training besides {test_speaker!r} and {val_speaker!r}")
        return out
    if split != "stratified":
        raise ValueError(f"--split={split!r}: 'speaker' or 'stratified'")
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(f"--test_fraction {test_fraction} and --val_fraction {val_fraction}: each in (0, 1), "
                         "their sum below 1")
    idx = stratified_split(np.asarray([r["digit"] for r in recs]), {"train": 1 - test_fraction - val_fraction,
                                                                    "validation": val_fraction, "test": test_fraction},
                           seed)
    return {s: [recs[i] for i in idx[s]] for s in SPLITS}


def pair_images(splits: dict[str, list[dict]], labels: np.ndarray, seed: int, skip_bad: bool,
                bad: list) -> dict[str, list[tuple[dict, int]]]:
    """Each recording (train, validation, test, by name) gets a distinct image of its digit, drawn from a seeded
    permutation of that digit's images; a recording whose digit has none left is an error (or, with
    ``skip_bad``, left out and listed)."""
    rng = np.random.default_rng(seed)
    pools = {d: list(rng.permutation(np.flatnonzero(labels == d))) for d in range(10)}
    out = {}
    for s in SPLITS:
        out[s] = []
        for r in sorted(splits[s], key=lambda r: r["name"]):
            if not pools[r["digit"]]:
                error = {"file": r["path"], "reason": f"no MNIST image of digit {r['digit']} left to pair with "
                                                      f"(the IDX files hold {int(np.sum(labels == r['digit']))})"}
                if not skip_bad:
                    raise BadInput(error["file"], error["reason"] + "; --skip_bad leaves such recordings out")
                bad.append(error)
                continue
            out[s].append((r, int(pools[r["digit"]].pop(0))))
    return out


# ---------------------------------------------------------------------------------------------- degradations


def fit_pca(train: np.ndarray, removed: float) -> dict:
    """The PCA of the training images (flattened, float64) and what to keep so that ``removed`` of their energy
    around the mean goes: the fewest leading components whose tail holds at most ``removed``, the last of
    them scaled by ``beta`` in [0, 1] (so the removed energy, ``tail + (1 - beta)^2 lambda_k``, equals
    ``removed`` on the training images before the uint8 rounding; the stored images' own fraction is
    measured and recorded by :func:`run`)."""
    if not 0 <= removed < 1:
        raise ValueError(f"--image_energy_removed={removed}: a fraction in [0, 1)")
    x = train.reshape(len(train), -1).astype(np.float64)
    mean = x.mean(0)
    if removed == 0:
        return {"mean": mean, "components": None, "beta": 1.0, "kept": x.shape[1], "total_energy": None}
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    lam = s ** 2
    total = lam.sum()
    # tail[k] = energy of components k+1.. (what removing everything after k costs), summed from the end so
    # that the last is exactly 0
    tail = np.append(np.cumsum(lam[::-1])[::-1][1:], 0.0)
    k = min(int(np.searchsorted(-tail, -removed * total)), len(lam) - 1)  # first k whose tail is <= removed * total
    beta = float(np.clip(1.0 - np.sqrt(max(removed * total - tail[k], 0.0) / lam[k]), 0.0, 1.0)) if lam[k] > 0 else 1.0
    return {"mean": mean, "components": vt[:k + 1], "beta": float(beta), "kept": k + 1, "total_energy": float(total)}


def degrade_images(images: np.ndarray, pca: dict) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> uint8 ``[N, 28, 28, 1]``: the mean plus the kept components (rounded, clipped)."""
    if pca["components"] is None:  # nothing removed
        return images[..., None].copy()
    x = images.reshape(len(images), -1).astype(np.float64) - pca["mean"]
    coeff = x @ pca["components"].T
    coeff[:, -1] *= pca["beta"]
    out = pca["mean"] + coeff @ pca["components"]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(images.shape + (1,))


def energy_removed(original: np.ndarray, degraded: np.ndarray, mean: np.ndarray) -> float:
    """``sum ||x - x'||^2 / sum ||x - mean||^2`` over the images: the fraction of their energy removed."""
    x = original.reshape(len(original), -1).astype(np.float64)
    y = degraded.reshape(len(degraded), -1).astype(np.float64)
    return float(np.sum((x - y) ** 2) / np.sum((x - mean) ** 2))


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator, where: str) -> np.ndarray:
    """``samples`` plus white Gaussian noise whose power is the recording's over ``10^(snr_db / 10)`` exactly."""
    power = float(np.mean(np.square(samples, dtype=np.float64)))
    if power == 0:
        raise BadInput(where, "silent recording: no signal to set a noise level from")
    noise = rng.standard_normal(samples.shape)
    noise *= np.sqrt(power / 10 ** (snr_db / 10) / np.mean(noise ** 2))
    return (samples + noise).astype(np.float32)


def read_wav(path: str, sample_rate: int) -> np.ndarray:
    import soundfile as sf

    if not os.path.isfile(path):
        raise BadInput(path, "missing recording")
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several kinds on a broken file
        raise BadInput(path, f"unreadable audio ({type(e).__name__}: {e})") from None
    if rate != sample_rate:
        raise BadInput(path, f"sample rate {rate} Hz, expected {sample_rate} Hz (FSDD is 8 kHz; see --sample_rate)")
    if samples.shape[0] == 0:
        raise BadInput(path, "no samples (zero-length recording)")
    return samples.mean(1)


def load_example(item, *, spec: SpectrogramParams, snr_db: float | None):
    """``item``: ``(wav path, degraded image uint8 [28, 28, 1], digit, noise seed)`` -> the record."""
    path, image, digit, noise_seed = item
    samples = read_wav(path, spec.sample_rate)
    if snr_db is not None:
        samples = add_noise(samples, snr_db, np.random.default_rng(noise_seed), path)
    return {"audio": media.spectrogram(samples, spec, path), "image": image, "label": np.int32(digit)}


# ---------------------------------------------------------------------------------------------- driver


def run(raw_dir, out_dir, *, fsdd_dir=None, mnist_dir=None, split="stratified", test_speaker="theo",
        val_speaker="nicolas", test_fraction=0.1, val_fraction=0.1, seed=0, image_energy_removed=0.75,
        audio_snr_db=-5.0, spec=SPEC, workers=0, skip_bad=False):
    if not 0 <= image_energy_removed < 1:
        raise ValueError(f"--image_energy_removed={image_energy_removed}: a fraction in [0, 1)")
    if audio_snr_db is not None and not np.isfinite(audio_snr_db):
        raise ValueError(f"--audio_snr_db={audio_snr_db}: a finite number of dB (None: no noise)")
    fsdd_dir = fsdd_dir or os.path.join(raw_dir, "fsdd")
    mnist_dir = mnist_dir or os.path.join(raw_dir, "mnist")
    bad: list = []
    recs = list_recordings(fsdd_dir, skip_bad, bad)
    images, labels, sources = load_mnist(mnist_dir)
    splits = split_recordings(recs, split=split, test_speaker=test_speaker, val_speaker=val_speaker, seed=seed,
                              test_fraction=test_fraction, val_fraction=val_fraction)
    pairs = pair_images(splits, labels, seed, skip_bad, bad)
    train_idx = np.asarray([i for _, i in pairs["train"]])
    pca = fit_pca(images[train_idx], image_energy_removed)
    items, measured = {}, {}
    for s in SPLITS:
        idx = np.asarray([i for _, i in pairs[s]], np.int64)
        degraded = degrade_images(images[idx], pca)
        measured[s] = round(energy_removed(images[idx], degraded, pca["mean"]), 6) if len(idx) else None
        items[s] = [(r["path"], degraded[j], r["digit"], [seed, zlib.crc32(r["name"].encode())])
                    for j, (r, _) in enumerate(pairs[s])]
    features = {"audio": FeatureSpec("float32", spec.shape), "image": FeatureSpec("uint8", list(IMAGE_SHAPE) + [1]),
                "label": FeatureSpec("int32", [])}
    # what identifies the raw data (a finished folder is reused only for the same): the images' and labels' bytes,
    # the recordings' names and sizes
    raw = hashlib.sha256(images.tobytes() + labels.astype(np.uint8).tobytes())
    for r in recs:
        raw.update(f"{r['name']}:{os.path.getsize(r['path'])};".encode())
    params = {"split": split, "seed": seed, "image_energy_removed": image_energy_removed, "audio_snr_db": audio_snr_db,
              "sample_rate": spec.sample_rate, "n_fft": spec.n_fft, "hop": spec.hop, "spec_frames": spec.num_frames,
              "log_offset": 1e-7, "mnist_images": len(images), "recordings": len(recs), "raw_sha256": raw.hexdigest()}
    params.update({"test_speaker": test_speaker, "val_speaker": val_speaker} if split == "speaker"
                  else {"test_fraction": test_fraction, "val_fraction": val_fraction})
    stats = {"image_energy_removed": measured, "pca_components_kept": pca["kept"],
             "pca_last_component_scale": pca["beta"],
             "speakers": {s: sorted({r["speaker"] for r, _ in pairs[s]}) for s in SPLITS},
             "pairs": {r["name"]: sources[i] for s in SPLITS for r, i in pairs[s]}}
    manifest = convert(
        name=NAME, version=VERSION, out_dir=out_dir, splits=items,
        load=functools.partial(load_example, spec=spec, snr_db=audio_snr_db), features=features,
        class_names=CLASS_NAMES, params=params, examples_per_shard=500, workers=workers, skip_bad=skip_bad,
        stats=lambda _: stats,
    )
    # the recordings left out (bad names and no image left: before conversion; unreadable: during it) have no pair
    skipped = bad + [b for b in manifest.skipped if b not in bad]
    gone = {os.path.basename(b["file"])[:-4] for b in skipped}
    pairs = {n: src for n, src in manifest.stats["pairs"].items() if n not in gone}
    if skipped != manifest.skipped or pairs != manifest.stats["pairs"]:  # (a finished folder's are already so)
        manifest.skipped, manifest.stats["pairs"] = skipped, pairs
        manifest.save(out_dir)
    return manifest


def main(argv):
    del argv
    spec = SpectrogramParams(FLAGS.sample_rate, FLAGS.n_fft, FLAGS.hop, FLAGS.spec_frames)
    try:
        snr_db = None if FLAGS.audio_snr_db.strip().lower() == "none" else float(FLAGS.audio_snr_db)
    except ValueError:
        raise SystemExit(f"error: --audio_snr_db={FLAGS.audio_snr_db!r}: a number of dB, or 'none'")
    try:
        run(FLAGS.raw_dir, FLAGS.out_dir, fsdd_dir=FLAGS.fsdd_dir, mnist_dir=FLAGS.mnist_dir, split=FLAGS.split,
            test_speaker=FLAGS.test_speaker, val_speaker=FLAGS.val_speaker, test_fraction=FLAGS.test_fraction,
            val_fraction=FLAGS.val_fraction, seed=FLAGS.seed, image_energy_removed=FLAGS.image_energy_removed,
            audio_snr_db=snr_db, spec=spec, workers=FLAGS.workers, skip_bad=FLAGS.skip_bad)
    except ValueError as e:  # a flag's value (the message names it)
        raise SystemExit(f"error: {e}")


def define_flags():
    """The command-line flags (defined only when run as a script, so converters can be imported together)."""
    define_io_flags("Folder holding fsdd/recordings/*.wav and mnist/*-idx?-ubyte[.gz] (e.g. ../shared/data).",
                    "recordings")
    flags.DEFINE_string("fsdd_dir", None, "FSDD's folder (holding recordings/); default <raw_dir>/fsdd.")
    flags.DEFINE_string("mnist_dir", None, "MNIST's folder (the IDX files); default <raw_dir>/mnist.")
    flags.DEFINE_enum("split", "stratified", ["stratified", "speaker"], "Divide each digit, or hold out speakers.")
    flags.DEFINE_string("test_speaker", "theo", "--split=speaker: the speaker whose recordings are the test split.")
    flags.DEFINE_string("val_speaker", "nicolas", "--split=speaker: the speaker whose recordings are validation.")
    flags.DEFINE_float("test_fraction", 0.1, "--split=stratified: each digit's test fraction.")
    flags.DEFINE_float("val_fraction", 0.1, "--split=stratified: each digit's validation fraction.")
    flags.DEFINE_integer("seed", 0, "Seed of the pairing, the stratified split and the audio noise.")
    flags.DEFINE_float("image_energy_removed", 0.75, "Fraction of the images' PCA energy removed (0: none).")
    flags.DEFINE_string("audio_snr_db", "-5", "White noise added to each recording at this SNR in dB ('none': none).")
    flags.DEFINE_integer("sample_rate", SPEC.sample_rate, "The recordings' sample rate (another is refused).")
    flags.DEFINE_integer("n_fft", SPEC.n_fft, "STFT size.")
    flags.DEFINE_integer("hop", SPEC.hop, "STFT hop.")
    flags.DEFINE_integer("spec_frames", SPEC.num_frames, "Spectrogram frames (the recording tiled or cut to fit).")
    flags.adopt_module_key_flags(common)  # --help lists the shared flags too


if __name__ == "__main__":
    define_flags()
    common.run(main)
