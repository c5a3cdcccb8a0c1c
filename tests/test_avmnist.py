"""AV-MNIST (FSDD x MNIST): the converter on tiny raw layouts the tests write, its degradations against their
definitions, bad inputs named; and one end-to-end run on ../shared/data when it is there."""
import gzip
import json
import os
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile as sf

from data_prep import avmnist
from data_prep.common import BadInput
from data_prep.media import SpectrogramParams, spectrogram
from dyngap_jax.data import loader, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
SPEC = SpectrogramParams(sample_rate=8000, n_fft=64, hop=32, num_frames=20)
SPEAKERS = ("alice", "bob", "carol")


def write_idx(path, array, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def digit_images(n_per_digit, seed=0):
    """Blurred strokes: images whose PCA energy spreads over many components, like MNIST's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    images, labels = [], []
    for d in range(10):
        for _ in range(n_per_digit):
            img = np.zeros((28, 28))
            for _ in range(3 + d % 4):
                cy, cx = rng.uniform(6, 22, 2) + (d - 4.5) * np.array([0.8, -0.6])
                img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(1.5, 3.5) ** 2))
            images.append(np.clip(255 * img / img.max(), 0, 255))
            labels.append(d)
    order = rng.permutation(len(labels))
    return np.asarray(images, np.uint8)[order], np.asarray(labels, np.uint8)[order]


def make_raw(root, per_speaker=2, n_per_digit=8, gz=True):
    rec = root / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for s, speaker in enumerate(SPEAKERS):
        for d in range(10):
            for i in range(per_speaker):
                t = np.arange(int((0.2 + 0.05 * i) * 8000)) / 8000
                x = 0.3 * np.sin(2 * np.pi * (200 + 60 * d + 10 * s) * t)
                sf.write(str(rec / f"{d}_{speaker}_{i}.wav"), x.astype(np.float32), 8000, subtype="PCM_16")
    (root / "mnist").mkdir()
    images, labels = digit_images(n_per_digit)
    suffix = ".gz" if gz else ""
    write_idx(str(root / "mnist" / f"t10k-images-idx3-ubyte{suffix}"), images, gz)
    write_idx(str(root / "mnist" / f"t10k-labels-idx1-ubyte{suffix}"), labels, gz)
    return images, labels


def read_split(folder, split):
    batches = list(loader.make_loader(folder, split, batch_size=64, train=False))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("avmnist_raw")
    images, labels = make_raw(root)
    out = str(tmp_path_factory.mktemp("avmnist") / "rec")
    avmnist.run(str(root), out, split="speaker", test_speaker="carol", val_speaker="bob", image_energy_removed=0.6,
                audio_snr_db=10.0, spec=SPEC)
    return root, out, images, labels


def _image_index(source):
    return int(source.rsplit(":", 1)[1])


def test_speaker_split_pairing_and_records(converted):
    root, out, images, labels = converted
    m = records.load_manifest(out)
    assert {s: v["num_examples"] for s, v in m.splits.items()} == {"train": 20, "validation": 20, "test": 20}
    assert m.features["audio"].shape == [33, 20, 1] and m.features["image"].shape == [28, 28, 1]
    assert m.stats["speakers"] == {"train": ["alice"], "validation": ["bob"], "test": ["carol"]}
    pairs = m.stats["pairs"]
    assert len(pairs) == 60 and len(set(pairs.values())) == 60  # every recording its own image
    for name, source in pairs.items():
        assert labels[_image_index(source)] == int(name.split("_")[0])  # of its digit
    test = read_split(out, "test")
    names = sorted(n for n in pairs if "_carol_" in n)
    assert list(test["label"]) == [int(n[0]) for n in names]
    # the stored image is that recording's image through the PCA fitted on the training split's images
    train_images = images[[_image_index(pairs[n]) for n in sorted(pairs) if "_alice_" in n]]
    pca = avmnist.fit_pca(train_images, 0.6)
    want = avmnist.degrade_images(images[[_image_index(pairs[n]) for n in names]], pca)
    np.testing.assert_array_equal(test["image"], want)
    # the same pairing and noise again: identical shards
    again = avmnist.run(str(root), out + "_again", split="speaker", test_speaker="carol", val_speaker="bob",
                        image_energy_removed=0.6, audio_snr_db=10.0, spec=SPEC, workers=2)
    assert [s["sha256"] for s in again.splits["test"]["shards"]] == [s["sha256"] for s in m.splits["test"]["shards"]]


def test_pca_energy_removed_matches_the_option(converted):
    root, out, images, _ = converted
    m = records.load_manifest(out)
    pairs = m.stats["pairs"]
    train_names = sorted(n for n in pairs if "_alice_" in n)
    original = images[[_image_index(pairs[n]) for n in train_names]].astype(np.float64)
    stored = read_split(out, "train")["image"][..., 0].astype(np.float64)
    mean = original.reshape(len(original), -1).mean(0)
    removed = np.sum((original - stored) ** 2) / np.sum((original.reshape(len(original), -1) - mean) ** 2)
    assert abs(removed - 0.6) <= 0.01 * 0.6, removed  # within 1 % of the option, after rounding to uint8
    assert m.stats["image_energy_removed"]["train"] == pytest.approx(removed, abs=1e-6)
    # fitted on train only: other splits lose about as much, not exactly
    assert 0.4 < m.stats["image_energy_removed"]["test"] < 0.9
    # the definition, on floats: exactly the option; 0 removes nothing
    lam = np.linalg.svd(original.reshape(len(original), -1) - mean, compute_uv=False) ** 2
    for fraction in (1e-17, 0.25, 0.75, 0.9):
        pca = avmnist.fit_pca(original, fraction)
        # the fewest leading components: without the last kept one the tail would hold more than the fraction
        k = pca["kept"]
        assert 0 <= pca["beta"] <= 1 and lam[k:].sum() <= fraction * lam.sum() < lam[k - 1:].sum()
        x = original.reshape(len(original), -1) - pca["mean"]
        coeff = x @ pca["components"].T
        coeff[:, -1] *= pca["beta"]
        kept = coeff @ pca["components"]
        assert np.sum((x - kept) ** 2) / np.sum(x ** 2) == pytest.approx(fraction, rel=1e-9, abs=1e-12)
    same = avmnist.degrade_images(images[:5], avmnist.fit_pca(original, 0.0))
    np.testing.assert_array_equal(same[..., 0], images[:5])


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 12.5])
def test_audio_noise_snr_matches_the_option(snr_db):
    rng = np.random.default_rng(1)
    clean = (0.2 * np.sin(np.linspace(0, 300, 4000)) * np.hanning(4000)).astype(np.float32)
    noisy = avmnist.add_noise(clean, snr_db, rng, "x.wav")
    noise = noisy.astype(np.float64) - clean
    measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise ** 2))
    assert abs(measured - snr_db) < 0.5 * 0.1  # float32 rounding only: far inside 0.5 dB
    with pytest.raises(BadInput, match="silent.wav: silent recording"):
        avmnist.add_noise(np.zeros(100, np.float32), 0.0, rng, "silent.wav")


def test_stored_audio_is_the_front_end_of_the_noisy_recording(converted):
    root, out, _, _ = converted
    test = read_split(out, "test")
    wav = str(root / "fsdd" / "recordings" / "0_carol_0.wav")
    item = (wav, np.zeros((28, 28, 1), np.uint8), 0, [0, avmnist.zlib.crc32(b"0_carol_0")])
    np.testing.assert_array_equal(avmnist.load_example(item, spec=SPEC, snr_db=10.0)["audio"], test["audio"][0])
    clean = spectrogram(librosa.load(wav, sr=8000)[0], SPEC, wav)
    assert not np.allclose(clean, test["audio"][0], atol=0.1)  # the noise is there
    np.testing.assert_allclose(avmnist.load_example(item, spec=SPEC, snr_db=None)["audio"], clean, atol=1e-5)


def test_stratified_split_and_plain_idx(tmp_path):
    make_raw(tmp_path / "raw", per_speaker=4, n_per_digit=12, gz=False)
    m = avmnist.run(str(tmp_path / "raw"), str(tmp_path / "out"), split="stratified", test_fraction=0.25,
                    val_fraction=0.25, spec=SPEC, image_energy_removed=0.5)
    assert {s: v["num_examples"] for s, v in m.splits.items()} == {"train": 60, "validation": 30, "test": 30}
    assert m.stats["speakers"]["test"] == sorted(SPEAKERS)
    assert "test_speaker" not in m.params and m.params["test_fraction"] == 0.25
    # the command line: the defaults are stratified with noise at -5 dB; 'none' turns the noise off
    cmd = [sys.executable, "-m", "data_prep.avmnist", "--raw_dir", str(tmp_path / "raw"), "--n_fft=64", "--hop=32",
           "--spec_frames=20"]
    proc = subprocess.run(cmd + ["--out_dir", str(tmp_path / "cli"), "--audio_snr_db=none"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    params = records.load_manifest(str(tmp_path / "cli")).params
    assert (params["split"], params["audio_snr_db"], params["image_energy_removed"]) == ("stratified", None, 0.75)
    proc = subprocess.run(cmd + ["--out_dir", str(tmp_path / "cli2"), "--audio_snr_db=loud"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--audio_snr_db='loud': a number of dB, or 'none'" in proc.stderr
    assert not (tmp_path / "cli2").exists()


def test_bad_inputs_are_named(tmp_path):
    make_raw(tmp_path / "raw")
    raw, rec = tmp_path / "raw", tmp_path / "raw" / "fsdd" / "recordings"
    run = lambda out, **kw: avmnist.run(str(raw), str(tmp_path / out), split="speaker", test_speaker="carol",
                                        val_speaker="bob",
                                        spec=SPEC, **kw)
    # a truncated IDX file
    images_gz = raw / "mnist" / "t10k-images-idx3-ubyte.gz"
    good = images_gz.read_bytes()
    with gzip.open(images_gz, "rb") as f:
        data = f.read()
    with gzip.open(images_gz, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(BadInput, match=r"t10k-images-idx3-ubyte.gz: truncated or padded: "
                                       r"the header declares \[80, 28, 28\]"):
        run("a")
    images_gz.write_bytes(good[: len(good) // 2])  # a cut download: the gzip stream ends early
    with pytest.raises(BadInput, match="t10k-images-idx3-ubyte.gz: unreadable"):
        run("a")
    images_gz.write_bytes(good)
    # a missing labels file
    labels_gz = raw / "mnist" / "t10k-labels-idx1-ubyte.gz"
    os.rename(labels_gz, str(labels_gz) + ".away")
    with pytest.raises(BadInput, match="t10k-labels-idx1-ubyte\\[.gz\\]: missing"):
        run("a")
    os.rename(str(labels_gz) + ".away", labels_gz)
    # a wav at another sample rate, a zero-length wav, a file name that is not FSDD's
    sf.write(str(rec / "3_alice_0.wav"), np.zeros(1000, np.float32) + 0.1, 16000)
    sf.write(str(rec / "4_alice_1.wav"), np.zeros(0, np.float32), 8000)
    (rec / "notes.wav").write_bytes(b"")
    with pytest.raises(BadInput, match="notes.wav: file name is not"):
        run("a")
    os.unlink(rec / "notes.wav")
    with pytest.raises(BadInput, match="3_alice_0.wav: sample rate 16000 Hz, expected 8000 Hz"):
        run("a")
    os.unlink(rec / "3_alice_0.wav")
    with pytest.raises(BadInput, match="4_alice_1.wav: no samples"):
        run("a")
    sf.write(str(rec / "3_alice_0.wav"), np.zeros(1000, np.float32) + 0.1, 16000)
    m = run("skipped_in_conversion", skip_bad=True)  # left out while converting: no pair listed either
    assert {os.path.basename(b["file"]) for b in m.skipped} == {"3_alice_0.wav", "4_alice_1.wav"}
    assert "3_alice_0" not in m.stats["pairs"] and "4_alice_1" not in m.stats["pairs"] and len(m.stats["pairs"]) == 58
    (rec / "notes.wav").write_bytes(b"")
    m = run("skipped", skip_bad=True)
    reasons = {os.path.basename(b["file"]): b["reason"] for b in m.skipped}
    assert set(reasons) == {"notes.wav", "3_alice_0.wav", "4_alice_1.wav"}
    assert m.splits["train"]["num_examples"] == 18 and "3_alice_0" not in m.stats["pairs"]
    again = run("skipped", skip_bad=True)  # a rerun over the finished folder: nothing converted, nothing added
    assert again.skipped == m.skipped
    # a recording whose digit has no image left (8 images of each digit, 9 recordings of digit 7)
    for s in SPEAKERS:
        sf.write(str(rec / f"7_{s}_2.wav"), np.full(2000, 0.1, np.float32), 8000)
    for f in ("notes.wav", "3_alice_0.wav", "4_alice_1.wav"):
        os.unlink(rec / f)
    with pytest.raises(BadInput, match=r"7_carol_2.wav: no MNIST image of digit 7 left to pair with "
                                       r"\(the IDX files hold 8\)"):
        run("b")
    m = run("c", skip_bad=True)
    assert [os.path.basename(b["file"]) for b in m.skipped] == ["7_carol_2.wav"]
    # flags with impossible values name the flag
    with pytest.raises(ValueError, match="--test_speaker='dave': not a speaker"):
        avmnist.run(str(raw), str(tmp_path / "d"), split="speaker", test_speaker="dave", spec=SPEC)
    with pytest.raises(ValueError, match="--image_energy_removed=1.0"):
        run("e", image_energy_removed=1.0)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "fsdd", "recordings")),
                    reason=f"the real FSDD and MNIST files are not at {SHARED} (benchmark data, not in the repository)")
def test_end_to_end_on_the_shared_data(tmp_path):
    """A subset of the real recordings (3 speakers, 5 of each digit each) with the real MNIST files: convert, train
    the narrow variant one epoch, evaluate the run with scripts.evaluate."""
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for speaker in ("george", "jackson", "theo"):
        for d in range(10):
            for i in range(5):
                name = f"{d}_{speaker}_{i}.wav"
                os.symlink(os.path.join(SHARED, "fsdd", "recordings", name), rec / name)
    out = tmp_path / "records"
    m = avmnist.run("", str(out), fsdd_dir=str(tmp_path / "fsdd"), mnist_dir=os.path.join(SHARED, "mnist"),
                    split="speaker", test_speaker="theo", val_speaker="jackson")
    assert m.params["mnist_images"] == 10000 and m.features["audio"].shape == [129, 101, 1]
    assert abs(m.stats["image_energy_removed"]["train"] - 0.75) < 0.0075
    env = dict(os.environ, PYTHONPATH=ROOT)
    work = str(tmp_path / "run")
    config = os.path.join(ROOT, "configs", "avmnist.py") + ":concat/narrow"
    train = [sys.executable, "-m", "scripts.train", "--config", config,
             "--workdir", work, f"--config.data_dir={out}", "--config.train.num_epochs=1",
             "--config.train.batch_size=25", "--config.data.worker_count=0"]
    proc = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(os.path.join(work, "summary.json")))
    assert summary["best"]["epoch"] == 1 and 0 <= summary["best"]["test"]["acc/image"] <= 1
    proc = subprocess.run([sys.executable, "-m", "scripts.evaluate", "--workdir", work, "--split", "test"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test" in proc.stdout and "image" in proc.stdout


def test_the_narrow_config_trains_on_the_converted_records_and_frame_options_apply(converted, tmp_path):
    from configs import avmnist as config
    from dyngap_jax.data.augment import FrameAugment
    from dyngap_jax.train import ConfigError, train, validate
    from dyngap_jax.train.setup import _frames

    _, out, _, _ = converted
    cfg = config.get_config("ours_h/narrow")  # (L_MM, no alpha step: its compilation alone takes ~2 min here)
    cfg.data_dir = out
    cfg.train.update({"num_epochs": 1, "batch_size": 10, "eval_batch_size": 20})
    cfg.data.worker_count = 0
    valid, _ = validate(cfg)
    # digits are neither cropped nor flipped: every training box is the whole image
    frames = _frames(valid)
    assert frames["image"] == FrameAugment(size=(112, 112), normalize=False, random_resized_crop=False, flip=False)
    batch = next(iter(loader.make_loader(out, "train", batch_size=20, train=True, seed=0, frames=frames)))
    assert np.all(batch["image_box"] == [0, 0, 28, 28]) and not batch["image_flip"].any()
    summary = train(cfg, str(tmp_path / "run"))
    assert summary["best"]["epoch"] == 1 and 0 <= summary["best"]["test"]["acc/audio"] <= 1
    # mistakes in the new fields are named before anything is written
    bad = config.get_config("concat/narrow")
    bad.data_dir, bad.train.batch_size = out, 10
    bad.data.frames.image.crop_scale = (0.5, 1.5)
    with pytest.raises(ConfigError, match=r"config\.data\.frames\.image\.crop_scale: an area fraction range"):
        train(bad, str(tmp_path / "bad"))
    bad = config.get_config("concat/narrow")
    bad.data_dir, bad.train.batch_size = out, 10
    bad.model.encoders.audio.hidden_sizes = [16, 32, 64]
    with pytest.raises(ValueError, match=r"model\.encoders\.audio: `depths` \[1, 1, 1, 1\] and `hidden_sizes` "
                                         r"\[16, 32, 64\] must be positive integers, one of each a stage"):
        train(bad, str(tmp_path / "bad"))
    bad.model.encoders.audio.hidden_sizes = [16, 32, 64, 256]
    with pytest.raises(ValueError, match=r"model\.projection_dim: encoders give features of different widths"):
        train(bad, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="unknown variant 'wide'"):
        config.get_config("concat/wide")
