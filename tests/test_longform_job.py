"""Long recordings in the transcription job: split at pauses, spread as segments, joined back with timestamps."""

import json
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
from helpers import demo_rows

from pipeline import scoring
from pipeline.longform import split_long_audio
from pipeline.manifest import read_manifest
from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_LONG_FORM, DEMO_MODEL, Speech2Text


def long_form() -> list[dict]:
    with open(os.path.join(DEMO_LONG_FORM, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_long_recordings_are_joined_with_segments(ray_session, tmp_path):
    summary = run(
        TranscribeConfig(
            manifest=os.path.join(DEMO_LONG_FORM, "manifest.jsonl"),
            output=str(tmp_path),
            model=DEMO_MODEL,
            max_segment_s=20.0,
        )
    )
    out = pa.concat_tables([pq.read_table(f) for f in tmp_path.glob("*.parquet")], promote_options="default")
    rows = {row["id"]: row for row in out.to_pylist()}
    recordings = long_form()
    assert sorted(rows) == sorted(r["id"] for r in recordings)  # one row per input row, no segment rows left
    assert summary["rows_ok"] == 2 and summary["rows_missing"] == summary["rows_duplicated"] == 0

    model = Speech2Text.from_pretrained(DEMO_MODEL)
    for recording in recordings:
        row = rows[recording["id"]]
        assert (
            row["error"] is None
            and row["duration_s"] == recording["duration"]
            or abs(row["duration_s"] - recording["duration"]) < 0.01
        )
        segments = row["segments"]
        assert all(s["end_s"] - s["start_s"] <= 20.0 for s in segments)
        assert row["text"] == " ".join(s["text"] for s in segments if s["text"])
        # Boundaries fall in pauses: every true utterance lies inside one segment, to within 0.45 s (a clip's own
        # leading silence, where the VAD's segment starts 150 ms before the speech).
        for truth in recording["segments"]:
            middle = (truth["start_s"] + truth["end_s"]) / 2
            segment = next(s for s in segments if s["start_s"] <= middle <= s["end_s"])
            assert segment["start_s"] <= truth["start_s"] + 0.45 and truth["end_s"] - 0.45 <= segment["end_s"]
        # Long-form WER at most 2 points above the same utterances cut at their true times, one by one.
        audio, rate = soundfile.read(os.path.join(DEMO_LONG_FORM, recording["audio_filepath"]), dtype="float32")
        clips = [audio[round(t["start_s"] * rate) : round(t["end_s"] * rate)] for t in recording["segments"]]
        one_by_one = " ".join(model.transcribe(clips, sampling_rate=rate))
        assert scoring.wer([recording["text"]], [row["text"]]) <= scoring.wer([recording["text"]], [one_by_one]) + 2


def test_an_hour_is_split_in_blocks_with_bounded_memory(tmp_path):
    """The split stage on a 1-hour recording (written here in blocks): the right segments, memory far below
    the hour's 230 MB of float32 samples."""
    clip, rate = soundfile.read(demo_rows(1)[0]["audio_filepath"], dtype="float32")
    pause = np.zeros(rate, np.float32)
    unit = np.concatenate([clip, pause])
    count = int(3600 * rate // len(unit))
    path = tmp_path / "hour.flac"
    with soundfile.SoundFile(path, "w", samplerate=rate, channels=1, format="FLAC") as f:
        f.write(pause)
        for _ in range(count):
            f.write(unit)
    assert soundfile.info(path).duration > 3590
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "hour", "audio_filepath": str(path)}) + "\n")
    manifest = read_manifest(str(tmp_path / "m.jsonl"))

    tracemalloc.start()
    segments = split_long_audio(manifest, max_segment_s=20.0, max_duration_s=4 * 3600.0, storage_options=None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.0f} MB"
    assert segments.num_rows == count
    rows = segments.to_pylist()
    assert [r["segment_index"] for r in rows] == list(range(count))
    assert {r["segment_of"] for r in rows} == {"hour"} and {r["segment_count"] for r in rows} == {count}
    starts = np.array([r["segment_start_s"] for r in rows])
    true_starts = (rate + np.arange(count) * len(unit)) / rate
    assert np.abs(starts - true_starts).max() < 0.45  # the clip's own leading silence, less the VAD's pad
