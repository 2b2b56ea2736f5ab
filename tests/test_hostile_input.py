"""The job under hostile input (issue 14): manifests with a UTF-8 BOM, colliding renamed ids, bad manifest numbers,
empty or malformed manifests, an output path that is a file, audio shorter than the manifest or its header claims,
two runs on one output at once, and foreign files in the output folder. Where the storage matters, each test runs on
local files and on a local S3 server (the `place` fixture)."""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import soundfile
from helpers import demo_rows

from pipeline import scoring
from pipeline.manifest import read_manifest

BOM = "\ufeff"


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv"])
def test_manifests_with_a_utf8_bom_lose_no_row(place, kind):
    """Excel and Notepad write a byte-order mark before the first line."""
    rows = [{"id": f"r{i}", "audio": f"{i}.flac", "text": f"line {i}"} for i in range(3)]
    if kind == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        out = io.StringIO()
        writer = csv.DictWriter(
            out, ["id", "audio", "text"], delimiter="," if kind == "csv" else "\t", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
        text = out.getvalue()
    place.write(f"m.{kind}", (BOM + text).encode("utf-8"))
    table = read_manifest(place.url(f"m.{kind}"), place.storage)
    assert table["id"].to_pylist() == ["r0", "r1", "r2"]
    assert table["error"].to_pylist() == [None] * 3
    assert table["audio"].to_pylist() == [place.url(f"{i}.flac") for i in range(3)]


@pytest.mark.parametrize("order", [["x", "x", "x#2"], ["x#2", "x", "x"], ["x", "x#2", "x", "x#2#2", "x#2"]])
def test_renamed_duplicate_ids_never_collide(tmp_path, order):
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"id": i, "audio": f"{n}.flac"}) + "\n" for n, i in enumerate(order))
    )
    ids = read_manifest(str(tmp_path / "m.jsonl"))["id"].to_pylist()
    assert len(set(ids)) == len(order)
    assert ids[0] == order[0]  # the first of each stays as it is
    assert read_manifest(str(tmp_path / "m.jsonl"))["id"].to_pylist() == ids  # the same on every read


def test_an_id_in_two_manifest_files_is_each_files_own_and_a_lost_one_is_redone(ray_session, place):
    """Two shards of one manifest both name `x` (each file numbers only its own repeats): each row gets its file's
    label (`a/x`, `b/x`), the same on every run, so that one of them lost from the output is redone alone (with one
    bare `x` for both, the other's row would stand for it)."""
    from pipeline.transcribe import TranscribeConfig, run
    from s2t_model import DEMO_MODEL

    rows = demo_rows(4)
    for name, part in (("a", rows[:2]), ("b", rows[2:])):
        lines = []
        for row in part:
            audio = f"audio/{os.path.basename(row['audio_filepath'])}"
            place.fs.put_file(row["audio_filepath"], place.path(f"shards/{audio}"))
            lines.append(dict(row, audio_filepath=audio, id="x" if row is part[0] else row["id"]))
        place.write(f"shards/{name}.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    config = TranscribeConfig(
        manifest=place.url("shards/*.jsonl"), output=place.url("out"), model=DEMO_MODEL, num_beams=1, **place.options
    )
    first = run(config)
    found = {row["id"]: (name, row) for name, table in place.tables("out") for row in table.to_pylist()}
    assert sorted(found) == sorted(["a/x", "b/x", rows[1]["id"], rows[3]["id"]])
    assert (first["rows_in"], first["rows_out"], first["rows_missing"], first["ids_in_several_files"]) == (4, 4, 0, 1)
    texts = [found["a/x"][1]["text"], found["b/x"][1]["text"]]
    assert scoring.wer([rows[0]["text"], rows[2]["text"]], texts) <= 20  # each its own clip

    name = found["b/x"][0]  # b's x lost, as if a killed run had not written it
    held = dict(place.tables("out"))[name]
    with place.fs.open(place.path(f"out/{name}"), "wb") as f:
        pq.write_table(held.filter(pc.not_equal(held["id"], "b/x")), f)
    second = run(config)
    assert second["rows_this_run"] == 1 and (second["rows_out"], second["rows_missing"]) == (4, 0)
    assert sorted(row["id"] for _, table in place.tables("out") for row in table.to_pylist()) == sorted(found)


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("offset", -1, "offset -1 s is negative"),
        ("offset", float("nan"), "offset NaN is not a number of seconds"),
        ("duration", float("nan"), "duration NaN is not a number of seconds"),
        ("duration", float("inf"), "duration Infinity is not a number of seconds"),
        ("duration", True, "duration true is not a number of seconds"),
        ("duration", 1e308, "duration 1e+308 s is longer than any recording"),
        ("offset", 1e308, "offset 1e+308 s is longer than any recording"),
        ("duration", 0, "duration 0 s is not positive"),
        ("duration", "ten", "duration 'ten' is not a number of seconds"),
    ],
)
def test_bad_manifest_numbers_are_bad_manifest_lines(place, field, value, says):
    lines = [
        {"id": "good", "audio": "a.flac", "offset": 1.5, "duration": 2},
        {"id": "bad", "audio": "a.flac", field: value},
    ]
    place.write("m.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    table = read_manifest(place.url("m.jsonl"), place.storage)
    assert table["error"].to_pylist() == [None, f"bad_manifest_line: {place.url('m.jsonl')}:2: {says}"]
    assert table["offset_s"][0].as_py() == 1.5 and table["duration_s"][0].as_py() == 2.0


def test_an_offset_past_the_end_of_the_file_is_a_bad_manifest_line(place):
    from pipeline.audio import AudioError, load_audio

    place.write("a.wav", wav_bytes(np.zeros(16000, np.float32), 16000))
    for duration in (None, 1.0):
        with pytest.raises(AudioError) as caught:
            load_audio(place.url("a.wav"), 16000, offset_s=97.5, duration_s=duration, storage_options=place.storage)
        assert caught.value.reason == "bad_manifest_line"
        assert (
            str(caught.value)
            == f"bad_manifest_line: {place.url('a.wav')}: offset 97.5 s is past the end of the file (1.00 s)"
        )


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def s2t_transcribe(place, manifest: str, output: str) -> subprocess.CompletedProcess:
    from s2t_model import DEMO_MODEL

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "transcribe",
            place.url(manifest),
            place.url(output),
            "--model",
            DEMO_MODEL,
            *place.cli,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_jsonl_of_json_arrays_is_refused_in_one_line_before_ray_starts(place):
    place.write("m.jsonl", '["a.flac", "one"]\n["b.flac", "two"]\n')
    done = s2t_transcribe(place, "m.jsonl", "out")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"s2t transcribe: {place.url('m.jsonl')}: no line of the first 2 is a manifest row "
        f'(line 1: not a JSON object (a JSON list, not an object): \'["a.flac", "one"]\')'
    ]
    assert not place.fs.exists(place.path("out"))


def test_an_output_path_that_is_a_file_is_refused_in_one_line_before_ray_starts(place):
    place.write("m.jsonl", json.dumps({"audio": "a.flac"}) + "\n")
    place.write("out", "not a folder")
    done = s2t_transcribe(place, "m.jsonl", "out")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [f"s2t transcribe: {place.url('out')}: the output is a file, not a folder"]
    assert place.read("out") == b"not a folder"


@pytest.mark.parametrize("text", ["", "id,audio\n"])
def test_an_empty_manifest_gives_a_summary_of_no_rows(ray_session, place, text):
    from pipeline.transcribe import TranscribeConfig, run
    from s2t_model import DEMO_MODEL

    place.write("m.csv", text)
    summary = run(
        TranscribeConfig(manifest=place.url("m.csv"), output=place.url("out"), model=DEMO_MODEL, **place.options)
    )
    assert summary["rows_in"] == summary["rows_out"] == summary["rows_missing"] == 0
    assert json.loads(place.read("out/_s2t/summary.json"))["rows_in"] == 0


def wav_claiming_more_data(samples: np.ndarray, rate: int, factor: int) -> bytes:
    """A 16-bit WAV whose RIFF and data chunk sizes claim `factor` times the samples it holds (a copy cut short)."""
    data = bytearray(wav_bytes(samples, rate))
    at = data.index(b"data")
    size = int.from_bytes(data[at + 4 : at + 8], "little")
    data[at + 4 : at + 8] = (size * factor).to_bytes(4, "little")
    data[4:8] = (len(data) - 8 + size * (factor - 1)).to_bytes(4, "little")
    return bytes(data)


def test_audio_that_is_not_there_is_truncated_by_one_rule(ray_session, place):
    """A duration past the end of the file, below and above --max-segment-s, and a WAV header claiming far more data
    than the file holds: each row is `truncated`, none is transcribed from what exists."""
    from pipeline.transcribe import TranscribeConfig, run
    from s2t_model import DEMO_MODEL

    clips = [soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in demo_rows(1)]
    audio = np.concatenate(clips * 2)
    seconds = len(audio) / 16000
    assert 5 < seconds < 14
    place.write("a.wav", wav_bytes(audio, 16000))
    place.write("lying.wav", wav_claiming_more_data(clips[0][:32000], 16000, factor=10))
    lines = [
        {"id": "whole", "audio": "a.wav", "duration": round(seconds, 2)},
        {"id": "past_end_15", "audio": "a.wav", "duration": 15.0},
        {"id": "past_end_25", "audio": "a.wav", "duration": 25.0},
        {"id": "past_end_offset", "audio": "a.wav", "offset": 2.0, "duration": seconds},
        {"id": "lying_header", "audio": "lying.wav"},
    ]
    place.write("m.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    summary = run(
        TranscribeConfig(
            manifest=place.url("m.jsonl"),
            output=place.url("out"),
            model=DEMO_MODEL,
            num_beams=1,
            max_segment_s=20.0,
            **place.options,
        )
    )
    rows = {row["id"]: row for _, table in place.tables("out") for row in table.to_pylist()}
    assert sorted(rows) == sorted(line["id"] for line in lines)
    assert rows["whole"]["error"] is None and rows["whole"]["text"]
    for name in ("past_end_15", "past_end_25", "past_end_offset", "lying_header"):
        assert (rows[name]["error"] or "").startswith("truncated: "), (name, rows[name]["error"])
        assert rows[name]["text"] is None
    assert summary["errors_by_reason"] == {"truncated": 4}
    assert summary["audio_hours"] * 3600 == pytest.approx(seconds, abs=0.1)


def write_manifest(place, rows: list[dict], name: str = "m.jsonl") -> None:
    """`rows` of the demo corpus as a manifest at `place`, their audio beside it (paths relative to it)."""
    lines = []
    for row in rows:
        audio = f"audio/{os.path.basename(row['audio_filepath'])}"
        place.fs.put_file(row["audio_filepath"], place.path(audio))
        lines.append(json.dumps(dict(row, audio_filepath=audio)) + "\n")
    place.write(name, "".join(lines))


def output_ids(place, folder: str = "out") -> list[str]:
    return [i for _, table in place.tables(folder) for i in table["id"].to_pylist()]


def fast_job(place, manifest: str, output: str, **options):
    from pipeline.transcribe import TranscribeConfig, run
    from s2t_model import DEMO_MODEL

    return run(
        TranscribeConfig(
            manifest=place.url(manifest),
            output=place.url(output),
            model=DEMO_MODEL,
            num_beams=1,
            rows_per_file=2,
            batch_size=2,
            rows_per_block=2,
            **place.options,
            **options,
        )
    )


@pytest.mark.parametrize("foreign", ["manifest.parquet", "string_ids.parquet", "part-0.parquet", "notes.txt"])
def test_an_output_folder_holding_files_the_job_did_not_write_is_refused_before_any_work(place, foreign):
    """A Parquet manifest kept in its output folder, an unrelated file with a string `id`, one a run of the job
    could have written but did not name: refused, naming the file, whether or not the job wrote there before."""
    from pipeline.output import OutputError

    place.write("m.jsonl", json.dumps({"id": "a", "audio": "a.flac"}) + "\n")
    for earlier_run in (False, True):
        out = f"out-{earlier_run}"
        if earlier_run:  # what a run of the job leaves (the marker is the job's own)
            place.write(f"{out}/_s2t/output.json", '{"written_by": "s2t transcribe"}')
            place.write(f"{out}/_s2t/summary.json", "{}")
        with place.fs.open(place.path(f"{out}/{foreign}"), "wb") as f:
            pq.write_table(pa.table({"id": ["a", "b"], "audio": ["a.flac", "b.flac"]}), f)
        with pytest.raises(OutputError) as caught:
            fast_job(place, "m.jsonl", out)
        assert place.url(f"{out}/{foreign}") in str(caught.value) and "not written by s2t transcribe" in str(
            caught.value
        )
        assert place.names(out) == sorted(
            [foreign] + (["_s2t/output.json", "_s2t/summary.json"] if earlier_run else [])
        )  # nothing done


def test_two_runs_started_at_once_write_every_id_once_then_torn_files_are_redone(ray_session, place):
    """Two runs started at once on one output: the second is refused, naming the first (the lease `s2t backfill`
    takes). Then real output files of the first, cut at several byte counts (what a run killed mid-write leaves):
    the rerun removes them and writes their rows again. Every id exactly once after each. (One test, so that the
    torn files are those of a run the test already paid for.)"""
    from s2t_model import DEMO_MODEL

    rows = demo_rows(12)
    write_manifest(place, rows)
    command = [
        sys.executable,
        "-m",
        "jobs.transcribe",
        place.url("m.jsonl"),
        place.url("out"),
        "--model",
        DEMO_MODEL,
        "--num-beams",
        "1",
        "--rows-per-file",
        "2",
        "--batch-size",
        "2",
        "--rows-per-block",
        "2",
        *place.cli,
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    runs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    assert sorted(output_ids(place)) == sorted(r["id"] for r in rows)  # every id exactly once
    assert sorted(rc for rc, _, _ in results) == [0, 1], [err[-2000:] for _, _, err in results]
    first_run_id = json.loads(place.read("out/_s2t/summary.json"))["run_id"]
    refused = next(err for rc, _, err in results if rc)
    assert (
        refused.strip()
        .splitlines()[-1]
        .startswith(f"s2t transcribe: {place.path('out')}/_s2t/_lease.json: run {first_run_id} (pid ")
    )

    files = [name for name in place.names("out") if name.endswith(".parquet")]
    assert len(files) >= 3
    torn_rows = 0
    for name, keep in zip(files, (4, 0.5, -1)):
        data = place.read(f"out/{name}")
        torn_rows += pq.read_metadata(io.BytesIO(data)).num_rows
        place.write(f"out/{name}", data[:keep] if isinstance(keep, int) else data[: int(len(data) * keep)])
    summary = fast_job(place, "m.jsonl", "out")
    assert sorted(output_ids(place)) == sorted(r["id"] for r in rows)
    assert summary["rows_this_run"] == torn_rows and summary["rows_duplicated"] == summary["rows_missing"] == 0


def test_files_the_jobs_rewrite_keep_their_naming(place):
    """A file holding a joined recording's segments and other rows (longform), and one holding a failed pair that
    `s2t backfill --retry-errors` drops, are rewritten under the jobs' naming: the next run's checks pass them."""
    from pipeline.longform import remove_segments
    from pipeline.output import MARKER, check_output, drop_errors
    from pipeline.reasons import Reason

    place.write(f"out/{MARKER}", "{}")
    rows = pa.table({"id": ["kept", "long#0"], "segment_of": [None, "long"], "error": [None, None]})
    with place.fs.open(place.path("out/s2t-a1_000000-0.parquet"), "wb") as f:
        pq.write_table(rows, f)
    remove_segments(place.fs, [place.path("out/s2t-a1_000000-0.parquet")], {("", "long")})
    failed = pa.table({"id": ["ok", "failed"], "error": [None, "missing: x.flac"]})
    with place.fs.open(place.path("out/s2t-b2_000000-0.parquet"), "wb") as f:
        pq.write_table(failed, f)
    drop_errors(place.fs, place.path("out"), frozenset(Reason))
    assert sorted(i for _, table in place.tables("out") for i in table["id"].to_pylist()) == ["kept", "ok"]
    assert len(place.names("out")) == 3
    check_output(place.fs, place.path("out"), place.url("out"))


def older_output(place, rows: list[dict], folder: str = "out") -> None:
    """What a version of the job before the marker wrote: Ray's default file names, its columns, a summary."""
    from s2t_model import DEMO_MODEL

    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "audio": [r["audio_filepath"] for r in rows],
            "offset_s": [0.0] * len(rows),
            "duration_s": [r["duration"] for r in rows],
            "reference": [r["text"] for r in rows],
            "text": [r["text"] for r in rows],
            "tgt_lang": pa.array([None] * len(rows), pa.string()),
            "num_tokens": pa.array([3] * len(rows), pa.int32()),
            "avg_logprob": pa.array([-0.1] * len(rows), pa.float32()),
            "error": pa.array([None] * len(rows), pa.string()),
            "model": [DEMO_MODEL] * len(rows),
        }
    )
    with place.fs.open(place.path(f"{folder}/6d1f0e2a9b8c4d7e_000000_000000.parquet"), "wb") as f:
        pq.write_table(table, f)
    place.write(f"{folder}/_summary.json", "{}")


def test_an_older_output_is_refused_with_the_way_to_adopt_it_and_adopted_when_asked(place):
    """A folder an older version wrote (no marker) is refused, the message naming --adopt-output; with it the
    files are renamed to the jobs' naming and the folder marked, so the next run needs no flag. A foreign file
    beside them is refused even then."""
    from pipeline.output import MARKER, OutputError, check_output, mark_output

    older_output(place, demo_rows(2))
    fs, root, uri = place.fs, place.path("out"), place.url("out")
    with pytest.raises(OutputError, match="pass --adopt-output to take it as this job's output") as caught:
        check_output(fs, root, uri)
    assert f"{uri}/6d1f0e2a9b8c4d7e_000000_000000.parquet" in str(caught.value)
    before = sorted(output_ids(place))
    check_output(fs, root, uri, adopt=True)
    mark_output(fs, root, "s2t transcribe")
    names = place.names("out")
    assert MARKER in names and "_s2t/summary.json" in names and len(names) == 3
    assert sorted(output_ids(place)) == before
    assert [table["run_id"].null_count for _, table in place.tables("out")] == [2]  # what the summary reads
    check_output(fs, root, uri)  # marked: no flag needed now

    older_output(place, demo_rows(2), "other")
    place.write("other/notes.txt", "mine")
    for adopt in (False, True):
        with pytest.raises(OutputError, match="not written by s2t transcribe"):
            check_output(fs, place.path("other"), place.url("other"), adopt=adopt)


def test_an_adopted_output_is_resumed(ray_session, tmp_path):
    """The rows of an older version's output count as done: only the others are transcribed."""
    import fsspec
    from conftest import Place

    place = Place(fsspec.filesystem("file", auto_mkdir=True), str(tmp_path), str(tmp_path), {}, [], None)
    rows = demo_rows(4)
    write_manifest(place, rows)
    older_output(place, rows[:3])
    summary = fast_job(place, "m.jsonl", "out", adopt_output=True)
    assert summary["rows_this_run"] == 1 and summary["rows_missing"] == summary["rows_duplicated"] == 0
    assert sorted(output_ids(place)) == sorted(r["id"] for r in rows)
