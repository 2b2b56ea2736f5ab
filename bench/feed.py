"""`s2t bench feed`: what keeping a GPU fed costs the CPUs, stage by stage, and the cores per GPU of each design.

Input: 10 s utterances of real speech (the demo corpus' clips joined with short pauses), written by libsndfile as
FLAC at 16 and 48 kHz, WAV, MP3 and Ogg Vorbis; a batch is --rows of them (a feature batch of the job).
Each stage is the job's own code, timed as CPU time of this process (torch on one thread: one core), best of
--repeats; figures are audio-seconds per CPU-second (or us of CPU per audio-second):

- decode: `pipeline.audio.load_audio` per format and rate;
- detector: `SileroVAD.speech_regions`, a batch a call; features: `FeatureExtractor.each` (24,000-frame budget);
- the CPU stage of each design: `ComputeFeatures.__call__` (decode, detector, features, the features column: the
  CPU-feature path, `--feature-stage separate`) and `DecodeAudio.__call__` (decode and the PCM column: the device
  path, the default with GPUs);
- hand-offs: the Arrow column each sends (PCM float32 or int16, features), the object store (a put by the CPU actor,
  a get by the GPU actor: with --ray a local Ray's `ray.put` / `ray.get`; by default what they do to an Arrow table
  without starting Ray, which a loaded machine may not manage in time: pickle protocol 5 with out-of-band buffers
  copied into shared memory, and loaded from it in place), and the GPU actor's unpacking;
- the GPU actor's host work per audio-second on the device path, measured here as well as a CPU can: the unpacking
  (`pcm_rows`), the host side of the copy to the device (a memcpy of the bytes: what the driver does for pageable
  memory), and the launching of the detector's and the features' operations (`launching`: the device path's own
  code on CPU with very short rows, extrapolated to rows of no length), charged to the call's audio, and the
  regions' rules (silero-vad's `get_speech_timestamps_from_probs`, Python over each window's probability). The
  generation's own host work (CUDA graphs) is the model's, in `s2t bench model`.

Cores per GPU for a model running at --rtfx: rtfx x (CPU stage + put) + rtfx x the GPU actor's host work, per
audio-second. The last line: `feed: <the device path's CPU stage> audio-s per CPU-s per core; cores per GPU for
<rtfx> RTFx: <CPU-feature path> -> <device path>`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import soundfile
import soxr
import torch

from bench.decode import cpu_seconds
from s2t_model import DEMO_CORPUS, FeatureExtractor
from s2t_model.batching import CPU_MAX_FRAMES, GPU_MAX_FRAMES

RATE = 16000
FORMATS = [
    ("flac", 16000, "FLAC 16 kHz"),
    ("flac", 48000, "FLAC 48 kHz"),
    ("wav", 16000, "WAV 16 kHz"),
    ("mp3", 16000, "MP3 16 kHz"),
    ("ogg", 16000, "Ogg Vorbis 16 kHz"),
]
TARGET_CPU_STAGE = 3500  # audio-s per CPU-s: the device path's CPU stage, 10 s 16 kHz FLAC
TARGET_HOST_US = 10.0  # us per audio-second: the GPU actor's host work on the device path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=32, help="10 s utterances in a batch (the job's feature batch)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each utterance")
    parser.add_argument("--gpu-rows", type=int, default=768, help="rows a GPU actor's call gets (the job's default)")
    parser.add_argument("--rtfx", type=float, default=20000.0, help="the model's RTFx on one GPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each stage; the best one counts")
    parser.add_argument(
        "--ray",
        action="store_true",
        help="time the object store with a local Ray's ray.put / ray.get (default: Ray's own steps "
        "without Ray: pickle protocol 5, the buffers copied into shared memory)",
    )


def utterances(count: int, seconds: float) -> list[np.ndarray]:
    """`count` utterances of `seconds` each: demo clips joined with 0.3 s pauses, each starting at another clip."""
    with open(os.path.join(DEMO_CORPUS, "manifest.jsonl"), encoding="utf-8") as f:
        paths = [os.path.join(DEMO_CORPUS, json.loads(line)["audio_filepath"]) for line in f if line.strip()]
    clips = [soundfile.read(p, dtype="float32")[0] for p in paths]
    n, pause = int(seconds * RATE), np.zeros(int(0.3 * RATE), np.float32)
    out = []
    for i in range(count):
        parts, total, j = [], 0, i
        while total < n:
            parts += [clips[j % len(clips)], pause]
            total += len(parts[-2]) + len(pause)
            j += 1
        out.append(np.concatenate(parts)[:n])
    return out


def write_files(folder: str, waves: list[np.ndarray]) -> dict[str, list[str]]:
    """Each format's files (by label); a format libsndfile cannot write here is left out, with a note."""
    files = {}
    for kind, rate, label in FORMATS:
        paths = []
        try:
            for i, wave in enumerate(waves):
                path = os.path.join(folder, f"u{i:03d}-{rate}.{kind}")
                soundfile.write(path, soxr.resample(wave, RATE, rate) if rate != RATE else wave, rate)
                paths.append(path)
        except Exception as error:  # an old libsndfile without MP3, say
            print(f"({label}: not measured, libsndfile cannot write it here: {error})")
            continue
        files[label] = paths
    return files


def table(paths: list[str]) -> pa.Table:
    n = len(paths)
    return pa.table(
        {
            "id": [f"u{i}" for i in range(n)],
            "audio": paths,
            "offset_s": [0.0] * n,
            "duration_s": pa.array([None] * n, pa.float64()),
            "error": pa.array([None] * n, pa.string()),
            "tgt_lang": pa.array([None] * n, pa.string()),
        }
    )


def stage_options():
    from pipeline.stages import FeatureOptions

    return FeatureOptions(
        feature_config=FeatureExtractor().to_dict(), min_duration_s=0.1, max_duration_s=60.0, max_frames=CPU_MAX_FRAMES
    )


def main(args) -> None:
    from pipeline.audio import load_audio
    from pipeline.gpu_stage import DecodeAudio, pcm_column, pcm_rows
    from pipeline.stages import ComputeFeatures, features_column
    from s2t_model.speech2text import pad_features
    from s2t_model.vad import regions_from_probs, shared_vad, speech_features

    torch.set_num_threads(1)
    waves = utterances(args.rows, args.seconds)
    audio_s = args.rows * args.seconds
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, 1 thread; {os.cpu_count()} cores, load average {load:.1f} (figures are CPU "
        f"time: load inflates them less than wall time); batches of {args.rows} x {args.seconds:g} s of speech"
    )
    rates: dict[str, float] = {}  # audio-s per CPU-s
    us: dict[str, float] = {}  # us of CPU per audio-second (hand-offs)

    def timed(name: str, fn, seconds: float = audio_s) -> float:
        rates[name] = seconds / cpu_seconds(fn, args.repeats)
        return rates[name]

    with tempfile.TemporaryDirectory(prefix="s2t-bench-feed-") as folder:
        files = write_files(folder, waves)
        for label, paths in files.items():
            timed(f"decode {label}", lambda paths=paths: [load_audio(p, RATE) for p in paths])
        vad = shared_vad()
        extractor = FeatureExtractor()
        timed("detector (Silero VAD)", lambda: vad.speech_regions(waves))
        timed("features (fbank + CMVN)", lambda: extractor.each(waves, RATE, CPU_MAX_FRAMES))
        flac = table(files["FLAC 16 kHz"])
        cpu_stage, decode_stage = ComputeFeatures(stage_options()), DecodeAudio(stage_options())
        timed("CPU-feature path: ComputeFeatures", lambda: cpu_stage(flac))
        timed("device path: DecodeAudio", lambda: decode_stage(flac))
        if "FLAC 48 kHz" in files:
            flac48 = table(files["FLAC 48 kHz"])
            timed("CPU-feature path, 48 kHz FLAC", lambda: cpu_stage(flac48))
            timed("device path, 48 kHz FLAC", lambda: decode_stage(flac48))

        # Hand-offs, each per audio-second of a batch.
        features = [f.numpy() for f in extractor.each(waves, RATE, CPU_MAX_FRAMES)]
        sent = {
            "PCM float32": pa.table({"pcm": pcm_column(waves, np.float32)}),
            "PCM int16": pa.table({"pcm": pcm_column(waves, np.int16)}),
            "features": cpu_stage(flac).select(["features"]),
        }

        def per_audio_s(fn) -> float:
            return cpu_seconds(fn, args.repeats) / audio_s * 1e6

        us["column: PCM float32"] = per_audio_s(lambda: pcm_column(waves, np.float32))
        us["column: PCM int16"] = per_audio_s(lambda: pcm_column(waves, np.int16))
        us["column: features"] = per_audio_s(
            lambda: pa.array([f.reshape(-1) for f in features], pa.list_(pa.float32()))
        )
        for name, t in sent.items():
            staging = np.empty(t.nbytes, np.uint8)
            buffers = [b for b in t.column(0).chunks[0].flatten().buffers() if b is not None]
            us[f"host side of the copy to a GPU: {name}"] = per_audio_s(
                lambda buffers=buffers, staging=staging: [
                    np.copyto(staging[: b.size], np.frombuffer(b, np.uint8)) for b in buffers
                ]
            )
        us["GPU actor unpacks: PCM float32 (pcm_rows)"] = per_audio_s(
            lambda: pcm_rows(sent["PCM float32"].column(0), "cpu")
        )
        us["GPU actor unpacks: features (features_column + pad_features)"] = per_audio_s(
            lambda: pad_features(features_column(sent["features"], 80), torch.device("cpu"))
        )
        (object_store if args.ray else object_store_steps)(sent, us, per_audio_s)

        us["GPU actor launches detector + features ops"] = launching(args, extractor, vad, speech_features)
        probs = vad.speech_probs(waves)
        us["GPU actor applies the regions' rules (silero-vad's, on the host)"] = per_audio_s(
            lambda: [regions_from_probs(p, len(w)) for p, w in zip(probs, waves)]
        )

    report(args, rates, us)


def launching(args, extractor, vad, speech_features) -> float:
    """us per audio-second: the host's work to launch the device path's detector and features for a GPU call of
    --gpu-rows rows, measured as that code on CPU with rows of 40 and 80 ms (the same rows, batches and operations;
    the frame budget scaled to the same number of feature batches) and extrapolated to rows of no length, which
    takes out the arithmetic (it grows with the rows' length; the launching does not)."""
    from s2t_model.features import num_frames

    rows_per_batch = GPU_MAX_FRAMES // num_frames(int(args.seconds * RATE))
    times = []
    for length_s in (0.04, 0.08):
        rows = [torch.from_numpy(w) for w in utterances(args.gpu_rows, length_s)]
        budget = num_frames(int(length_s * RATE)) * rows_per_batch
        times.append(
            cpu_seconds(lambda: speech_features(extractor, rows, RATE, budget, vad, device="cpu"), args.repeats)
        )
    return max(0.0, 2 * times[0] - times[1]) / (args.gpu_rows * args.seconds) * 1e6


def object_store_steps(sent: dict[str, pa.Table], us: dict[str, float], per_audio_s) -> None:
    """A put and a get as Ray does them for an Arrow table, without Ray: pickle 5, buffers out of band, copied into
    shared memory (a put) and read back in place (a get)."""
    import mmap
    import pickle

    for name, t in sent.items():
        shared = mmap.mmap(-1, t.nbytes + (1 << 20))

        def put(t=t, shared=shared):
            buffers = []
            meta = pickle.dumps(t, protocol=5, buffer_callback=buffers.append)
            view, at = memoryview(shared), 0
            for b in buffers:
                raw = b.raw()
                view[at : at + raw.nbytes] = raw
                at += raw.nbytes
            return meta, [b.raw().nbytes for b in buffers]

        meta, sizes = put()
        us[f"object store put: {name}"] = per_audio_s(put)

        def get(meta=meta, sizes=sizes, shared=shared):
            view, at, buffers = memoryview(shared), 0, []
            for size in sizes:
                buffers.append(view[at : at + size])
                at += size
            return pickle.loads(meta, buffers=buffers)

        us[f"object store get: {name}"] = per_audio_s(get)


def object_store(sent: dict[str, pa.Table], us: dict[str, float], per_audio_s) -> None:
    """Ray's own put and get; best of 8 more runs each: a put into store memory not touched yet costs several times
    the steady one (page faults), which a long job pays once."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=1 << 30)
    try:
        for name, t in sent.items():
            us[f"object store put: {name}"] = min(per_audio_s(lambda t=t: ray.put(t)) for _ in range(8))
            ref = ray.put(t)
            us[f"object store get: {name}"] = per_audio_s(lambda ref=ref: ray.get(ref))
    finally:
        ray.shutdown()


def report(args, rates: dict[str, float], us: dict[str, float]) -> None:
    print(f"\n  {'stage (one core)':<44} {'audio-s per CPU-s':>18} {'us per audio-s':>15}")
    for name, rate in rates.items():
        print(f"  {name:<44} {rate:18,.0f} {1e6 / rate:15.1f}")
    print(f"\n  {'hand-off (one core)':<64} {'us per audio-s':>15}")
    for name, value in us.items():
        print(f"  {name:<64} {value:15.2f}")

    def put(name: str) -> float:
        return us.get(f"object store put: {name}", 0.0)

    def host(name: str, unpack: str, extra: float = 0.0) -> float:
        return (
            us.get(f"object store get: {name}", 0.0)
            + us[unpack]
            + us[f"host side of the copy to a GPU: {name}"]
            + extra
        )

    today_host = host("features", "GPU actor unpacks: features (features_column + pad_features)")
    device_host = host(
        "PCM float32",
        "GPU actor unpacks: PCM float32 (pcm_rows)",
        us["GPU actor launches detector + features ops"]
        + us["GPU actor applies the regions' rules (silero-vad's, on the host)"],
    )
    designs = [
        ("CPU-feature path (separate)", "CPU-feature path: ComputeFeatures", "features", today_host),
        ("device path (default with GPUs)", "device path: DecodeAudio", "PCM float32", device_host),
    ]
    print(f"\n  cores per GPU for {args.rtfx:,.0f} RTFx: CPU stage + its put, and the GPU actor's host work")
    cores = {}
    for name, stage, sent, host_us in designs:
        cpu_us = 1e6 / rates[stage] + put(sent)
        cores[name] = args.rtfx * (cpu_us + host_us) / 1e6
        line = (
            f"  {name:<32} CPU stage {cpu_us:6.1f} us + GPU actor host {host_us:5.2f} us per audio-s: "
            f"{cores[name]:5.1f} cores"
        )
        at48 = rates.get(stage.split(":")[0] + ", 48 kHz FLAC")
        if at48:
            line += f" ({args.rtfx * (1e6 / at48 + put(sent) + host_us) / 1e6:.1f} for 48 kHz FLAC)"
        print(line)
    stage_rate = rates["device path: DecodeAudio"]
    print(
        f"\n  targets: device path CPU stage {stage_rate:,.0f} >= {TARGET_CPU_STAGE:,} audio-s per CPU-s: "
        f"{'met' if stage_rate >= TARGET_CPU_STAGE else 'NOT met'}; GPU actor host work {device_host:.2f} <= "
        f"{TARGET_HOST_US:g} us per audio-s: {'met' if device_host <= TARGET_HOST_US else 'NOT met'}"
    )
    today, device = cores.values()
    print(
        f"feed: {stage_rate:.0f} audio-s per CPU-s per core; cores per GPU for {args.rtfx:.0f} RTFx: "
        f"{today:.1f} -> {device:.1f}"
    )
