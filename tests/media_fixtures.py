"""Writers for tiny raw-layout fixtures in the real file formats (wav via soundfile, video via PyAV, jpg via PIL)."""
import fractions

import av
import numpy as np
import soundfile as sf
from PIL import Image

VIDEO_CODECS = {".flv": "flv", ".mp4": "mpeg4", ".avi": "mpeg4"}


def write_wav(path, seconds=1.0, rate=16000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)


def write_video(path, num_frames=12, size=(48, 64), fps=4, seed=0, audio_seconds=None, gray=False):
    """A small video whose frame i is filled with value 20 * i (so frame sampling is checkable)."""
    path = str(path)
    ext = path[path.rfind("."):]
    with av.open(path, "w") as out:
        stream = out.add_stream(VIDEO_CODECS[ext], rate=fps)
        stream.width, stream.height = size[1], size[0]
        stream.pix_fmt = "yuv420p"
        audio = None
        if audio_seconds:
            audio = out.add_stream("aac" if ext == ".mp4" else "mp3", rate=22050)
        for i in range(num_frames):
            img = np.full((size[0], size[1], 3), (20 * i) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if audio is not None:
            rate = 22050
            t = np.arange(int(audio_seconds * rate)) / rate
            samples = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
            step = audio.codec_context.frame_size or 1024
            for k in range(0, len(samples) - step + 1, step):
                af = av.AudioFrame.from_ndarray(samples[None, k:k + step], format="fltp", layout="mono")
                af.sample_rate = rate
                af.pts = k
                af.time_base = fractions.Fraction(1, rate)
                for packet in audio.encode(af):
                    out.mux(packet)
            for packet in audio.encode():
                out.mux(packet)


def write_jpg(path, size=(40, 50), value=128):
    Image.fromarray(np.full((size[0], size[1], 3), value, np.uint8)).save(str(path), "JPEG")
