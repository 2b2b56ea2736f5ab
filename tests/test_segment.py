"""s2t_model.segment on the bundled long-form recordings (true utterance times in their manifest), on audio without
pauses, and on a synthetic hour streamed in blocks with bounded memory."""

import json
import math
import os
import tracemalloc

import jiwer
import numpy as np
import pytest
import soundfile

from s2t_model import (DEMO_CORPUS, DEMO_LONG_FORM, DEMO_MODEL, Segment, Speech2Text, find_segments, segment_stream,
                       split_stream)

SR = 16000
MAX_S = 20.0
TOLERANCE_S = 0.3  # a boundary may lie this far into an utterance (its own leading or trailing silence)


def read_rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def recordings() -> list[tuple[dict, np.ndarray]]:
    """(manifest row, samples) of both long-form recordings."""
    rows = read_rows(DEMO_LONG_FORM)
    return [(row, soundfile.read(os.path.join(DEMO_LONG_FORM, row["audio_filepath"]), dtype="float32")[0])
            for row in rows]


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
        assert any(s.start_s <= u["start_s"] + TOLERANCE_S and u["end_s"] - TOLERANCE_S <= s.end_s
                   for s in segments), f"{row['id']}: utterance {u['start_s']:.2f}-{u['end_s']:.2f} s is cut"
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
    for size in (SR * 60, 12345, SR // 3, 400):
        blocks = (audio[i:i + size] for i in range(0, len(audio), size))
        assert list(segment_stream(blocks, SR, MAX_S)) == whole, size
    pcm = np.round(audio * 32767).astype(np.int16)  # int16 blocks, two channels: read as soundfile would give them
    stereo = np.stack([pcm, pcm], axis=1)
    assert len(list(segment_stream((stereo[i:i + SR * 7] for i in range(0, len(pcm), SR * 7)), SR))) == len(whole)
    pieces = list(split_stream((audio[i:i + 50000] for i in range(0, len(audio), 50000)), SR, MAX_S))
    assert [s for s, _ in pieces] == whole
    for segment, samples in pieces:
        np.testing.assert_array_equal(samples, audio[segment.start:segment.end])


@pytest.fixture(scope="module")
def model():
    return Speech2Text.from_pretrained(DEMO_MODEL)


def test_long_form_wer(recordings, model):
    """Segments transcribed and joined lose at most 2 WER points against the true utterances one by one."""
    cut, found, spans = [], [], []
    for row, audio in recordings:
        segments = find_segments(audio, SR, MAX_S)
        spans.append((len(cut), len(row["segments"]), len(found), len(segments)))
        cut += [audio[round(u["start_s"] * SR):round(u["end_s"] * SR)] for u in row["segments"]]
        found += [audio[s.start:s.end] for s in segments]
    by_truth = model.transcribe(cut, sampling_rate=SR, num_beams=5)
    by_segments = model.transcribe(found, sampling_rate=SR, num_beams=5)
    for (row, _), (a, n, b, m) in zip(recordings, spans):
        truth_wer = jiwer.wer(row["text"], " ".join(by_truth[a:a + n]))
        segments_wer = jiwer.wer(row["text"], " ".join(by_segments[b:b + m]))
        print(f"{row['id']}: WER {100 * segments_wer:.2f}% segmented, {100 * truth_wer:.2f}% true utterances")
        assert segments_wer <= truth_wer + 0.02


@pytest.mark.parametrize("kind", ["tone", "noise"])
def test_no_pause_is_cut_at_fixed_length(kind):
    n = 65 * SR
    if kind == "tone":
        audio = 0.1 * np.sin(2 * np.pi * 220.0 * np.arange(n) / SR)
    else:
        audio = 0.03 * np.random.default_rng(0).standard_normal(n)
    segments = find_segments(audio.astype(np.float32), SR, MAX_S)
    assert len(segments) == 4
    assert all(MAX_S - 0.05 <= s.duration_s <= MAX_S for s in segments[:3])  # frames of 10 ms: within 50 ms
    assert segments[0].start == 0 and segments[-1].end == n
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))  # nothing left out


def test_silence_has_no_segments():
    rng = np.random.default_rng(0)
    assert find_segments(np.zeros(30 * SR, np.float32), SR) == []
    assert find_segments((rng.standard_normal(30 * SR) * 1e-3).astype(np.float32), SR) == []  # -60 dBFS noise


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
TONE_AT, SILENCE_AT = 200, 400  # after this many clips: a 50 s tone (no pause: 3 segments), 5 min of silence


def hour_of_pieces(clips: list[np.ndarray], rng: np.random.Generator):
    """(kind, samples) pieces, without end: the demo clips in turn, each followed by a pause of 0.5-1.5 s of
    -60 dBFS noise; after clip TONE_AT a 50 s tone, after clip SILENCE_AT five minutes of the pauses' noise."""
    def noise(seconds: float) -> np.ndarray:
        return (rng.standard_normal(round(seconds * SR)) * 1e-3).astype(np.float32)

    for k in range(10 ** 6):
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
    clips = [soundfile.read(os.path.join(DEMO_CORPUS, r["audio_filepath"]), dtype="float32")[0]
             for r in read_rows(DEMO_CORPUS)]
    assert max(len(c) for c in clips) < MAX_S * SR
    counts: dict = {}
    tracemalloc.start()
    try:
        segments = list(segment_stream(hour_blocks(clips, counts), SR, MAX_S))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    hour_bytes = HOUR * 4  # float32
    print(f"one hour: {counts}, {len(segments)} segments, tracemalloc peak {peak / 1e6:.1f} MB "
          f"(the hour as float32: {hour_bytes / 1e6:.0f} MB)")
    assert counts["tone"] == 1 and counts["silence"] == 5
    # every clip one segment (each is followed by a clear pause), and the tone of 50 s and its pad in three
    assert len(segments) == counts["clip"] + math.ceil(50.3 / MAX_S)
    assert max(s.duration_s for s in segments) <= MAX_S
    assert all(a.end <= b.start for a, b in zip(segments, segments[1:]))
    assert peak < 50e6
