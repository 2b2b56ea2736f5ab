"""`s2t bench vad`: speech detection's throughput on one core, its forms side by side, and its share of the job's time.

Forms of the same Silero VAD model on the same audio (the demo corpus, one row per clip):
- ours (`s2t_model.vad.SileroVAD`): the encoder over every window of every row in one call, `nn.LSTM` across rows;
- the package's JIT model the plain way (`get_speech_timestamps`: one 512-sample window per call), on a few clips;
- the package's JIT model with every row as one stream of a (rows, 512) batch per call;
- the package's sequence ONNX model (one call per 512 windows of a row), when onnxruntime is installed.
Share: the VAD's time against features + beam-5 generation on the same audio, with the demo model and with a
random-weight model of facebook/s2t-small-librispeech-asr's dimensions.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import soundfile
import torch

from bench.model import best_times, print_table, random_checkpoint
from s2t_model import DEMO_MODEL, Speech2Text
from s2t_model.batching import frame_budget_batches
from s2t_model.speech2text import pad_features
from s2t_model.vad import WINDOW, SileroVAD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", type=int, default=50, help="demo corpus clips (rows) to use")
    parser.add_argument("--plain-clips", type=int, default=4, help="clips for the one-window-per-call form (slow)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the best one counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: per core)")


def demo_audio(count: int) -> list[np.ndarray]:
    import json
    import os

    from s2t_model import DEMO_CORPUS

    with open(os.path.join(DEMO_CORPUS, "manifest.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()][:count]
    return [soundfile.read(os.path.join(DEMO_CORPUS, r["audio_filepath"]), dtype="float32")[0] for r in rows]


def package_forms(waves: list[np.ndarray], plain: list[np.ndarray]) -> list[tuple[str, object, str, float]]:
    """(name, function, note, audio seconds it covers) for the silero-vad package's own ways of running the model."""
    threads = torch.get_num_threads()
    from silero_vad import get_speech_timestamps, load_silero_vad  # its import sets torch's threads to 1

    jit = load_silero_vad()
    torch.set_num_threads(threads)

    def run_plain():
        for wave in plain:
            get_speech_timestamps(torch.from_numpy(wave), jit, sampling_rate=16000)

    streams = np.zeros((len(waves), -(-max(map(len, waves)) // WINDOW) * WINDOW), np.float32)
    for row, wave in zip(streams, waves):
        row[: len(wave)] = wave

    def run_streams():
        jit.reset_states()
        batch = torch.from_numpy(streams)
        for start in range(0, streams.shape[1], WINDOW):
            jit(batch[:, start : start + WINDOW], 16000)

    seconds = sum(map(len, waves)) / 16000
    forms = [
        (
            "silero-vad JIT, one window a call",
            run_plain,
            f"{len(plain)} clips, get_speech_timestamps",
            sum(map(len, plain)) / 16000,
        ),
        ("silero-vad JIT, rows as streams", run_streams, f"({len(waves)}, 512) a call, padded to the longest", seconds),
    ]
    try:
        sequence = load_silero_vad(sequence=True)
        forms.append(
            (
                "silero-vad sequence ONNX",
                lambda: [sequence.audio_forward(w) for w in waves],
                "one call per 512 windows of a row",
                seconds,
            )
        )
    except ImportError:
        print("(onnxruntime is not installed: the ONNX forms are not measured)")
    return forms


def transcription_time(folder: str, waves: list[np.ndarray], repeats: int) -> float:
    """Features and beam-5 generation in the job's frame-budgeted batches (ids only: a random model has no vocab)."""
    model = Speech2Text.from_pretrained(folder)

    def transcribe():
        features = model.features(waves, 16000)
        for batch in frame_budget_batches([len(f) for f in features], 24000):
            model.generate(*pad_features([features[i] for i in batch], model.device), num_beams=5, max_new_tokens=60)

    return best_times([transcribe], repeats, "cpu")[0]


def main(args) -> None:
    torch.set_num_threads(args.threads)
    waves = demo_audio(args.clips)
    seconds = sum(map(len, waves)) / 16000
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {len(waves)} demo clips, {seconds:.0f} s")
    ours = SileroVAD.load()
    sides = [("s2t_model.vad.SileroVAD", lambda: ours.speech_probs(waves), "all rows in one call", seconds)]
    sides += package_forms(waves, waves[: args.plain_clips])
    times = best_times([fn for _, fn, _, _ in sides], args.repeats, "cpu")
    rows = [(name, t * seconds / audio, note, audio / t) for (name, _, note, audio), t in zip(sides, times)]
    print_table("Speech detection (seconds scaled to the same audio)", rows, "audio s / s")

    vad_s = times[0]
    print(f"\nShare of a row's time ({seconds:.0f} s of audio; features + beam-5 generation, max 60 new tokens):")
    with tempfile.TemporaryDirectory() as folder:
        random_checkpoint(folder)
        for name, path in (("demo model", DEMO_MODEL), ("s2t-small dimensions (random weights)", folder)):
            model_s = transcription_time(path, waves, max(1, args.repeats - 2))
            print(
                f"  {name:<40} model {model_s:8.2f} s, VAD {vad_s:6.3f} s: "
                f"VAD is {100 * vad_s / (vad_s + model_s):5.1f} % of the total"
            )
