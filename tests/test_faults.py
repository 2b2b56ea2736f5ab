"""Faults of the store, injected by a proxy in front of the tests' S3 server (tests/helpers.py `start_fault_proxy`:
500 InternalError, 503 SlowDown, resets before an answer and in the middle of a body, stalls, answers lost after the
store did the work): classified as the store's (`unavailable`, retryable), read again, and repaired by a rerun;
never reported as the input's fault, never a hole or a double in the output."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import soundfile
from helpers import Fault, demo_rows, killed_mid_job, start_fault_proxy

from pipeline.lease import Lease
from pipeline.reasons import Reason
from pipeline.storage import ClientRetry, RowRetry, with_client_retry
from s2t_model import DEMO_MODEL, FeatureExtractor

CREDENTIALS = {"key": "testing", "secret": "testing"}
# The job's defaults, but a stall cut at 2 s and rows read again after at most 0.1 s (the tests' time).
FAST = ClientRetry(read_timeout_s=2.0)


@pytest.fixture(scope="module")
def store(s3_endpoint):
    """(the proxy, an s3fs filesystem straight to the server, the proxy's URL)."""
    proxy, url = start_fault_proxy(s3_endpoint)
    direct = s3fs.S3FileSystem(
        **CREDENTIALS, client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True, use_listings_cache=False
    )
    yield proxy, direct, url
    proxy.shutdown()


@pytest.fixture
def bucket(store):
    proxy, direct, url = store
    name = f"s2t-faults-{uuid.uuid4().hex[:10]}"
    direct.mkdir(name)
    proxy.faults.clear()
    proxy.injected.clear()  # the counts are each test's own
    yield name
    proxy.faults.clear()


def through(url: str) -> dict:
    """fsspec options that reach the store through the proxy, with the job's client retry settings."""
    return with_client_retry({**CREDENTIALS, "client_kwargs": {"endpoint_url": url}, "skip_instance_cache": True}, FAST)


def stage(url: str, attempts: int = RowRetry.attempts):
    from pipeline.stages import ComputeFeatures, FeatureOptions

    return ComputeFeatures(
        FeatureOptions(
            FeatureExtractor.from_pretrained(DEMO_MODEL).to_dict(),
            0.1,
            60.0,
            storage_options=through(url),
            vad="off",
            row_retry=RowRetry(attempts, 0.05),
        )
    )


def row(uri: str) -> dict:
    return {"id": "x", "audio": uri, "offset_s": 0.0, "duration_s": None, "error": None}


def test_a_500_is_unavailable_a_404_missing_and_a_burst_of_resets_is_read_again(store, bucket):
    proxy, direct, url = store
    clip = demo_rows(1)[0]["audio_filepath"]
    direct.put_file(clip, f"{bucket}/a.flac")
    local = soundfile.read(clip, dtype="float32")[0]
    actor = stage(url, attempts=4)

    proxy.faults[:] = [Fault("500", path=f"/{bucket}/a.flac")]  # every time
    error = actor.load(row(f"s3://{bucket}/a.flac"))
    assert isinstance(error, str) and error.startswith("unavailable: ") and "internal error" in error
    assert not Reason(error.split(":")[0]).final
    assert proxy.injected["500"] == 4 * FAST.attempts  # each row read: botocore's attempts, then the row's own
    assert actor.load(row(f"s3://{bucket}/nothing-here.flac")).startswith("missing: ")

    # Seven bodies cut short in a row: more than the client's own tries of a read (s3fs gives up after 5, or 2
    # here), fewer than the row's reads again.
    proxy.faults[:] = [Fault("reset_body", path=f"/{bucket}/a.flac", first=7)]
    np.testing.assert_array_equal(actor.load(row(f"s3://{bucket}/a.flac")), local)
    proxy.faults[:] = [
        Fault("reset", path=f"/{bucket}/a.flac", first=2),
        Fault("stall", path=f"/{bucket}/a.flac", first=1, stall_s=4),
    ]
    np.testing.assert_array_equal(actor.load(row(f"s3://{bucket}/a.flac")), local)
    assert proxy.injected["stall"] == 1


def test_a_lease_whose_create_answer_was_lost_is_the_runs_own(store, bucket):
    proxy, direct, url = store
    fs = s3fs.S3FileSystem(**through(url), use_listings_cache=False)
    proxy.faults[:] = [Fault("lost_answer", methods=("PUT",), path="_lease.json", first=1)]
    with Lease(fs, f"{bucket}/out", "run-1", ttl_s=60):
        assert proxy.injected["lost_answer"] == 1
        assert json.loads(direct.cat_file(f"{bucket}/out/_lease.json"))["run_id"] == "run-1"
    assert not direct.exists(f"{bucket}/out/_lease.json")


def test_serve_fetches_its_model_through_503s_and_cut_bodies_and_names_a_dead_store_unavailable(
    ray_session, store, bucket
):
    """A Serve replica whose checkpoint is on S3 behind the proxy: 503s and bodies cut short on the checkpoint's
    GETs, more than the client's own tries, are fetched again and it serves; a store answering 500 every time
    fails the deployment with the store named unavailable (after its fetches), not with a generic crash."""
    import httpx
    from conftest import free_port
    from ray import serve

    from pipeline.serve import build_app

    proxy, direct, url = store
    direct.put(DEMO_MODEL, f"{bucket}/model", recursive=True)
    options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": url}}
    config = {"model": f"s3://{bucket}/model", "storage_options": options, "read_backoff_s": 0.05, "vad": "off"}
    clip = demo_rows(1)[0]
    # Three 503s in a row: past botocore's three attempts of the first GET. Eight bodies cut short: s3fs gives a
    # download two, so the replica's fetches again take them; without those, Serve's own three starts of a replica
    # that crashed (six) would not.
    proxy.faults[:] = [
        Fault("503", methods=("GET",), path=f"/{bucket}/model/", first=3),
        Fault("reset_body", methods=("GET",), path="model.safetensors", first=8),
    ]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({**config, "read_attempts": 5}), name="s2t-flaky-store", route_prefix="/flaky")
        assert (proxy.injected["503"], proxy.injected["reset_body"]) == (3, 8)
        with open(clip["audio_filepath"], "rb") as f:
            answer = httpx.post(f"http://127.0.0.1:{port}/flaky/v1/audio/transcriptions", files={"file": f}, timeout=60)
        assert answer.json()["text"] == clip["text"], answer.text
        serve.delete("s2t-flaky-store")

        direct.put(DEMO_MODEL, f"{bucket}/other-model", recursive=True)  # not in the replicas' cache
        proxy.faults[:] = [Fault("500", path=f"{bucket}/other-model")]
        with pytest.raises(RuntimeError) as failed:
            serve.run(
                build_app({**config, "model": f"s3://{bucket}/other-model", "read_attempts": 2}),
                name="s2t-dead-store",
                route_prefix="/dead",
            )
        assert "s2t-dead-store failed" in str(failed.value)
        # The replica's error, as `serve status` shows it (Serve gave up on its constructor after its own retries).
        message = serve.status().applications["s2t-dead-store"].deployments["Speech2TextServer"].message
        assert f"the store is unavailable: the model s3://{bucket}/other-model, 2 reads" in message, message[-2000:]
        assert "internal error" in message and proxy.injected["500"] >= 2 * FAST.attempts
        print("the replica's error:", message.strip().splitlines()[-1])
    finally:
        serve.shutdown()


def tar_of(clips: list[tuple[str, bytes]], text: bool = True) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for key, data in clips:
            members = [(f"{key}.flac", data)] + ([(f"{key}.txt", key.encode())] if text else [])
            for name, body in members:
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def clip_bytes(count: int) -> list[tuple[str, bytes]]:
    rows = demo_rows(count)
    return [(f"clip-{i:02d}", open(r["audio_filepath"], "rb").read()) for i, r in enumerate(rows)]


def test_500s_and_resets_on_tar_shards_are_read_again_never_damage(ray_session, store, bucket):
    """WebDataset shards (Ray Data's read tasks, its retries made to see our store's errors) and a NeMo tar (read
    again by its task) behind 500s and resets: every sample once, no damage row."""
    from pipeline.manifest import Manifest
    from pipeline.output import arrow_filesystem
    from pipeline.shards import read_nemo_shard
    from pipeline.storage import retry_store_errors

    proxy, direct, url = store
    clips = clip_bytes(10)
    direct.pipe_file(f"{bucket}/wds/shard-000000.tar", tar_of(clips[:5]))
    direct.pipe_file(f"{bucket}/wds/shard-000001.tar", tar_of(clips[5:]))
    retry_store_errors()
    manifest = Manifest(f"s3://{bucket}/wds/shard-{{000000..000001}}.tar", through(url))
    # Past the client's tries: the first shard's first four GETs 500 (botocore tries three), the second's bodies
    # cut short five times (more than s3fs gives one read: two tries).
    proxy.faults[:] = [
        Fault("500", methods=("GET",), path="shard-000000", first=4),
        Fault("reset_body", methods=("GET",), path="shard-000001", first=5),
    ]
    rows = manifest.dataset(2, arrow_filesystem(manifest.fs)).select_columns(["id", "error"]).take_all()
    assert proxy.injected["500"] == 4 and proxy.injected["reset_body"] == 5
    assert sorted(r["id"] for r in rows) == sorted(f"shard-00000{i // 5}/{key}" for i, (key, _) in enumerate(clips))
    assert [r for r in rows if r["error"]] == []

    direct.pipe_file(f"{bucket}/nemo/audio_0.tar", tar_of(clips, text=False))
    members = pa.table(
        {
            "id": [k for k, _ in clips],
            "audio": [f"{k}.flac" for k, _ in clips],
            "error": pa.nulls(len(clips), pa.string()),
            "_shard": [0] * len(clips),
        }
    )
    proxy.faults[:] = [Fault("mixed", methods=("GET",), path="audio_0.tar", first=12)]
    fs = s3fs.S3FileSystem(**through(url))
    blocks = list(
        read_nemo_shard(
            members,
            {0: (f"{bucket}/nemo/audio_0.tar", f"s3://{bucket}/nemo/audio_0.tar")},
            arrow_filesystem(fs),
            4,
            "audio_{0..0}.tar",
            retry=RowRetry(4, 0.05),
        )
    )
    out = pa.concat_tables(blocks)
    assert sorted(out["id"].to_pylist()) == sorted(k for k, _ in clips) and out["error"].null_count == len(clips)
    assert dict(zip(out["id"].to_pylist(), out["audio_bytes"].to_pylist())) == dict(clips)


def run_job(args: list[str]) -> tuple[int, dict]:
    """`s2t transcribe` in this process (the tests' Ray) -> (its exit status, its summary)."""
    import argparse

    from jobs import transcribe

    parser = argparse.ArgumentParser()
    transcribe.add_arguments(parser)
    try:
        summary = transcribe.main(parser.parse_args(args))
        return 0, summary
    except SystemExit as exit:
        return exit.code, None


def output_table(direct, folder: str) -> pa.Table:
    tables = []
    for path in sorted(direct.find(folder)):
        if path.endswith(".parquet") and "/_s2t/" not in path:
            with direct.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=["id", "error", "text"]))
    return pa.concat_tables(tables)


@pytest.mark.slow
def test_a_job_behind_faults_reports_the_stores_rows_unavailable_and_a_rerun_repairs_them(ray_session, store, bucket):
    """30 % mixed faults on the audio's reads and the output's Parquet writes, 10 % on every other request, one clip
    answering 500 every time, a stall, the lease's create answer lost: the first run transcribes every clip but
    the broken one, which is `unavailable`, and exits 75; the rerun, the faults gone, does that one, exits 0."""
    proxy, direct, url = store
    rows = demo_rows(16)
    lines = []
    for i, r in enumerate(rows):
        direct.put_file(r["audio_filepath"], f"{bucket}/corpus/audio/{r['id']}.flac")
        lines.append(json.dumps({"id": r["id"], "audio_filepath": f"audio/{r['id']}.flac", "text": r["text"]}))
    direct.pipe_file(f"{bucket}/corpus/manifest.jsonl", "\n".join(lines).encode())
    broken, stalled = rows[3]["id"], rows[5]["id"]
    proxy.faults[:] = [
        Fault("500", path=f"/audio/{broken}.flac"),
        Fault("stall", path=f"/audio/{stalled}.flac", first=1, stall_s=5),
        Fault("lost_answer", methods=("PUT",), path="_lease.json", first=1),
        Fault("mixed", rate=0.3, methods=("GET", "HEAD"), path="/corpus/audio/"),
        Fault("mixed", rate=0.3, methods=("PUT",), path=".parquet"),
        Fault("mixed", rate=0.1),
    ]
    args = [
        f"s3://{bucket}/corpus/manifest.jsonl",
        f"s3://{bucket}/out",
        "--model",
        DEMO_MODEL,
        "--s3-endpoint-url",
        url,
        "--storage-options",
        json.dumps(CREDENTIALS),
        "--num-beams",
        "1",
        "--rows-per-file",
        "4",
        "--rows-per-block",
        "4",
        "--batch-size",
        "4",
        "--feature-batch-size",
        "4",
        "--s3-read-timeout-s",
        "2",
        "--read-backoff-s",
        "0.1",
    ]
    status, _ = run_job(args)
    summary = json.loads(direct.cat_file(f"{bucket}/out/_s2t/summary.json"))
    out = output_table(direct, f"{bucket}/out")
    faults = dict(proxy.injected)
    assert status == 75, faults
    assert sorted(out["id"].to_pylist()) == sorted(r["id"] for r in rows)  # every id once
    errors = {i: e for i, e in zip(out["id"].to_pylist(), out["error"].to_pylist()) if e}
    assert list(errors) == [broken] and errors[broken].startswith("unavailable: ")
    assert summary["errors_by_reason"] == {"unavailable": 1} and summary["rows_retryable"] == 1
    assert (summary["rows_ok"], summary["rows_missing"], summary["rows_duplicated"]) == (len(rows) - 1, 0, 0)
    assert faults["stall"] == faults["lost_answer"] == 1 and faults["500"] >= 9
    assert all(faults.get(kind, 0) > 0 for kind in ("503", "reset", "reset_body")), faults

    proxy.faults.clear()
    status, summary = run_job(args)
    out = output_table(direct, f"{bucket}/out")
    assert status == 0 and summary["rows_this_run"] == 1 and summary["rows_retryable"] == 0
    assert sorted(out["id"].to_pylist()) == sorted(r["id"] for r in rows)
    assert out["error"].null_count == len(rows) and all(out["text"].to_pylist())
    assert (summary["rows_ok"], summary["rows_missing"], summary["rows_duplicated"]) == (len(rows), 0, 0)


@pytest.mark.slow
def test_retry_errors_redoes_final_errors_once_even_when_the_rerun_is_killed(ray_session, tmp_path):
    """Rows missing their files are final errors: the job exits 0 with them. With the files
    back, `--retry-errors missing` does them again; killed half-way and run again, each id is in the output once."""
    rows = demo_rows(12)
    gone = {r["id"]: r["audio_filepath"] for r in rows[:4]}
    for r in rows:
        if r["id"] in gone:
            os.makedirs(tmp_path / "hidden", exist_ok=True)
            r["audio_filepath"] = str(tmp_path / "hidden" / os.path.basename(gone[r["id"]]))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out"
    args = [
        str(manifest),
        str(output),
        "--model",
        DEMO_MODEL,
        "--num-beams",
        "1",
        "--rows-per-file",
        "2",
        "--rows-per-block",
        "2",
        "--batch-size",
        "2",
        "--feature-batch-size",
        "2",
    ]
    status, summary = run_job(args)
    assert status == 0 and summary["errors_by_reason"] == {"missing": 4} and summary["rows_retryable"] == 0

    for r in rows:
        if r["id"] in gone:
            with open(gone[r["id"]], "rb") as source, open(r["audio_filepath"], "wb") as copy:
                copy.write(source.read())
    killed_mid_job(str(manifest), output, ray_session, files=1, options=["--retry-errors", "missing"])
    status, summary = run_job(args + ["--retry-errors", "missing"])
    table = pa.concat_tables([pq.read_table(f, columns=["id", "error"]) for f in output.glob("*.parquet")])
    assert status == 0 and sorted(table["id"].to_pylist()) == sorted(r["id"] for r in rows)
    assert table["error"].null_count == len(rows)
    assert (summary["rows_ok"], summary["rows_missing"], summary["rows_duplicated"]) == (len(rows), 0, 0)


@pytest.mark.slow
def test_as_many_one_cpu_generation_actors_as_cpus_do_not_starve_the_read_tasks(tmp_path):
    """`--generation-actors 2` on a Ray of 2 CPUs (its own, in a process of its own): the actors would reserve
    both, leaving the manifest's read task none; the job completes."""
    rows = demo_rows(4)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = (
        "import ray, sys; ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False); "
        "from jobs.cli import main; main(sys.argv[1:])"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "transcribe",
            str(manifest),
            str(tmp_path / "out"),
            "--model",
            DEMO_MODEL,
            "--num-beams",
            "1",
            "--generation-actors",
            "2",
        ],
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(tmp_path / "out", columns=["id", "error"])
    assert sorted(table["id"].to_pylist()) == sorted(r["id"] for r in rows) and table["error"].null_count == len(rows)


def test_a_backfill_leaving_the_stores_pairs_exits_75_and_its_rerun_does_them(ray_session, store, bucket):
    """The backfill tells a scheduler the truth as `s2t transcribe` does: a clip answering 500 every time leaves its
    pair `unavailable` and the run exits 75; the rerun, the fault gone, does that pair alone and exits 0."""
    import argparse

    from jobs import backfill

    proxy, direct, url = store
    rows = demo_rows(4)
    for r in rows:
        direct.put_file(r["audio_filepath"], f"{bucket}/corpus/audio/{r['id']}.flac")
    direct.pipe_file(
        f"{bucket}/corpus/manifest.jsonl",
        "\n".join(json.dumps({"id": r["id"], "audio_filepath": f"audio/{r['id']}.flac"}) for r in rows).encode(),
    )
    proxy.faults[:] = [Fault("500", path=f"/audio/{rows[1]['id']}.flac")]
    parser = argparse.ArgumentParser()
    backfill.add_arguments(parser)
    args = parser.parse_args(
        [
            "--manifest",
            f"s3://{bucket}/corpus/manifest.jsonl",
            "--output",
            f"s3://{bucket}/out",
            "--model",
            DEMO_MODEL,
            "--tgt-langs",
            "fr",
            "--s3-endpoint-url",
            url,
            "--storage-options",
            json.dumps(CREDENTIALS),
            "--num-beams",
            "1",
            "--s3-read-timeout-s",
            "2",
            "--read-backoff-s",
            "0.1",
        ]
    )
    with pytest.raises(SystemExit) as exit:
        backfill.main(args)
    assert exit.value.code == 75
    errors = [e for e in output_table(direct, f"{bucket}/out")["error"].to_pylist() if e]
    assert len(errors) == 1 and errors[0].startswith("unavailable: ")

    proxy.faults.clear()
    summary = backfill.main(args)
    assert (summary["pairs_written"], summary["pairs_errored"], summary["pairs_retryable"]) == (1, 0, 0)
    out = output_table(direct, f"{bucket}/out")
    assert out.num_rows == len(rows) and out["error"].null_count == len(rows)


@pytest.mark.parametrize("fault", ["500", "reset_body"])
@pytest.mark.parametrize("container", ["wav", "mka"])
def test_a_store_failing_while_a_streamed_file_is_decoded_is_unavailable_not_the_files_fault(
    store, bucket, fault, container
):
    """A file over WHOLE_FILE_BYTES is decoded while streamed (WAV by libsndfile, Matroska by PyAV): the store
    failing then (every GET after the HEAD answered 500, or cut short) is `unavailable`, retryable; never `corrupt`
    or `truncated`, the file's fault."""
    from bench.decode import encode_audio
    from pipeline.audio import WHOLE_FILE_BYTES

    proxy, direct, url = store
    rate = 16000
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, int(WHOLE_FILE_BYTES / 2 * 1.2)).astype(np.float32)
    data = io.BytesIO()
    if container == "wav":
        soundfile.write(data, samples, rate, format="WAV", subtype="PCM_16")
        data = data.getvalue()
    else:
        data = encode_audio(samples, rate, "matroska", "pcm_s16le")
    assert len(data) > WHOLE_FILE_BYTES
    direct.pipe_file(f"{bucket}/big.{container}", data)
    actor = stage(url, attempts=2)
    actor.options = dataclasses.replace(actor.options, max_duration_s=7200.0)

    proxy.faults[:] = [Fault(fault, methods=("GET",), path=f"/{bucket}/big.{container}")]
    error = actor.load(row(f"s3://{bucket}/big.{container}"))
    assert isinstance(error, str) and error.startswith("unavailable: "), error


def test_an_older_versions_store_failures_are_redone_by_the_next_run(ray_session, tmp_path):
    """Before `unavailable`, a 500 was written as `missing: ... cannot be opened ([Errno 121] Internal Server
    Error)`: a rerun by this version counts such rows as the store's and does them again unasked, while a real
    `missing` (no such file) stays final."""
    rows = demo_rows(4)
    hidden = {}
    for r in rows[:2]:
        hidden[r["id"]] = r["audio_filepath"]
        r["audio_filepath"] = str(tmp_path / os.path.basename(r["audio_filepath"]))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out"
    args = [str(manifest), str(output), "--model", DEMO_MODEL, "--num-beams", "1", "--rows-per-file", "2"]
    status, summary = run_job(args)
    assert status == 0 and summary["errors_by_reason"] == {"missing": 2}

    old_store_failure = rows[0]["id"]  # as an older version wrote a 500; rows[1] stays a real `missing`
    for path in output.glob("*.parquet"):
        table = pq.read_table(path)
        errors = [
            f"missing: {rows[0]['audio_filepath']}: cannot be opened ([Errno 121] Internal Server Error)"
            if i == old_store_failure
            else e
            for i, e in zip(table["id"].to_pylist(), table["error"].to_pylist())
        ]
        pq.write_table(
            table.set_column(table.column_names.index("error"), "error", pa.array(errors, pa.string())), path
        )
    for r in rows[:2]:
        with open(hidden[r["id"]], "rb") as source, open(r["audio_filepath"], "wb") as copy:
            copy.write(source.read())

    status, summary = run_job(args)
    table = pa.concat_tables([pq.read_table(f, columns=["id", "error", "text"]) for f in output.glob("*.parquet")])
    out = {i: (e, t) for i, e, t in zip(*(table[c].to_pylist() for c in ("id", "error", "text")))}
    assert status == 0 and sorted(out) == sorted(r["id"] for r in rows)
    assert out[old_store_failure][0] is None and out[old_store_failure][1]
    assert out[rows[1]["id"]][0].startswith("missing: ")  # final: done again only with --retry-errors
    assert summary["rows_this_run"] == 1 and summary["errors_by_reason"] == {"missing": 1}


def test_the_python_and_arrow_readings_of_an_error_give_the_same_reason():
    from pipeline.reasons import reason_word, reason_words

    errors = [
        "missing: s3://b/a.flac: cannot be opened ([Errno 121] Internal Server Error)",  # an older version's 500
        "unreadable: s3://b/a.flac: ClientPayloadError: Response payload is not completed",
        "corrupt: s3://b/shard.tar: not a tar file ([Errno 121] We encountered an internal error)",
        "missing: s3://b/a.flac: no such file",
        "unreadable: /a.bin: not audio any decoder reads",
        "too_long: /a.flac: 5 h",
        "unavailable: s3://b/a.flac: the store failed after its retries (OSError: x)",
    ]
    expected = ["unavailable"] * 3 + ["missing", "unreadable", "too_long", "unavailable"]
    assert [reason_word(e) for e in errors] == expected
    assert reason_words(pa.array(errors + [None], pa.string())).to_pylist() == expected + [None]
