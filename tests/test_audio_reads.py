"""How the audio stages read: `io_concurrency` files at once per feature actor and per split task (seen through a
filesystem whose opens wait for each other, and on S3 through a real HTTP proxy that counts the requests), one GET
for an utterance's file, no header read by the split for rows the manifest says are short, and a long recording
carried as bytes split into segments that each carry only their own slice."""

import io
import json
import os
import threading

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import soundfile
from fsspec.implementations.local import LocalFileSystem
from helpers import demo_rows

from bench.io import start_proxy
from pipeline import audio
from pipeline.audio import INLINE_AUDIO
from pipeline.longform import joined_row, split_long_audio
from pipeline.rows import SCHEMA
from pipeline.stages import ComputeFeatures, FeatureOptions
from s2t_model import DEMO_LONG_FORM, DEMO_MODEL, FeatureExtractor

CONCURRENCY = 4


class MeetingFileSystem(LocalFileSystem):
    """Local files whose opens wait, at a barrier, until CONCURRENCY of them are under way at once: reads one by one
    never get past the first (BrokenBarrierError after the timeout, an error row). Counts the opens."""

    protocol = "meetingfile"
    barrier = threading.Barrier(CONCURRENCY, timeout=10)
    opens = 0
    lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("meetingfile://"))

    def _open(self, path, mode="rb", **kwargs):
        with self.lock:
            type(self).opens += 1
        self.barrier.wait()
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("meetingfile", MeetingFileSystem, clobber=True)


def rows_table(rows: list[dict], durations: bool) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "id": r["id"],
                "audio": "meetingfile://" + r["audio_filepath"],
                "offset_s": 0.0,
                "duration_s": r["duration"] if durations else None,
                "reference": r["text"],
                "tgt_lang": None,
                "error": None,
            }
            for r in rows
        ],
        schema=SCHEMA,
    )


def feature_stage(storage_options: dict | None, io_concurrency: int) -> ComputeFeatures:
    return ComputeFeatures(
        FeatureOptions(
            FeatureExtractor.from_pretrained(DEMO_MODEL).to_dict(),
            min_duration_s=0.1,
            max_duration_s=60.0,
            storage_options=storage_options,
            vad="off",
            io_concurrency=io_concurrency,
        )
    )


def test_feature_actor_reads_io_concurrency_files_at_once():
    MeetingFileSystem.barrier.reset()
    stage = feature_stage(None, CONCURRENCY)
    out, features = stage.compute(rows_table(demo_rows(2 * CONCURRENCY), durations=True))
    assert out["error"].to_pylist() == [None] * 2 * CONCURRENCY
    assert all(f is not None for f in features)


def test_split_reads_headers_concurrently_and_not_those_of_short_rows():
    MeetingFileSystem.barrier.reset()
    rows = demo_rows(2 * CONCURRENCY)
    MeetingFileSystem.opens = 0
    known = split_long_audio(
        rows_table(rows, durations=True),
        max_segment_s=20.0,
        max_duration_s=60.0,
        storage_options=None,
        io_concurrency=CONCURRENCY,
    )
    assert MeetingFileSystem.opens == 0  # the manifest says each is short: the feature stage's read is the only one
    assert known["id"].to_pylist() == [r["id"] for r in rows]
    unknown = split_long_audio(
        rows_table(rows, durations=False),
        max_segment_s=20.0,
        max_duration_s=60.0,
        storage_options=None,
        io_concurrency=CONCURRENCY,
    )
    assert MeetingFileSystem.opens == len(rows)
    assert unknown["error"].to_pylist() == [None] * len(rows)


def test_a_long_recording_in_bytes_gives_each_segment_its_own_slice():
    with open(os.path.join(DEMO_LONG_FORM, "manifest.jsonl")) as f:
        recording = json.loads(f.readline())
    path = os.path.join(DEMO_LONG_FORM, recording["audio_filepath"])
    data = open(path, "rb").read()
    offset = 5.0
    row = {"id": "long", "offset_s": offset, "duration_s": None, "reference": None, "tgt_lang": None, "error": None}
    from_file = split_long_audio(
        pa.Table.from_pylist([{**row, "audio": path}], schema=SCHEMA),
        max_segment_s=20.0,
        max_duration_s=3600.0,
        storage_options=None,
    ).to_pylist()
    with_bytes = pa.Table.from_pylist([{**row, "audio": "shard.tar/long.flac"}], schema=SCHEMA).append_column(
        INLINE_AUDIO, pa.array([data], pa.binary())
    )
    pieces = split_long_audio(with_bytes, max_segment_s=20.0, max_duration_s=3600.0, storage_options=None).to_pylist()

    assert len(pieces) == len(from_file) > 5
    whole, rate = soundfile.read(path, dtype="int16")
    for piece, reference in zip(pieces, from_file):
        assert (piece["id"], piece["segment_start_s"], piece["recording_offset_s"]) == (
            reference["id"],
            reference["segment_start_s"],
            offset,
        )
        assert piece["offset_s"] == 0.0 and piece["duration_s"] == reference["duration_s"]
        assert len(piece[INLINE_AUDIO]) < len(data) / 3  # its slice, not the whole recording
        samples, slice_rate = soundfile.read(io.BytesIO(piece[INLINE_AUDIO]), dtype="int16")
        start = round(reference["offset_s"] * rate)
        assert slice_rate == rate and np.array_equal(samples, whole[start : start + len(samples)])
        assert abs(len(samples) / rate - reference["duration_s"]) < 1e-3
    assert sum(len(p[INLINE_AUDIO]) for p in pieces) < 1.2 * len(data)
    # Joined back, the recording's offset is the row's, as for a file.
    texts = [{**p, "text": "x", "num_tokens": 1, "avg_logprob": 0.0, "speech_s": 1.0} for p in pieces]
    assert joined_row(texts)["offset_s"] == offset


@pytest.fixture
def proxied_bucket(s3_bucket, s3_endpoint):
    """(the bucket's filesystem, bucket, the proxy's server, storage options reading the bucket through the proxy)."""
    from conftest import S3_CREDENTIALS

    fs, bucket = s3_bucket
    proxy, url = start_proxy(s3_endpoint, latency_s=0.0)
    yield fs, bucket, proxy, dict(S3_CREDENTIALS, client_kwargs={"endpoint_url": url})
    proxy.shutdown()


def s3_rows(fs, bucket: str, rows: list[dict], **columns) -> pa.Table:
    for row in rows:
        fs.put_file(row["audio_filepath"], f"{bucket}/{row['id']}.flac")
    return pa.Table.from_pylist(
        [
            {
                "id": r["id"],
                "audio": f"s3://{bucket}/{r['id']}.flac",
                "offset_s": 0.0,
                "duration_s": r["duration"],
                "reference": r["text"],
                "tgt_lang": None,
                "error": None,
                **columns,
            }
            for r in rows
        ],
        schema=SCHEMA,
    )


def test_an_utterance_on_s3_is_one_get_and_decodes_as_the_local_file(proxied_bucket):
    fs, bucket, proxy, options = proxied_bucket
    rows = demo_rows(4)
    fs.pipe_file(f"{bucket}/empty.flac", b"")
    table = pa.concat_tables(
        [
            s3_rows(fs, bucket, rows),
            pa.Table.from_pylist(
                [
                    {
                        "id": name,
                        "audio": f"s3://{bucket}/{name}.flac",
                        "offset_s": 0.0,
                        "duration_s": 1.0,
                        "error": None,
                    }
                    for name in ("empty", "missing")
                ],
                schema=SCHEMA,
            ),
        ]
    )
    stage = feature_stage(options, CONCURRENCY)
    proxy.requests.clear()
    loaded = [stage.load(row) for row in table.to_pylist()[: len(rows)]]
    assert proxy.requests == {"GET": len(rows)}  # no HEAD before any of them
    loaded += [stage.load(row) for row in table.to_pylist()[len(rows) :]]

    for row, samples in zip(rows, loaded):
        whole = soundfile.read(row["audio_filepath"], dtype="float32")[0]
        np.testing.assert_array_equal(samples, whole[: round(row["duration"] * 16000)])  # the manifest's duration
    assert loaded[-2] == f"empty: s3://{bucket}/empty.flac: the file has zero bytes"
    assert loaded[-1] == f"missing: s3://{bucket}/missing.flac: no such file"


def test_files_larger_than_one_get_and_slices_are_read_as_before(proxied_bucket, monkeypatch):
    """A file past WHOLE_FILE_BYTES (made small here) is read again after its first GET, whole; a row from an offset
    asks the size first (a slice of what may be a long recording): each decodes as the local file does."""
    fs, bucket, proxy, options = proxied_bucket
    row = demo_rows(1)[0]
    table = s3_rows(fs, bucket, [row])
    monkeypatch.setattr(audio, "WHOLE_FILE_BYTES", 4096)
    assert os.path.getsize(row["audio_filepath"]) > 4096
    stage = feature_stage(options, CONCURRENCY)
    local = soundfile.read(row["audio_filepath"], dtype="float32")[0]

    proxy.requests.clear()
    np.testing.assert_array_equal(stage.load({**table.to_pylist()[0], "duration_s": None}), local)
    assert proxy.requests["GET"] >= 2 and proxy.requests["HEAD"] == 1
    proxy.requests.clear()
    sliced = stage.load({**table.to_pylist()[0], "offset_s": 0.5, "duration_s": 1.0})
    np.testing.assert_array_equal(sliced, local[8000:24000])
    assert proxy.requests["HEAD"] == 1


def test_an_s3_client_keeps_io_concurrency_requests_in_flight(proxied_bucket):
    """s3fs keeps 10 connections unless told more: 16 reads at once must not queue for them."""
    fs, bucket, proxy, options = proxied_bucket
    rows = [dict(row, id=f"clip-{i}") for i, row in enumerate(demo_rows(1) * 16)]
    table = s3_rows(fs, bucket, rows)
    proxy.latency_s = 2.0  # every read is still waiting when the 16th starts, on a loaded machine too
    stage = feature_stage(options, 16)
    out, _ = stage.compute(table)
    assert out["error"].to_pylist() == [None] * 16
    assert proxy.most_at_once == 16


def test_the_split_reads_an_s3_row_of_unknown_length_with_one_get(proxied_bucket):
    fs, bucket, proxy, options = proxied_bucket
    rows = demo_rows(3)
    table = s3_rows(fs, bucket, rows).set_column(3, "duration_s", pa.nulls(3, pa.float64()))
    proxy.requests.clear()
    split = split_long_audio(table, max_segment_s=20.0, max_duration_s=60.0, storage_options=options)
    assert split["id"].to_pylist() == [r["id"] for r in rows] and split["error"].to_pylist() == [None] * 3
    assert proxy.requests == {"GET": 3}
