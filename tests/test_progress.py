"""The job's progress lines (not a terminal: one every --progress-s seconds, one at the end), counted on the cluster:
they end at the manifest's row count with the errors the output holds, the ETA falls, and a resumed run starts at
the rows the output already held."""

import json
import re

import pyarrow.parquet as pq
import pytest
from helpers import demo_rows

from pipeline.progress import line
from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_MODEL

LINE = re.compile(
    r"^progress: (?P<done>[\d,]+)/(?P<total>[\d,]+) rows \([\d.]+ %\), (?P<hours>[\d.]+) h audio, "
    r"RTFx [\d.]+, (?P<errors>[\d,]+) errors, ETA (?P<eta>\?|\d+:\d\d:\d\d)$"
)


def manifest(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def progress_lines(text: str) -> list[dict]:
    found = []
    for text_line in text.splitlines():
        if text_line.startswith("progress: "):
            match = LINE.match(text_line)
            assert match, text_line
            found.append({k: v.replace(",", "") for k, v in match.groupdict().items()})
    return found


def seconds(eta: str) -> int | None:
    if eta == "?":
        return None
    h, m, s = map(int, eta.split(":"))
    return 3600 * h + 60 * m + s


def job(manifest_path, output, capsys) -> tuple[dict, list[dict]]:
    capsys.readouterr()
    summary = run(
        TranscribeConfig(
            manifest=manifest_path,
            output=str(output),
            model=DEMO_MODEL,
            progress_s=0.2,
            rows_per_block=3,
            batch_size=3,
            rows_per_file=3,
        )
    )
    return summary, progress_lines(capsys.readouterr().err)


def test_progress_lines_count_to_the_manifest_and_a_resume_starts_at_what_was_done(ray_session, tmp_path, capsys):
    rows = demo_rows(24)
    for row in rows[5:7]:  # two rows whose audio is not there: errors, counted as done
        row["audio_filepath"] = str(tmp_path / f"missing-{row['id']}.flac")
    first = manifest(tmp_path / "first.jsonl", rows[:9])
    whole = manifest(tmp_path / "whole.jsonl", rows)
    output = tmp_path / "out"

    summary, lines = job(first, output, capsys)
    assert lines[-1]["done"] == lines[-1]["total"] == "9"
    assert lines[-1]["errors"] == "2" and lines[-1]["eta"] == "0:00:00"

    summary, lines = job(whole, output, capsys)
    held = sum(pq.read_metadata(p).num_rows for p in output.rglob("*.parquet"))
    assert held == summary["rows_in"] == 24
    assert len(lines) >= 3, lines
    done = [int(found["done"]) for found in lines]
    assert all(found["total"] == "24" for found in lines)
    assert done[0] >= 9 and min(done) == 9 < done[-1] == 24  # it starts at what the first run did
    assert done == sorted(done)
    # This run's own errors are none: the two of the first run are done rows, not this run's.
    assert lines[-1]["errors"] == "0"
    assert float(lines[-1]["hours"]) == pytest.approx(summary["audio_hours_this_run"], abs=0.005)
    etas = [seconds(found["eta"]) for found in lines if found["eta"] != "?"]
    assert len(etas) >= 2 and etas[-1] == 0 and etas[0] > 0  # the ETA falls to 0
    # The summary keeps the run's throughput over time, as counted: it ends at this run's rows.
    assert summary["throughput"][-1][1] == 24 - 9


def test_a_line_in_the_middle_of_a_run():
    snapshot = {
        "total": 10_000,
        "done_before": 1_000,
        "rows": 1_000,
        "audio_s": 7200.0,
        "errors": {"unreadable": 3},
        "elapsed_s": 100.0,
    }
    # 1,000 rows in 100 s this run: the 8,000 left take 800 s; 7,200 s of audio in 100 s is RTFx 72.
    assert line(snapshot) == "2,000/10,000 rows (20.0 %), 2.00 h audio, RTFx 72.0, 3 errors, ETA 0:13:20"


def test_backfill_progress_counts_pairs_and_starts_at_those_held(ray_session, tmp_path, capsys):
    from pipeline.backfill import BackfillConfig
    from pipeline.backfill import run as backfill

    source, output = manifest(tmp_path / "m.jsonl", demo_rows(4)), tmp_path / "out"
    small = dict(batch_size=2, rows_per_file=2, rows_per_block=2, num_beams=1, progress_s=0.2)
    backfill(BackfillConfig(manifest=source, output=str(output), model=DEMO_MODEL, tgt_langs="fr", **small))
    capsys.readouterr()
    backfill(BackfillConfig(manifest=source, output=str(output), model=DEMO_MODEL, tgt_langs="fr,de", **small))
    lines = [text for text in capsys.readouterr().err.splitlines() if text.startswith("progress: ")]
    assert lines[0].startswith("progress: 4/8 pairs") and lines[-1].startswith("progress: 8/8 pairs"), lines
