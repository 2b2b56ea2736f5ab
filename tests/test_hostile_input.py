"""The job under hostile input (issue 14): manifests with a UTF-8 BOM, colliding renamed ids, bad manifest numbers,
empty or malformed manifests, an output path that is a file, audio shorter than the manifest or its header claims,
two runs on one output at once, and foreign files in the output folder."""

import csv
import subprocess
import sys
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from helpers import demo_rows
from pipeline.manifest import read_manifest

BOM = "\ufeff"


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv"])
def test_manifests_with_a_utf8_bom_lose_no_row(tmp_path, kind):
    """Excel and Notepad write a byte-order mark before the first line."""
    rows = [{"id": f"r{i}", "audio": f"{i}.flac", "text": f"line {i}"} for i in range(3)]
    if kind == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        out = io.StringIO()
        writer = csv.DictWriter(out, ["id", "audio", "text"], delimiter="," if kind == "csv" else "\t",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = out.getvalue()
    (tmp_path / f"m.{kind}").write_text(BOM + text, encoding="utf-8")
    table = read_manifest(str(tmp_path / f"m.{kind}"))
    assert table["id"].to_pylist() == ["r0", "r1", "r2"]
    assert table["error"].to_pylist() == [None] * 3
    assert table["audio"].to_pylist() == [str(tmp_path / f"{i}.flac") for i in range(3)]


@pytest.mark.parametrize("order", [["x", "x", "x#2"], ["x#2", "x", "x"], ["x", "x#2", "x", "x#2#2", "x#2"]])
def test_renamed_duplicate_ids_never_collide(tmp_path, order):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"id": i, "audio": f"{n}.flac"}) + "\n"
                                              for n, i in enumerate(order)))
    ids = read_manifest(str(tmp_path / "m.jsonl"))["id"].to_pylist()
    assert len(set(ids)) == len(order)
    assert ids[0] == order[0]  # the first of each stays as it is
    assert read_manifest(str(tmp_path / "m.jsonl"))["id"].to_pylist() == ids  # the same on every read


@pytest.mark.parametrize("field, value, says", [
    ("offset", -1, "offset -1 s is negative"),
    ("offset", float("nan"), "offset NaN is not a number of seconds"),
    ("duration", float("nan"), "duration NaN is not a number of seconds"),
    ("duration", float("inf"), "duration Infinity is not a number of seconds"),
    ("duration", True, "duration true is not a number of seconds"),
    ("duration", 1e308, "duration 1e+308 s is longer than any recording"),
    ("offset", 1e308, "offset 1e+308 s is longer than any recording"),
    ("duration", 0, "duration 0 s is not positive"),
    ("duration", "ten", "duration 'ten' is not a number of seconds"),
])
def test_bad_manifest_numbers_are_bad_manifest_lines(tmp_path, field, value, says):
    lines = [{"id": "good", "audio": "a.flac", "offset": 1.5, "duration": 2}, {"id": "bad", "audio": "a.flac", field: value}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = read_manifest(str(tmp_path / "m.jsonl"))
    assert table["error"].to_pylist() == [None, f"bad_manifest_line: {tmp_path / 'm.jsonl'}:2: {says}"]
    assert table["offset_s"][0].as_py() == 1.5 and table["duration_s"][0].as_py() == 2.0


def test_an_offset_past_the_end_of_the_file_is_a_bad_manifest_line(tmp_path):
    from pipeline.audio import AudioError, load_audio

    soundfile.write(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000)
    for duration in (None, 1.0):
        with pytest.raises(AudioError) as caught:
            load_audio(str(tmp_path / "a.wav"), 16000, offset_s=97.5, duration_s=duration)
        assert caught.value.reason == "bad_manifest_line"
        assert str(caught.value) == f"bad_manifest_line: {tmp_path / 'a.wav'}: offset 97.5 s is past the end of the file (1.00 s)"


def s2t_transcribe(manifest, output) -> subprocess.CompletedProcess:
    from s2t_model import DEMO_MODEL

    return subprocess.run([sys.executable, "-m", "jobs.cli", "transcribe", str(manifest), str(output), "--model",
                           DEMO_MODEL], capture_output=True, text=True, timeout=300)


def test_a_jsonl_of_json_arrays_is_refused_in_one_line_before_ray_starts(tmp_path):
    (tmp_path / "m.jsonl").write_text('["a.flac", "one"]\n["b.flac", "two"]\n')
    done = s2t_transcribe(tmp_path / "m.jsonl", tmp_path / "out")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"s2t transcribe: {tmp_path / 'm.jsonl'}: no line of the first 2 is a manifest row "
        f"(line 1: not a JSON object (a JSON list, not an object): '[\"a.flac\", \"one\"]')"]
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_is_refused_in_one_line_before_ray_starts(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.flac"}) + "\n")
    (tmp_path / "out").write_text("not a folder")
    done = s2t_transcribe(tmp_path / "m.jsonl", tmp_path / "out")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [f"s2t transcribe: {tmp_path / 'out'}: the output is a file, not a folder"]


@pytest.mark.parametrize("text", ["", "id,audio\n"])
def test_an_empty_manifest_gives_a_summary_of_no_rows(ray_session, tmp_path, text):
    from pipeline.transcribe import TranscribeConfig, run
    from s2t_model import DEMO_MODEL

    (tmp_path / "m.csv").write_text(text)
    summary = run(TranscribeConfig(manifest=str(tmp_path / "m.csv"), output=str(tmp_path / "out"), model=DEMO_MODEL))
    assert summary["rows_in"] == summary["rows_out"] == summary["rows_missing"] == 0
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["rows_in"] == 0


def wav_claiming_more_data(path, samples: np.ndarray, rate: int, factor: int) -> None:
    """A 16-bit WAV whose RIFF and data chunk sizes claim `factor` times the samples it holds (a copy cut short)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    at = data.index(b"data")
    size = int.from_bytes(data[at + 4:at + 8], "little")
    data[at + 4:at + 8] = (size * factor).to_bytes(4, "little")
    data[4:8] = (len(data) - 8 + size * (factor - 1)).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_audio_that_is_not_there_is_truncated_by_one_rule(ray_session, tmp_path):
    """A duration past the end of the file, below and above --max-segment-s, and a WAV header claiming far more data
    than the file holds: each row is `truncated`, none is transcribed from what exists."""
    from pipeline.transcribe import TranscribeConfig, run
    from s2t_model import DEMO_MODEL

    clips = [soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in demo_rows(1)]
    audio = np.concatenate(clips * 2)
    seconds = len(audio) / 16000
    assert 5 < seconds < 14
    soundfile.write(tmp_path / "a.wav", audio, 16000)
    wav_claiming_more_data(tmp_path / "lying.wav", clips[0][:32000], 16000, factor=10)
    lines = [{"id": "whole", "audio": "a.wav", "duration": round(seconds, 2)},
             {"id": "past_end_15", "audio": "a.wav", "duration": 15.0},
             {"id": "past_end_25", "audio": "a.wav", "duration": 25.0},
             {"id": "past_end_offset", "audio": "a.wav", "offset": 2.0, "duration": seconds},
             {"id": "lying_header", "audio": "lying.wav"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = run(TranscribeConfig(manifest=str(tmp_path / "m.jsonl"), output=str(tmp_path / "out"),
                                   model=DEMO_MODEL, num_beams=1, max_segment_s=20.0))
    rows = {row["id"]: row for f in (tmp_path / "out").rglob("*.parquet") for row in pq.read_table(f).to_pylist()}
    assert sorted(rows) == sorted(line["id"] for line in lines)
    assert rows["whole"]["error"] is None and rows["whole"]["text"]
    for name in ("past_end_15", "past_end_25", "past_end_offset", "lying_header"):
        assert (rows[name]["error"] or "").startswith("truncated: "), (name, rows[name]["error"])
        assert rows[name]["text"] is None
    assert summary["errors_by_reason"] == {"truncated": 4}
    assert summary["audio_hours"] * 3600 == pytest.approx(seconds, abs=0.1)


def test_two_runs_started_at_once_on_one_output_write_every_id_once(ray_session, tmp_path):
    """The second run is refused, naming the first (the lease `s2t backfill` takes)."""
    import os

    from s2t_model import DEMO_MODEL

    rows = demo_rows(12)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = [sys.executable, "-m", "jobs.transcribe", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--model",
               DEMO_MODEL, "--num-beams", "1", "--rows-per-file", "2", "--batch-size", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    ids = [i for f in (tmp_path / "out").rglob("*.parquet") for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every id exactly once
    assert sorted(rc for rc, _, _ in results) == [0, 1], [err[-2000:] for _, _, err in results]
    first_run_id = json.loads((tmp_path / "out" / "_summary.json").read_text())["run_id"]
    refused = next(err for rc, _, err in results if rc)
    assert refused.strip().splitlines()[-1].startswith(f"s2t transcribe: {tmp_path / 'out' / '_lease.json'}: run "
                                                       f"{first_run_id} (pid ")


def fast_job(manifest, output, **options):
    from pipeline.transcribe import TranscribeConfig, run
    from s2t_model import DEMO_MODEL

    return run(TranscribeConfig(manifest=str(manifest), output=str(output), model=DEMO_MODEL, num_beams=1,
                                rows_per_file=2, batch_size=2, rows_per_block=2, **options))


@pytest.mark.parametrize("foreign", ["manifest.parquet", "string_ids.parquet", "part-0.parquet", "notes.txt"])
def test_an_output_folder_holding_files_the_job_did_not_write_is_refused_before_any_work(ray_session, tmp_path,
                                                                                        foreign):
    """A Parquet manifest kept in its output folder, an unrelated file with a string `id`, one a run of the job
    could have written but did not name: refused, naming the file, whether or not the job wrote there before."""
    from pipeline.output import OutputError

    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "audio": "a.flac"}) + "\n")
    for earlier_run in (False, True):
        out = tmp_path / f"out-{earlier_run}"
        out.mkdir()
        if earlier_run:  # what a run of the job leaves (the marker is the job's own)
            (out / "_s2t_output.json").write_text('{"written_by": "s2t transcribe"}')
            (out / "_summary.json").write_text("{}")
        pq.write_table(pa.table({"id": ["a", "b"], "audio": ["a.flac", "b.flac"]}), out / foreign)
        with pytest.raises(OutputError) as caught:
            fast_job(tmp_path / "m.jsonl", out)
        assert str(out / foreign) in str(caught.value) and "not written by s2t transcribe" in str(caught.value)
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [foreign] + (["_s2t_output.json", "_summary.json"] if earlier_run else []))  # nothing done


def test_a_torn_output_file_is_removed_and_its_rows_done_again(ray_session, tmp_path):
    """Real output files cut at several byte counts (what a run killed mid-write leaves) -> the rerun removes them
    and writes their rows again; every id exactly once."""
    rows = demo_rows(8)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    fast_job(tmp_path / "m.jsonl", out)
    files = sorted(out.glob("*.parquet"))
    assert len(files) >= 3
    torn_rows = 0
    for path, keep in zip(files, (4, 0.5, -1)):
        data = path.read_bytes()
        torn_rows += pq.read_metadata(path).num_rows
        path.write_bytes(data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)])
    summary = fast_job(tmp_path / "m.jsonl", out)
    ids = [i for f in out.glob("*.parquet") for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert summary["rows_this_run"] == torn_rows and summary["rows_duplicated"] == summary["rows_missing"] == 0
