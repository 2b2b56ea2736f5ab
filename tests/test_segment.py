"""s2t_model.segment (Silero VAD segments) on the bundled long-form recordings (true utterance times in their
manifest), on demo clips joined by digital silence or by noise, on non-speech, and on a synthetic hour streamed in
blocks with bounded memory."""

import json
import os
import tracemalloc

import jiwer
import numpy as np
import pytest
import soundfile
import soxr
from helpers import demo_rows, non_speech

from s2t_model import DEMO_CORPUS, DEMO_LONG_FORM, DEMO_MODEL, Segment, Speech2Text, find_segments, segment_stream

SR = 16000
MAX_S = 20.0
# A boundary may lie this far into a true utterance: into the clip's own leading or trailing silence (up to ~0.5 s in
# the bundled recordings), where the VAD's segment starts 150 ms before the speech itself.
TOLERANCE_S = 0.45


def read_rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def recordings() -> list[tuple[dict, np.ndarray]]:
    """(manifest row, samples) of both long-form recordings."""
    rows = read_rows(DEMO_LONG_FORM)
    return [
        (row, soundfile.read(os.path.join(DEMO_LONG_FORM, row["audio_filepath"]), dtype="float32")[0]) for row in rows
    ]


def pauses(row: dict) -> list[tuple[float, float]]:
    """The true pauses: before the first utterance, between each two, after the last."""
    times = [(u["start_s"], u["end_s"]) for u in row["segments"]]
    ends = [0.0] + [end for _, end in times]
    starts = [start for start, _ in times] + [row["duration"] + 1.0]
    return list(zip(ends, starts))


def boundary_error(t: float, row: dict) -> float:
    """Seconds from `t` to the nearest true pause (0 inside one)."""
    return min(max(0.0, start - t, t - end) for start, end in pauses(row))


def check_against_truth(segments: list[Segment], row: dict) -> float:
    """Asserts the segments respect the true utterances; returns the largest boundary error in seconds."""
    assert segments, row["id"]
    assert all(0 <= s.start < s.end for s in segments)
    assert all(a.end <= b.start for a, b in zip(segments, segments[1:])), "segments overlap or are out of order"
    assert max(s.duration_s for s in segments) <= MAX_S
    errors = [boundary_error(t, row) for s in segments for t in (s.start_s, s.end_s)]
    assert max(errors) <= TOLERANCE_S, f"{row['id']}: a boundary {max(errors):.2f} s into an utterance"
    for u in row["segments"]:  # no utterance is cut: each lies within one segment
        assert any(s.start_s <= u["start_s"] + TOLERANCE_S and u["end_s"] - TOLERANCE_S <= s.end_s for s in segments), (
            f"{row['id']}: utterance {u['start_s']:.2f}-{u['end_s']:.2f} s is cut"
        )
    # and, as the module chose, split at every clear pause: one segment per utterance
    assert len(segments) == len(row["segments"])
    return max(errors)


@pytest.mark.parametrize("index", [0, 1])
def test_boundaries_fall_in_pauses(recordings, index):
    row, audio = recordings[index]
    segments = find_segments(audio, SR, MAX_S)
    error = check_against_truth(segments, row)
    print(f"{row['id']}: {len(segments)} segments, largest boundary error {error:.3f} s")


@pytest.mark.parametrize("gain", [1 / 16, 4.0])
def test_any_loudness(recordings, gain):
    """24 dB quieter, or 12 dB louder and clipped: the same pauses are found."""
    for row, audio in recordings:
        check_against_truth(find_segments(np.clip(audio * gain, -1.0, 1.0), SR, MAX_S), row)


def test_streaming_gives_the_same_segments(recordings):
    row, audio = recordings[1]
    whole = find_segments(audio, SR, MAX_S)
    for size in (SR * 60, 12345):
        blocks = (audio[i : i + size] for i in range(0, len(audio), size))
        assert list(segment_stream(blocks, SR, MAX_S)) == whole, size
    start = audio[: 25 * SR]  # blocks shorter than a VAD window (a call each: slow, so 25 s of it)
    assert list(segment_stream((start[i : i + 400] for i in range(0, len(start), 400)), SR, MAX_S)) == find_segments(
        start, SR, MAX_S
    )
    pcm = np.round(audio * 32767).astype(np.int16)  # int16 blocks, two channels: read as soundfile would give them
    stereo = np.stack([pcm, pcm], axis=1)
    assert len(list(segment_stream((stereo[i : i + SR * 7] for i in range(0, len(pcm), SR * 7)), SR))) == len(whole)
    # At another rate (resampled as it streams): the same segments within a VAD window or two (resampling moves the
    # samples a little, and so the probabilities).
    at_44k = soxr.resample(audio, SR, 44100)
    resampled = list(segment_stream((at_44k[i : i + 44100 * 7] for i in range(0, len(at_44k), 44100 * 7)), 44100))
    assert len(resampled) == len(whole)
    assert all(abs(a.start_s - b.start_s) <= 0.07 and abs(a.end_s - b.end_s) <= 0.07 for a, b in zip(resampled, whole))


@pytest.fixture(scope="module")
def model():
    return Speech2Text.from_pretrained(DEMO_MODEL)


def test_long_form_wer(recordings, model):
    """Segments transcribed and joined lose at most 2 WER points against the true utterances one by one."""
    cut, found, spans = [], [], []
    for row, audio in recordings:
        segments = find_segments(audio, SR, MAX_S)
        spans.append((len(cut), len(row["segments"]), len(found), len(segments)))
        cut += [audio[round(u["start_s"] * SR) : round(u["end_s"] * SR)] for u in row["segments"]]
        found += [audio[s.start : s.end] for s in segments]
    by_truth = model.transcribe(cut, sampling_rate=SR, num_beams=5)
    by_segments = model.transcribe(found, sampling_rate=SR, num_beams=5)
    for (row, _), (a, n, b, m) in zip(recordings, spans):
        truth_wer = jiwer.wer(row["text"], " ".join(by_truth[a : a + n]))
        segments_wer = jiwer.wer(row["text"], " ".join(by_segments[b : b + m]))
        print(f"{row['id']}: WER {100 * segments_wer:.2f}% segmented, {100 * truth_wer:.2f}% true utterances")
        assert segments_wer <= truth_wer + 0.02


@pytest.mark.parametrize("pause", ["zeros", "noise"])
def test_clips_joined_by_digital_silence_or_noise(model, pause):
    """Demo clips joined by 0.5-1.5 s of exact zeros or of -40 dBFS pink noise: within 2 WER points of the clips one
    by one (the energy segmenter this replaced: 16 % where the clips give 6 %, on noise)."""
    rng = np.random.default_rng(0)
    rows = demo_rows(20)
    clips = [soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in rows]
    noise = non_speech(3.0)["pink--40dB"]
    parts = []
    for clip in clips:
        gap = round(rng.uniform(0.5, 1.5) * SR)
        parts += [np.zeros(gap, np.float32) if pause == "zeros" else np.resize(noise, gap), clip]
    audio = np.concatenate(parts)
    segments = find_segments(audio, SR, MAX_S)
    reference = " ".join(r["text"] for r in rows)
    clips_wer = jiwer.wer(reference, " ".join(model.transcribe(clips, SR, num_beams=5)))
    joined_wer = jiwer.wer(
        reference, " ".join(model.transcribe([audio[s.start : s.end] for s in segments], SR, num_beams=5))
    )
    print(f"{pause} pauses: {len(segments)} segments, WER {100 * joined_wer:.2f}% vs clips {100 * clips_wer:.2f}%")
    assert len(segments) == len(clips) and joined_wer <= clips_wer + 0.02


def test_speech_without_clear_pauses_is_cut_within_max_segment_s(recordings):
    """Two recordings back to back, pauses shortened to 0.15 s (less than a split pause): still cut, nothing over
    max_segment_s, every true utterance's middle inside a segment."""
    pieces, middles, position = [], [], 0
    for row, audio in recordings:
        for u in row["segments"]:
            clip = audio[round(u["start_s"] * SR) : round(u["end_s"] * SR)]
            pieces += [clip, np.zeros(round(0.15 * SR), np.float32) + 1e-4]
            middles.append((position + len(clip) / 2) / SR)
            position += len(clip) + round(0.15 * SR)
    segments = find_segments(np.concatenate(pieces), SR, MAX_S)
    assert max(s.duration_s for s in segments) <= MAX_S and len(segments) < len(middles)
    assert all(any(s.start_s <= m <= s.end_s for s in segments) for m in middles)


def test_non_speech_and_silence_have_no_segments():
    for name, audio in non_speech(30.0).items():
        assert find_segments(audio, SR) == [], name


def test_short_and_bad_input():
    assert find_segments(np.zeros(100, np.float32), SR) == []
    with pytest.raises(ValueError):
        find_segments(np.zeros((10, 2, 2), np.float32), SR)
    with pytest.raises(ValueError):
        find_segments(np.zeros(100, np.int32), SR)
    with pytest.raises(ValueError):
        find_segments(np.zeros(100, np.float32), SR, max_segment_s=0.5)


# ------------------------------------------------------------------------------------------------- one hour

HOUR = 3600 * SR
BLOCK = 60 * SR  # as the batch job reads: soundfile blocks of a minute
TONE_AT, SILENCE_AT = 200, 400  # after this many clips: a 50 s tone (no speech: no segment), 5 min of silence


def hour_of_pieces(clips: list[np.ndarray], rng: np.random.Generator):
    """(kind, samples) pieces, without end: the demo clips in turn, each followed by a pause of 0.5-1.5 s of
    -60 dBFS noise; after clip TONE_AT a 50 s tone, after clip SILENCE_AT five minutes of the pauses' noise."""

    def noise(seconds: float) -> np.ndarray:
        return (rng.standard_normal(round(seconds * SR)) * 1e-3).astype(np.float32)

    for k in range(10**6):
        if k == TONE_AT:
            yield "tone", (0.1 * np.sin(2 * np.pi * 440.0 * np.arange(50 * SR) / SR)).astype(np.float32)
        elif k == SILENCE_AT:
            for _ in range(5):
                yield "silence", noise(60.0)
        else:
            yield "clip", clips[k % len(clips)]
        yield "pause", noise(rng.uniform(0.5, 1.5))


def hour_blocks(clips: list[np.ndarray], counts: dict):
    """One hour in BLOCK-sized blocks, made as they are consumed; `counts` says how many pieces of each kind went in."""
    pending, held, sent = [], 0, 0
    for kind, piece in hour_of_pieces(clips, np.random.default_rng(0)):
        if sent + held + len(piece) > HOUR:
            break
        counts[kind] = counts.get(kind, 0) + 1
        pending.append(piece)
        held += len(piece)
        while held >= BLOCK:
            joined = np.concatenate(pending)
            yield joined[:BLOCK]
            pending, held, sent = [joined[BLOCK:]], held - BLOCK, sent + BLOCK
    if held:
        yield np.concatenate(pending)


def test_one_hour_streamed_in_bounded_memory():
    clips = [
        soundfile.read(os.path.join(DEMO_CORPUS, r["audio_filepath"]), dtype="float32")[0]
        for r in read_rows(DEMO_CORPUS)
    ]
    assert max(len(c) for c in clips) < MAX_S * SR
    counts: dict = {}
    tracemalloc.start()
    try:
        segments = list(segment_stream(hour_blocks(clips, counts), SR, MAX_S))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    hour_bytes = HOUR * 4  # float32
    print(
        f"one hour: {counts}, {len(segments)} segments, tracemalloc peak {peak / 1e6:.1f} MB "
        f"(the hour as float32: {hour_bytes / 1e6:.0f} MB)"
    )
    assert counts["tone"] == 1 and counts["silence"] == 5
    # every clip one segment (each is followed by a clear pause), and none for the tone
    assert len(segments) == counts["clip"]
    assert max(s.duration_s for s in segments) <= MAX_S
    assert all(a.end <= b.start for a, b in zip(segments, segments[1:]))
    assert peak < 50e6
