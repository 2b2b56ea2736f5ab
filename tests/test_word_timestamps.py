"""Word timestamps against true word boundaries (espeak-ng's word events), token log-probabilities against
transformers, and the job's words exported as subtitles read back by the srt and webvtt-py libraries."""

import itertools
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench.words import known_set
from pipeline.export import ExportConfig
from pipeline.export import run as export
from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_LONG_FORM, DEMO_MODEL, Speech2Text
from s2t_model.alignment import dtw, monotonic_peaks, rank_heads


@pytest.fixture(scope="module")
def model():
    return Speech2Text.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def utterances():
    return known_set(seed=7, count=10)  # seeds the bench's figures were not measured on


def test_decoded_words_start_where_espeak_says_them(model, utterances):
    features = model.features([wave for wave, _, _ in utterances], 16000)
    results = model.transcribe_features(features, word_timestamps=True)
    errors = []
    for result, (_, truth, reference) in zip(results, utterances):
        assert " ".join(w.word for w in result.words) == result.text
        if result.text == reference:
            errors += [abs(w.start_s - start) for w, (start, _, _) in zip(result.words, truth)]
    assert len(errors) >= 50
    assert np.median(errors) <= 0.1 and np.percentile(errors, 90) <= 0.3, (np.median(errors), np.percentile(errors, 90))


def test_ranking_puts_the_measured_heads_first(model, utterances):
    features = model.features([wave for wave, _, _ in utterances[:5]], 16000)
    examples = [
        (f, model.tokenizer.encode(reference), [t[0] for t in truth])
        for f, (_, truth, reference) in zip(features, utterances[:5])
    ]
    ranked = rank_heads(model, examples)
    assert len(ranked) == model.config.decoder_layers * model.config.decoder_attention_heads
    best, worst = ranked[0][1], ranked[-1][1]
    assert best <= 0.1 and worst >= 3 * best
    chosen = {tuple(h) for h in model.config.extra["alignment_heads"]}
    assert chosen & {head for head, _ in ranked[:4]}


def test_token_logprobs_equal_transformers(model, utterances):
    transformers = pytest.importorskip("transformers")
    reference = transformers.Speech2TextForConditionalGeneration.from_pretrained(DEMO_MODEL).float().eval()
    wave = utterances[0][0]
    features = model.features([wave], 16000)
    [result] = model.transcribe_features(features, logprobs=True)
    ids = torch.tensor([[model.config.decoder_start_token_id] + result.ids])
    with torch.no_grad():
        logits = reference(input_features=features[0][None], decoder_input_ids=ids[:, :-1]).logits
    expected = logits.log_softmax(-1)[0].gather(-1, ids[0, 1:, None])[:, 0]
    np.testing.assert_allclose(result.token_logprobs, expected.numpy(), atol=2e-4)
    assert result.words is None  # not asked for


def test_monotonic_peaks_and_dtw_are_the_best_paths():
    rng = np.random.default_rng(0)
    for _ in range(20):
        score = rng.normal(size=(3, 6))
        best = max(
            itertools.combinations_with_replacement(range(6), 3),
            key=lambda frames: sum(score[k, f] for k, f in enumerate(frames)),
        )
        assert tuple(monotonic_peaks(score)) == best
        rows, cols = dtw(score)
        assert (rows[0], cols[0]) == (0, 0) and (rows[-1], cols[-1]) == (2, 5)
        assert np.all(np.diff(rows) >= 0) and np.all(np.diff(cols) >= 0)
        assert np.all(np.diff(rows) + np.diff(cols) >= 1)
        assert score[rows, cols].sum() <= min(all_path_costs(score)) + 1e-9


def all_path_costs(score):
    """Every monotonic path's cost (steps right, down, diagonal), by brute force on a small matrix."""
    N, M = score.shape
    costs = []

    def walk(i, j, total):
        total += score[i, j]
        if (i, j) == (N - 1, M - 1):
            costs.append(total)
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < N and j + dj < M:
                walk(i + di, j + dj, total)

    walk(0, 0, 0.0)
    return costs


def test_job_words_exported_as_subtitles_per_recording(ray_session, tmp_path):
    import srt
    import webvtt

    out = tmp_path / "out"
    run(
        TranscribeConfig(
            manifest=os.path.join(DEMO_LONG_FORM, "manifest.jsonl"),
            output=str(out),
            model=DEMO_MODEL,
            max_segment_s=20.0,
            word_timestamps=True,
        )
    )
    rows = {
        r["id"]: r
        for r in pa.concat_tables(
            [pq.read_table(f) for f in out.glob("*.parquet")], promote_options="default"
        ).to_pylist()
    }
    with open(os.path.join(DEMO_LONG_FORM, "manifest.jsonl")) as f:
        recordings = [json.loads(line) for line in f]
    for recording in recordings:
        row = rows[recording["id"]]
        assert " ".join(w["word"] for w in row["words"]) == row["text"]
        # In the recording's time: each true utterance's first word starts where the utterance was put, after at
        # most the clip's own leading silence (<= 0.5 s).
        hits = sum(
            any(
                w["word"] == truth["text"].split()[0]
                and truth["start_s"] - 0.2 <= w["start_s"] <= truth["start_s"] + 0.7
                for w in row["words"]
            )
            for truth in recording["segments"]
        )
        assert hits >= len(recording["segments"]) - 1

    counts = {}
    for file_format, cues in (("srt", "segments"), ("vtt", "words"), ("txt", "segments"), ("json", "segments")):
        to = tmp_path / f"{file_format}-{cues}"
        counts[file_format] = export(ExportConfig(output=str(out), format=file_format, to=str(to), cues=cues))
        assert sorted(os.listdir(to)) == sorted(f"{r['id']}.{file_format}" for r in recordings)
    assert all(c == {"written": 2, "errors": 0, "unjoined": 0} for c in counts.values())
    for recording in recordings:
        row = rows[recording["id"]]
        subtitles = list(srt.parse((tmp_path / "srt-segments" / f"{row['id']}.srt").read_text()))
        assert [s.content for s in subtitles] == [s["text"] for s in row["segments"] if s["text"]]
        assert [round(s.start.total_seconds(), 3) for s in subtitles] == [
            round(s["start_s"], 3) for s in row["segments"] if s["text"]
        ]
        captions = webvtt.read(str(tmp_path / "vtt-words" / f"{row['id']}.vtt"))
        assert [c.text for c in captions] == row["text"].split()
        assert [c.start_time.in_milliseconds() for c in captions] == [round(w["start_s"] * 1000) for w in row["words"]]
        assert [c.end_time.in_milliseconds() for c in captions] == [round(w["end_s"] * 1000) for w in row["words"]]
        assert (tmp_path / "txt-segments" / f"{row['id']}.txt").read_text() == row["text"] + "\n"
        assert json.loads((tmp_path / "json-segments" / f"{row['id']}.json").read_text())["words"] == row["words"]
