"""The transcription job against a real S3 endpoint: moto's standalone server on 127.0.0.1 holds the manifest (with
audio paths relative to it), the audio and the model folder; the job reads all three and writes its output there."""

import hashlib
import json
import os
import shutil
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from helpers import demo_rows

from pipeline import scoring
from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_CORPUS, DEMO_MODEL, checkpoint

CLIPS = 8
CREDENTIALS = {"key": "testing", "secret": "testing"}


def s3(endpoint: str) -> s3fs.S3FileSystem:
    # A filesystem of its own (not fsspec's shared instance), so its listings cache sees what the job wrote.
    return s3fs.S3FileSystem(**CREDENTIALS, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def worker_cache_root() -> str:
    """The checkpoint cache of Ray's worker processes: they keep the environment Ray was started with."""
    import ray

    return ray.get(ray.remote(num_cpus=0)(checkpoint.cache_root).remote())


def test_manifest_audio_model_and_output_on_s3(ray_session, s3_endpoint, tmp_path, monkeypatch):
    # A bucket of its own per run: the checkpoint cache is keyed by the model's URI, so a fresh URI means the job's
    # actors really copy the model from S3 (and never reuse an earlier run's copy).
    bucket = f"s2t-test-{uuid.uuid4().hex[:12]}"
    fs = s3(s3_endpoint)
    fs.mkdir(bucket)
    rows = demo_rows(CLIPS)
    lines = []
    for row in rows:
        name = os.path.relpath(row["audio_filepath"], DEMO_CORPUS)  # audio/<id>.flac
        fs.put_file(row["audio_filepath"], f"{bucket}/corpus/{name}")
        lines.append(
            json.dumps({"id": row["id"], "audio_filepath": name, "duration": row["duration"], "text": row["text"]})
        )
    fs.pipe_file(f"{bucket}/corpus/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    for name in os.listdir(DEMO_MODEL):
        fs.put_file(os.path.join(DEMO_MODEL, name), f"{bucket}/model/{name}")

    model_uri = f"s3://{bucket}/model"
    cache_folder = hashlib.sha256(model_uri.encode()).hexdigest()[:16]
    monkeypatch.setenv("S2T_CACHE", str(tmp_path / "cache"))  # the driver's copy; Ray's workers keep their own
    worker_root = worker_cache_root()
    worker_root_existed = os.path.isdir(worker_root)
    worker_copy = os.path.join(worker_root, cache_folder)
    assert not os.path.exists(worker_copy)
    try:
        summary = run(
            TranscribeConfig(
                manifest=f"s3://{bucket}/corpus/manifest.jsonl",
                output=f"s3://{bucket}/out",
                model=model_uri,
                s3_endpoint_url=s3_endpoint,
                storage_options=CREDENTIALS,
                batch_size=4,
                feature_batch_size=4,
                num_beams=2,
            )
        )
        # Both the driver (for the label's hash) and the generation actors fetched the checkpoint from S3.
        assert os.path.isfile(tmp_path / "cache" / cache_folder / "model.safetensors")
        assert os.path.isfile(os.path.join(worker_copy, "model.safetensors"))
    finally:
        shutil.rmtree(worker_copy, ignore_errors=True)
        if not worker_root_existed:
            try:
                os.rmdir(worker_root)  # only when the job made it and nothing else is in it
            except OSError:
                pass

    fs = s3(s3_endpoint)
    files = sorted(p for p in fs.find(f"{bucket}/out") if p.endswith(".parquet"))
    assert files
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    out = pa.concat_tables(tables, promote_options="default").to_pylist()
    assert sorted(row["id"] for row in out) == sorted(row["id"] for row in rows)  # each id once, none missing
    assert [(row["id"], row["error"]) for row in out if row["error"]] == []
    references = {row["id"]: row["text"] for row in rows}
    wer = scoring.wer([references[row["id"]] for row in out], [row["text"] for row in out])
    assert wer is not None and wer <= 10.0, [(row["text"], references[row["id"]]) for row in out]
    # The label names the S3 URI and the checkpoint's content: the same bytes as the bundled model.
    label = f"{model_uri}@sha256:{checkpoint.content_hash(DEMO_MODEL)[:16]}"
    assert {row["model"] for row in out} == {label}
    assert all(row["audio"].startswith(f"s3://{bucket}/corpus/audio/") for row in out)

    with fs.open(f"{bucket}/out/_s2t/summary.json") as f:
        written = json.load(f)
    assert written == summary
    assert (written["rows_in"], written["rows_out"], written["rows_ok"], written["rows_error"]) == (CLIPS,) * 3 + (0,)
    assert written["rows_missing"] == written["rows_duplicated"] == 0
    assert written["model"] == label and written["output"] == f"s3://{bucket}/out"
    assert written["wer"] == pytest.approx(wer)
