"""Translation backfills end to end with the bundled model: incremental runs, a killed run, a concurrent run."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SMALL_RUN, demo_rows

from pipeline.backfill import BackfillConfig, run
from pipeline.lease import LeaseHeld
from s2t_model import DEMO_MODEL

SMALL = dict(batch_size=4, feature_batch_size=4, rows_per_file=4, rows_per_block=4, num_beams=1)


def manifest(tmp_path, count: int) -> str:
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(count)))
    return str(path)


def pairs(output) -> Counter:
    """(id, language) -> how many rows the output holds for it; the language is a column of the rows."""
    counts = Counter()
    for f in output.glob("*.parquet"):
        table = pq.read_table(f, columns=["id", "tgt_lang"])
        counts.update(zip(table.column("id").to_pylist(), table.column("tgt_lang").to_pylist()))
    return counts


def test_incremental_runs_write_only_missing_pairs(ray_session, tmp_path):
    source, output = manifest(tmp_path, 6), tmp_path / "out"
    ids = [row["id"] for row in demo_rows(6)]
    config = dict(manifest=source, output=str(output), model=DEMO_MODEL, **SMALL)

    first = run(BackfillConfig(tgt_langs="fr,de", **config))
    assert pairs(output) == Counter({(i, lang): 1 for i in ids for lang in ("fr", "de")})
    assert first["pairs_written"] == 12 and first["pairs_errored"] == 0
    assert first["bleu"]["fr"] >= 50  # references: the manifest's text_fr

    second = run(BackfillConfig(tgt_langs="fr,de", **config))
    assert second["pairs_written"] == 0
    assert sum(pairs(output).values()) == 12

    third = run(BackfillConfig(tgt_langs="fr,de,es", **config))
    assert third["pairs_written"] == 6
    assert pairs(output) == Counter({(i, lang): 1 for i in ids for lang in ("fr", "de", "es")})
    every = pa.concat_tables(pq.read_table(f) for f in output.glob("*.parquet"))
    es = every.filter(pa.compute.equal(every["tgt_lang"], "es"))
    assert set(es.column("run_id").to_pylist()) == {third["run_id"]}
    texts = dict(zip(es.column("id").to_pylist(), es.column("text").to_pylist()))
    assert texts[ids[0]] == demo_rows(1)[0]["text_es"]


def test_errored_pairs_are_retried_only_when_asked(ray_session, tmp_path):
    rows = demo_rows(2) + [{"id": "gone", "audio_filepath": str(tmp_path / "gone.flac"), "text": "x"}]
    source = tmp_path / "m.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    config = dict(manifest=str(source), output=str(output), model=DEMO_MODEL, tgt_langs="fr", **SMALL)
    assert run(BackfillConfig(**config))["pairs_errored"] == 1
    assert run(BackfillConfig(**config))["pairs_written"] == 0
    retried = run(BackfillConfig(retry_errors=True, **config))
    assert retried["pairs_written"] == 1 and retried["errors_by_reason"] == {"missing": 1}
    assert pairs(output) == Counter({(row["id"], "fr"): 1 for row in rows})


def test_a_concurrent_run_is_refused_and_a_killed_run_is_completed(ray_session, tmp_path):
    source, output = manifest(tmp_path, 16), tmp_path / "out"
    ids = [row["id"] for row in demo_rows(16)]
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.backfill",
            "--manifest",
            source,
            "--output",
            str(output),
            "--model",
            DEMO_MODEL,
            "--tgt-langs",
            "fr,de",
            *SMALL_RUN,
        ],
        env={**os.environ, "RAY_ADDRESS": ray_session},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list(output.rglob("*.parquet"))) < 2 and driver.poll() is None:
        time.sleep(0.2)
    assert driver.poll() is None, "the first run ended before the test could overlap it"
    with pytest.raises(LeaseHeld, match="is filling in this output"):
        run(BackfillConfig(manifest=source, output=str(output), model=DEMO_MODEL, tgt_langs="fr,de", **SMALL))
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    written = sum(1 for f in output.rglob("*.parquet") if f.stat().st_size > 0)
    assert written >= 1

    # Its lease names a dead process on this host: the rerun takes it over and writes only what is missing.
    rerun = run(BackfillConfig(manifest=source, output=str(output), model=DEMO_MODEL, tgt_langs="fr,de", **SMALL))
    assert rerun["pairs_written"] < 32
    assert pairs(output) == Counter({(i, lang): 1 for i in ids for lang in ("fr", "de")})
    assert not (output / "_s2t" / "_lease.json").exists()


@pytest.mark.parametrize("foreign", ["manifest.parquet", "tgt_lang=fr/part-0.parquet", "tgt_lang=fr/notes.txt"])
def test_an_output_folder_holding_files_the_jobs_did_not_write_is_refused_before_any_work(place, foreign):
    """As for `s2t transcribe`: a folder holding anything but the jobs' own files (in a language's folder too) is
    refused before any work, naming the file, whether or not a backfill wrote there before."""
    from pipeline.output import OutputError

    place.write("m.jsonl", json.dumps({"id": "a", "audio": "a.flac"}) + "\n")
    own = ["_s2t/runs/20261201T000000-a1b2c3.json", "_s2t/output.json", f"s2t-{'a' * 32}_000000-0.parquet"]
    for earlier_run in (False, True):
        out = f"out-{earlier_run}"
        if earlier_run:  # what a backfill leaves
            for name in own:
                place.write(f"{out}/{name}", "{}")
        with place.fs.open(place.path(f"{out}/{foreign}"), "wb") as f:
            pq.write_table(pa.table({"id": ["a"], "audio": ["a.flac"], "tgt_lang": ["fr"]}), f)
        with pytest.raises(OutputError) as caught:
            run(
                BackfillConfig(
                    manifest=place.url("m.jsonl"),
                    output=place.url(out),
                    model=DEMO_MODEL,
                    tgt_langs="fr",
                    **place.options,
                    **SMALL,
                )
            )
        assert f"holds files not written by s2t transcribe or s2t backfill: {place.url(f'{out}/{foreign}')};" in str(
            caught.value
        )
        assert place.names(out) == sorted([foreign] + (own if earlier_run else []))  # nothing done


def test_a_backfill_over_webdataset_shards_streams_their_audio(ray_session, tmp_path, monkeypatch):
    """Rows of tar shards carry their audio's bytes, once per language: the run streams them to the actors and never
    materializes the pairs (made to fail here), and each pair is translated once, references from the json's text_fr."""
    from test_shards import webdataset_members, write_tar

    from pipeline import backfill

    rows = demo_rows(6)
    for shard, part in enumerate((rows[:3], rows[3:])):
        members = webdataset_members(part, "json")
        for i, row in enumerate(part):  # the json's passthrough fields: each language's reference
            members[2 * i + 1] = (
                members[2 * i + 1][0],
                json.dumps({"id": row["id"], "text": row["text"], "text_fr": row["text_fr"]}).encode(),
            )
        write_tar(tmp_path / f"shard-{shard:06d}.tar", members)

    def unmaterialized(*args, **kwargs):
        pairs = find_pairs(*args, **kwargs)
        pairs.materialize = refused
        return pairs

    def refused(*args, **kwargs):
        raise AssertionError("the backfill materialized its pairs")

    find_pairs = backfill.missing_pairs
    monkeypatch.setattr(backfill, "missing_pairs", unmaterialized)
    output = tmp_path / "out"
    config = dict(manifest=str(tmp_path / "shard-{000000..000001}.tar"), output=str(output), model=DEMO_MODEL, **SMALL)
    first = run(BackfillConfig(tgt_langs="fr,de", **config))
    assert pairs(output) == Counter({(row["id"], lang): 1 for row in rows for lang in ("fr", "de")})
    assert first["pairs_written"] == 12 and first["pairs_errored"] == 0
    assert first["bleu"]["fr"] >= 50
    assert run(BackfillConfig(tgt_langs="fr,de", **config))["pairs_written"] == 0


@pytest.mark.parametrize("job", ["transcribe", "backfill"])
def test_both_jobs_refuse_a_manifest_that_is_not_there_in_one_line_before_ray_starts(tmp_path, job):
    missing = str(tmp_path / "nowhere.jsonl")
    args = (
        [missing, str(tmp_path / "out")]
        if job == "transcribe"
        else ["--manifest", missing, "--output", str(tmp_path / "out")]
    )
    done = subprocess.run(
        [sys.executable, "-m", f"jobs.{job}", *args, "--model", DEMO_MODEL],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"s2t {job}: {missing}: no such manifest"
