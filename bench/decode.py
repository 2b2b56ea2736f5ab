"""`s2t bench decode`: decode speed per format, libsndfile and PyAV side by side in one run, and channel averaging.

The same audio (the bundled long-form recording, 134 s, at 48 kHz stereo where the codec takes it) is encoded in each
format with PyAV's own encoders (`encode_audio`, also what the tests make their files with), then decoded from memory
to mono float32 at the file's own rate by each decoder that reads it: libsndfile (`soundfile.read`, channels
averaged by `pipeline.audio.to_mono`) and PyAV (`pipeline.audio.PyAVAudio.read`). Speed is audio seconds per CPU
second of this process (one core: both decoders run in the calling thread). The decoder `pipeline.audio` uses for
each format is marked; a length that is not the file's (libsndfile on an mp3 without a Xing header) is shown.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import soundfile
import soxr

from s2t_model import DEMO_LONG_FORM


def encode_audio(
    samples: np.ndarray,
    rate: int,
    container: str,
    codec: str,
    out_rate: int | None = None,
    channels: int = 1,
    bit_rate: int | None = None,
    container_options: dict | None = None,
    codec_options: dict | None = None,
    video: str | None = None,
    cover: np.ndarray | None = None,
) -> bytes:
    """Mono float32 `samples` at `rate` -> the bytes of a file FFmpeg's muxer `container` writes with encoder
    `codec` (PyAV resamples to `out_rate` and the codec's sample format), `channels` copies of the signal. video: a
    video encoder for a small video track beside the audio (mp4, mov); cover: an RGB image stored as attached
    picture (mp3: ID3v2 APIC, as tagging tools store cover art)."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=container, options=container_options or {}) as muxer:
        layout = "mono" if channels == 1 else "stereo"
        stream = muxer.add_stream(codec, rate=out_rate or rate, options=codec_options or {})
        stream.layout = layout
        if bit_rate:
            stream.bit_rate = bit_rate
        if cover is not None:
            picture = muxer.add_stream("mjpeg")
            picture.width, picture.height, picture.pix_fmt = cover.shape[1], cover.shape[0], "yuvj420p"
            picture.disposition = av.stream.Disposition.attached_pic
            image = av.VideoFrame.from_ndarray(cover, format="rgb24").reformat(format="yuvj420p")
            for packet in [*picture.encode(image), *picture.encode(None)]:
                muxer.mux(packet)
        moving = None
        if video:
            moving = muxer.add_stream(video, rate=25)
            moving.width, moving.height, moving.pix_fmt = 64, 48, "yuv420p"
        planes = np.tile(np.asarray(samples, np.float32)[None, :], (channels, 1))
        rng, pts, shown = np.random.default_rng(0), 0, 0
        for start in range(0, planes.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planes[:, start : start + 1024]), format="fltp", layout=layout
            )
            frame.sample_rate, frame.pts = rate, pts
            pts += frame.samples
            for packet in stream.encode(frame):
                muxer.mux(packet)
            while moving is not None and shown * rate <= pts * 25:
                picture_frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), np.uint8), format="rgb24")
                picture_frame = picture_frame.reformat(format="yuv420p")
                picture_frame.pts = shown
                shown += 1
                for packet in moving.encode(picture_frame):
                    muxer.mux(packet)
        for packet in stream.encode(None):
            muxer.mux(packet)
        if moving is not None:
            for packet in moving.encode(None):
                muxer.mux(packet)
    return out.getvalue()


def sndfile_bytes(samples: np.ndarray, rate: int, format: str, subtype: str | None = None, channels: int = 1) -> bytes:
    out, frames = io.BytesIO(), np.tile(samples[:, None], (1, channels))
    with soundfile.SoundFile(out, "w", rate, channels, subtype, format=format) as sound:
        for start in range(0, len(frames), 8192):  # libsndfile's Vorbis encoder crashes on long writes at once
            sound.write(frames[start : start + 8192])
    return out.getvalue()


# name -> (make(samples at 48 kHz) -> bytes): the formats people keep audio in.
VBR_MP3 = dict(container_options={"write_xing": "0"}, codec_options={"flags": "+qscale", "global_quality": "472"})
FORMATS = {
    "wav 16-bit": lambda x: sndfile_bytes(x, 48000, "WAV", "PCM_16", channels=2),
    "flac 16-bit": lambda x: sndfile_bytes(x, 48000, "FLAC", "PCM_16", channels=2),
    "ogg vorbis": lambda x: sndfile_bytes(x, 48000, "OGG", "VORBIS", channels=2),
    "ogg opus": lambda x: encode_audio(x, 48000, "ogg", "libopus", channels=2, bit_rate=64000),
    "webm opus": lambda x: encode_audio(x, 48000, "webm", "libopus", channels=2, bit_rate=64000),
    "mp3 CBR (Xing header)": lambda x: encode_audio(x, 48000, "mp3", "libmp3lame", channels=2, bit_rate=128000),
    "mp3 VBR, no Xing header": lambda x: encode_audio(x, 48000, "mp3", "libmp3lame", channels=2, **VBR_MP3),
    "m4a AAC": lambda x: encode_audio(x, 48000, "ipod", "aac", channels=2, bit_rate=128000),
    "amr-nb (8 kHz)": lambda x: encode_audio(x, 48000, "amr", "libopencore_amrnb", out_rate=8000, bit_rate=12200),
    "wma v2": lambda x: encode_audio(x, 48000, "asf", "wmav2", channels=2, bit_rate=128000),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each decode; the best one counts")


def cpu_seconds(fn, repeats: int) -> float:
    """Best CPU time of this process over `repeats` runs after one warm-up (CPU time: other load on a shared
    machine slows a run's wall time, much less its CPU time); never 0, as it divides."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return max(best, 1e-9)


def by_libsndfile(data: bytes) -> np.ndarray:
    from pipeline.audio import to_mono  # here: encode_audio is the tests' encoder too, whatever pipeline.audio holds

    samples, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return to_mono(samples)


def by_pyav(data: bytes) -> np.ndarray:
    from pipeline.audio import PyAVAudio

    with PyAVAudio(io.BytesIO(data), "bench") as source:
        return source.read()


def chosen(data: bytes) -> str:
    from pipeline.audio import open_libsndfile, prefers_pyav

    sound, _ = open_libsndfile(io.BytesIO(data))
    if sound is None:
        return "PyAV"
    with sound:
        return "PyAV" if prefers_pyav(sound) else "libsndfile"


def main(args) -> None:
    import av

    from pipeline.audio import to_mono

    path = os.path.join(DEMO_LONG_FORM, "audio", "long-form-4-000.flac")
    samples, rate = soundfile.read(path, dtype="float32")
    samples = soxr.resample(samples, rate, 48000).astype(np.float32)
    seconds = len(samples) / 48000
    print(
        f"{seconds:.0f} s of audio (the long-form demo recording at 48 kHz, stereo but for amr); PyAV {av.__version__}"
        f" (FFmpeg {av.ffmpeg_version_info}), libsndfile {soundfile.__libsndfile_version__}; CPU seconds of one "
        f"process, best of {args.repeats}"
    )
    print(f"\n  {'format':<26} {'libsndfile':>12} {'PyAV':>12} {'PyAV/lsf':>9}  used        note  (audio s per CPU s)")
    for name, make in FORMATS.items():
        data = make(samples)
        speeds, lengths = {}, {}
        for side, decode in (("libsndfile", by_libsndfile), ("PyAV", by_pyav)):
            try:
                lengths[side] = len(decode(data))
            except Exception as error:  # this decoder cannot read this format: say so
                speeds[side] = f"{type(error).__name__}"
                continue
            speeds[side] = seconds / cpu_seconds(lambda: decode(data), args.repeats)
        note = ""
        if (
            "libsndfile" in lengths
            and "PyAV" in lengths
            and abs(lengths["libsndfile"] - lengths["PyAV"]) > 0.01 * lengths["PyAV"]
        ):
            rate_of = 8000 if "amr" in name else 48000
            note = f"libsndfile decodes {lengths['libsndfile'] / rate_of:.1f} s of {lengths['PyAV'] / rate_of:.1f}"
        cells = [
            f"{speeds[s]:12.0f}" if isinstance(speeds[s], float) else f"{speeds[s][:12]:>12}"
            for s in ("libsndfile", "PyAV")
        ]
        ratio = (
            f"{speeds['PyAV'] / speeds['libsndfile']:8.2f}x"
            if all(isinstance(speeds[s], float) for s in speeds)
            else f"{'':>9}"
        )
        print(f"  {name:<26} {cells[0]} {cells[1]} {ratio}  {chosen(data):<11} {note}")

    stereo = np.tile(samples[:, None], (1, 2))
    mean_s = cpu_seconds(lambda: stereo.mean(axis=1), args.repeats)
    ours_s = cpu_seconds(lambda: to_mono(stereo), args.repeats)
    print(
        f"\nChannel averaging, 48 kHz stereo: mean(axis=1) {1e6 * mean_s / seconds:.0f} us per audio second, "
        f"to_mono {1e6 * ours_s / seconds:.0f} us ({mean_s / ours_s:.1f}x faster, the same numbers: "
        f"{np.array_equal(stereo.mean(axis=1), to_mono(stereo))})"
    )
