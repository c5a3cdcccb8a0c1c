"""Decoding raw audio, video, images and text into the arrays the records hold.

Audio: librosa; video: PyAV (FFmpeg inside the pip wheel, so pip is the whole set-up); images:
Pillow; text: the ``transformers`` tokenizer of a local checkpoint folder. Every failure becomes
a :class:`BadInput` naming the file.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from data_prep.common import BadInput


@dataclasses.dataclass(frozen=True)
class SpectrogramParams:
    """The authors' audio front end: resample, tile to a fixed length, STFT, ``log(|S| + 1e-7)``.

    ``num_frames`` STFT frames (``center=True``) need ``(num_frames - 1) * hop`` samples; a
    shorter recording is tiled (repeated) to that length and a longer one cut, as their code does.
    """

    sample_rate: int = 22050
    n_fft: int = 512
    hop: int = 353
    num_frames: int = 299

    @property
    def shape(self) -> list[int]:
        return [self.n_fft // 2 + 1, self.num_frames, 1]


def define_audio_video_flags(spec: SpectrogramParams, num_frames: int = 3, fps: float = 1.0, frame_size: int = 224):
    """The audio front end's and the frame sampler's flags, with a data set's defaults."""
    from absl import flags

    flags.DEFINE_integer("num_frames", num_frames, "Frames per clip.")
    flags.DEFINE_float("fps", fps, "Frame extraction rate before sampling.")
    flags.DEFINE_integer("frame_size", frame_size, "Stored frame height and width.")
    flags.DEFINE_integer("sample_rate", spec.sample_rate, "Audio sample rate.")
    flags.DEFINE_integer("n_fft", spec.n_fft, "STFT size.")
    flags.DEFINE_integer("hop", spec.hop, "STFT hop.")
    flags.DEFINE_integer("spec_frames", spec.num_frames, "Spectrogram frames.")


def audio_video_from_flags(values) -> dict:
    """``run()`` keywords from the flags :func:`define_audio_video_flags` defined."""
    spec = SpectrogramParams(values.sample_rate, values.n_fft, values.hop, values.spec_frames)
    return {"num_frames": values.num_frames, "fps": values.fps, "frame_size": values.frame_size, "spec": spec}


def spectrogram(samples: np.ndarray, p: SpectrogramParams, where: str) -> np.ndarray:
    import librosa

    samples = np.asarray(samples, np.float32)
    if samples.ndim != 1 or samples.size < p.n_fft // 4 or not np.all(np.isfinite(samples)):
        raise BadInput(where, f"audio is empty, too short ({samples.size} samples) or not finite")
    need = (p.num_frames - 1) * p.hop
    samples = np.tile(samples, int(np.ceil(need / samples.size)))[:need]
    spec = np.abs(librosa.stft(samples, n_fft=p.n_fft, hop_length=p.hop, center=True))
    out = np.log(spec + 1e-7).astype(np.float32)[..., None]
    if list(out.shape) != p.shape:
        raise BadInput(where, f"spectrogram shape {out.shape}, expected {p.shape}")
    return out


def load_wav_spectrogram(path: str, p: SpectrogramParams) -> np.ndarray:
    import librosa

    if not os.path.isfile(path):
        raise BadInput(path, "missing audio file")
    try:
        samples, _ = librosa.load(path, sr=p.sample_rate, mono=True)
    except Exception as e:  # soundfile / audioread raise many kinds
        raise BadInput(path, f"unreadable audio ({type(e).__name__}: {e})") from None
    return spectrogram(samples, p, path)


def _resize_rgb(frame: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).convert("RGB").resize((size, size), Image.BILINEAR), np.uint8)


def read_video(path: str, *, fps: float | None = 1.0, stream: str = "video"):
    """Decoded RGB frames ``[N, H, W, 3]`` uint8 (at ``fps`` if given) and the audio track if asked.

    With ``stream="audio"`` returns ``(mono samples float32, sample rate)`` instead.
    """
    import av

    if not os.path.isfile(path):
        raise BadInput(path, "missing video file")
    try:
        with av.open(path) as container:
            if stream == "audio":
                if not container.streams.audio:
                    raise BadInput(path, "no audio track")
                chunks, rate = [], None
                for frame in container.decode(audio=0):
                    x = frame.to_ndarray()
                    x = x.astype(np.float32)
                    if frame.format.name.startswith("s16"):
                        x = x / 32768.0
                    if x.ndim == 2:
                        # planar [channels, n] or packed [1, n * channels]
                        x = x.mean(0) if frame.format.is_planar else x.reshape(-1, len(frame.layout.channels)).mean(1)
                    chunks.append(x)
                    rate = frame.sample_rate
                if not chunks:
                    raise BadInput(path, "audio track has no samples")
                return np.concatenate(chunks), rate
            if not container.streams.video:
                raise BadInput(path, "no video stream")
            frames, times = [], []
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else len(times))
            if frames:
                _check_complete(path, container, times)
    except BadInput:
        raise
    except Exception as e:  # av.error.* and friends
        raise BadInput(path, f"unreadable video ({type(e).__name__}: {e})") from None
    if not frames:
        raise BadInput(path, "video has no frames")
    frames = np.stack(frames)
    if fps:
        # one frame per 1/fps seconds, as the field's ffmpeg -r extraction does
        grid = np.arange(times[0], times[-1] + 1e-9, 1.0 / fps)
        idx = np.unique(np.clip(np.searchsorted(times, grid), 0, len(frames) - 1))
        frames = frames[idx]
    return frames


def _check_complete(path: str, container, times: list[float]) -> None:
    """A video that decodes to much less than its declared duration is truncated (a cut download):
    frames sampled from the part that decodes would be labelled with the whole clip's class."""
    vs = container.streams.video[0]
    if vs.duration is not None and vs.time_base is not None:
        declared = float(vs.duration * vs.time_base)
    elif container.duration is not None:
        declared = container.duration / 1e6  # microseconds (av.time_base)
    else:
        return
    rate = float(vs.average_rate or vs.guessed_rate or 0) or None
    frame = 1.0 / rate if rate else 0.0
    decoded = times[-1] - times[0] + frame
    if decoded < declared - max(0.1 * declared, 2 * frame):
        raise BadInput(path, f"decodes {decoded:.2f} s of the {declared:.2f} s the container declares "
                             "(truncated file?)")


def sample_uniform(frames: np.ndarray, num: int, where: str) -> np.ndarray:
    """``num`` frames spread evenly over the clip (the paper: 3 of the extracted frames)."""
    if len(frames) < 1:
        raise BadInput(where, "no frames to sample")
    idx = np.linspace(0, len(frames) - 1, num).round().astype(int)
    return frames[idx]


def video_frames(path: str, *, num_frames: int, size: int, fps: float | None = 1.0) -> np.ndarray:
    frames = sample_uniform(read_video(path, fps=fps), num_frames, path)
    return np.stack([_resize_rgb(f, size) for f in frames])


def load_image(path: str, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise BadInput(path, "missing image")
    try:
        with Image.open(path) as im:
            return _resize_rgb(np.asarray(im.convert("RGB")), size)
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(path, f"unreadable image ({e})") from None


_TOKENIZERS: dict = {}


def tokenize(text: str, tokenizer_dir: str, max_length: int, pair: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask ``[max_length]`` int32 with the checkpoint folder's tokenizer (no hub access)."""
    if tokenizer_dir not in _TOKENIZERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        if not os.path.isdir(tokenizer_dir):
            raise BadInput(tokenizer_dir, "--tokenizer folder does not exist")
        _TOKENIZERS[tokenizer_dir] = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = _TOKENIZERS[tokenizer_dir](text, pair, padding="max_length", truncation=True, max_length=max_length)
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
