"""`s2t bench words`: word timestamps against true word boundaries, and a ranking of heads for choosing them.

Utterances whose word times are known: spoken numbers drawn and rendered as the demo corpus does them (voices,
speed, pitch, word gaps, level, noise), synthesized by libespeak-ng itself, whose word events say at which sample
each word starts. The demo model never heard these numbers said in these voices (new seeds).

Two sets from two seeds: heads are ranked on the first (`rank_heads`) and the error is measured on the second, so
the figures are not fitted to the utterances they are reported on. Errors are |start| and |end| in ms, median and
90th percentile, over the words of utterances whose decoded words equal the reference (the rest are counted), and
over every word when the reference tokens are aligned instead (forced alignment).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import soxr
import torch

from demo.corpus import SAMPLE_RATE, Utterance, colored_noise, spoken, texts
from s2t_model import DEMO_MODEL, Speech2Text
from s2t_model.alignment import MEDIAN_FILTER_WIDTH, rank_heads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEMO_MODEL, help="checkpoint to measure (default: the demo model)")
    parser.add_argument(
        "--random-small",
        action="store_true",
        help="measure a random-weight model of "
        "s2t-small-librispeech-asr's dimensions (with the demo tokenizer) instead",
    )
    parser.add_argument("--utterances", type=int, default=30, help="utterances in the measured set")
    parser.add_argument("--rank-utterances", type=int, default=12, help="utterances in the set heads are ranked on")
    parser.add_argument("--top", type=int, default=3, help="best-ranked heads to use")
    parser.add_argument("--heads", default=None, help="heads to use, 'layer:head,...' (default: rank and take --top)")
    parser.add_argument("--filter-width", type=int, default=MEDIAN_FILTER_WIDTH)
    parser.add_argument("--method", choices=("peak", "dtw"), default="peak", help="how frames are read (token_frames)")
    parser.add_argument("--seed", type=int, default=2, help="seed of the measured set (the ranking set: seed + 1000)")


class Espeak:
    """libespeak-ng through ctypes, for its word events: where each word starts in the samples it synthesizes."""

    WORD, LIST_TERMINATED, SYNCHRONOUS, RATE, PITCH, WORDGAP = 1, 0, 2, 1, 3, 7

    def __init__(self):
        import ctypes

        class Event(ctypes.Structure):  # espeak_EVENT of speak_lib.h
            _fields_ = [
                ("type", ctypes.c_int),
                ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int),
                ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int),
                ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p),
                ("id", ctypes.c_char * 8),
            ]

        self.lib = ctypes.CDLL("libespeak-ng.so.1")
        self.rate = self.lib.espeak_Initialize(self.SYNCHRONOUS, 0, None, 0)
        if self.rate <= 0:
            raise RuntimeError("espeak-ng did not initialize (apt-get install espeak-ng)")
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[int, int]] = []

        @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))
        def collect(wav, count, events):
            if count > 0:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
            i = 0
            while events[i].type != self.LIST_TERMINATED:
                if events[i].type == self.WORD:
                    self.events.append((events[i].text_position, events[i].sample))
                i += 1
            return 0

        self.callback = collect  # kept alive as long as the library may call it
        self.lib.espeak_SetSynthCallback(collect)

    def say(self, text: str, voice: str, speed: int, pitch: int, word_gap: int) -> tuple[np.ndarray, list[int]]:
        """-> the waveform (float32 at self.rate) and the first sample of each word (text order)."""
        self.chunks, self.events = [], []
        self.lib.espeak_SetVoiceByName(voice.encode())
        for parameter, value in ((self.RATE, speed), (self.PITCH, pitch), (self.WORDGAP, word_gap)):
            self.lib.espeak_SetParameter(parameter, value, 0)
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        wave = np.concatenate(self.chunks).astype(np.float32) / 32768
        return wave, [sample for _, sample in sorted(self.events)]


_ESPEAK: Espeak | None = None


def known_words(seed: int, index: int) -> tuple[np.ndarray, list[tuple[float, float, str]], str] | None:
    """One utterance as the demo corpus makes them (demo/corpus.py: 1-3 numbers, varied voice, speed, pitch, word
    gap, level, noise) -> 16 kHz waveform, each word's (true start s, true end s, word) and the reference; None when
    espeak-ng's word events do not match the words. A start is espeak-ng's word event; an end is the word's last
    sample above -60 dBFS before the next word starts."""
    global _ESPEAK
    _ESPEAK = _ESPEAK or Espeak()
    utt = Utterance.draw(seed, index)
    voice = utt.voice + (f"+{utt.variant}" if utt.variant else "")
    speech, starts = _ESPEAK.say(spoken(utt.numbers), voice, utt.speed, utt.pitch, utt.word_gap)
    reference = texts(utt.numbers)["text"]
    words = reference.split()
    if len(starts) != len(words):
        return None
    rate = _ESPEAK.rate
    bounds = starts[1:] + [len(speech)]
    ends = []
    for a, b in zip(starts, bounds):
        voiced = np.flatnonzero(np.abs(speech[a:b]) > 1e-3)
        ends.append(a + (voiced[-1] + 1 if len(voiced) else 0))
    speech = soxr.resample(speech, rate, SAMPLE_RATE, quality="HQ").astype(np.float64)
    speech *= 10 ** (utt.level_db / 20) / max(float(np.sqrt(np.mean(speech**2))), 1e-12)
    lead = round(utt.lead_s * SAMPLE_RATE)
    audio = np.concatenate([np.zeros(lead), speech, np.zeros(round(utt.trail_s * SAMPLE_RATE))])
    audio += colored_noise(np.random.default_rng(utt.noise_seed), len(audio), utt.noise) * 10 ** (
        (utt.level_db - utt.snr_db) / 20
    )
    audio *= min(1.0, 0.99 / float(np.max(np.abs(audio))))
    truth = [(utt.lead_s + a / rate, utt.lead_s + e / rate, word) for a, e, word in zip(starts, ends, words)]
    return audio.astype(np.float32), truth, reference


def known_set(seed: int, count: int) -> list[tuple[np.ndarray, list[tuple[float, float, str]], str]]:
    """`count` utterances of `known_words` (indices whose events do not match are passed over)."""
    out, index = [], 0
    while len(out) < count:
        utterance = known_words(seed, index)
        if utterance is not None:
            out.append(utterance)
        index += 1
    return out


def errors_ms(model: Speech2Text, utterances, forced: bool) -> tuple[list[float], list[float], int]:
    """|start| and |end| errors (ms) of every word compared, and the utterances left out (decoded words differ)."""
    waves = [wave for wave, _, _ in utterances]
    features = model.features(waves, SAMPLE_RATE)
    if forced:
        ids = [model.tokenizer.encode(reference) for _, _, reference in utterances]
        results = model.align_ids(features, ids)
    else:
        results = model.transcribe_features(features, word_timestamps=True)
    starts, ends, skipped = [], [], 0
    for result, (_, truth, _) in zip(results, utterances):
        if [w.word for w in result.words] != [word for _, _, word in truth]:
            skipped += 1
            continue
        starts += [abs(w.start_s - t[0]) * 1000 for w, t in zip(result.words, truth)]
        ends += [abs(w.end_s - t[1]) * 1000 for w, t in zip(result.words, truth)]
    return starts, ends, skipped


def best_time(work, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def figures(values: list[float]) -> str:
    if not values:
        return "no words"
    return f"median {np.median(values):6.0f} ms  p90 {np.percentile(values, 90):6.0f} ms"


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        uri = args.model
        if args.random_small:
            from bench.model import random_checkpoint

            random_checkpoint(folder, DEMO_MODEL)
            uri = folder
        model = Speech2Text.from_pretrained(uri)
    model.config.extra["alignment_method"] = args.method
    model.config.extra["alignment_filter_width"] = args.filter_width
    ranking_set = known_set(args.seed + 1000, args.rank_utterances)
    measured = known_set(args.seed, args.utterances)
    print(f"synthesized {len(ranking_set)} + {len(measured)} utterances in {time.perf_counter() - t0:.0f} s")
    if args.heads:
        heads = [tuple(int(x) for x in pair.split(":")) for pair in args.heads.split(",")]
    else:
        features = model.features([wave for wave, _, _ in ranking_set], SAMPLE_RATE)
        examples = [
            (f, model.tokenizer.encode(reference), [t[0] for t in truth])
            for f, (_, truth, reference) in zip(features, ranking_set)
        ]
        ranked = rank_heads(model, examples, args.filter_width)
        print(
            "heads by median |start error| on the ranking set (layer:head ms):",
            " ".join(f"{layer}:{head} {err * 1000:.0f}" for (layer, head), err in ranked),
        )
        heads = [head for head, _ in ranked[: args.top]]
    model.config.extra["alignment_heads"] = [list(h) for h in heads]
    model.config.extra["alignment_filter_width"] = args.filter_width
    model.config.extra["alignment_method"] = args.method
    print(
        f"model {'random s2t-small' if args.random_small else uri}; heads {heads}; filter {args.filter_width}; "
        f"method {args.method}"
    )
    features = model.features([wave for wave, _, _ in measured], SAMPLE_RATE)
    plain = best_time(lambda: model.transcribe_features(features))
    timed = best_time(lambda: model.transcribe_features(features, word_timestamps=True, logprobs=True))
    print(
        f"cost: beam-{model.config.num_beams} decoding {plain:.2f} s, with words and logprobs {timed:.2f} s "
        f"({timed / plain:.2f}x; best of 2, same run)"
    )
    for forced in (False, True):
        starts, ends, skipped = errors_ms(model, measured, forced)
        name = "reference tokens (forced)" if forced else "decoded words          "
        print(
            f"{name}: {len(starts):4d} words ({skipped} utterances left out): start {figures(starts)};"
            f" end {figures(ends)}"
        )
