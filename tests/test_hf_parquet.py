"""Hugging Face datasets Parquet as a manifest: shards written by the `datasets` library itself (Audio feature:
struct<bytes, path>), transcribed from the cells' bytes, on local files and on the local S3 server; a damaged cell is
one error row; resume after SIGKILL; the bytes never reach the output."""

import json
import os

import jiwer
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import S3_CREDENTIALS
from helpers import demo_rows, killed_mid_job

from pipeline.manifest import read_manifest
from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_MODEL

CLIPS = 8
SHARDS = 2
NOT_AUDIO = 3  # the row whose cell holds bytes that are not audio
FAST = dict(batch_size=4, feature_batch_size=4, num_beams=1)


def write_hf_parquet(folder, rows: list[dict], shards: int = SHARDS, damaged: int | None = NOT_AUDIO) -> list[str]:
    """`rows` as `datasets` writes a split: data/test-0000i-of-0000n.parquet, the audio as the Audio feature's bytes
    and path, the transcript in `sentence` (Common Voice's naming). Returns the files' names, in order."""
    import datasets

    cells = [
        {"bytes": open(r["audio_filepath"], "rb").read(), "path": os.path.basename(r["audio_filepath"])} for r in rows
    ]
    if damaged is not None:
        cells[damaged] = {"bytes": b"this is not a sound file", "path": "damaged.flac"}
    data = datasets.Dataset.from_dict({"audio": cells, "sentence": [r["text"] for r in rows]}).cast_column(
        "audio", datasets.Audio(sampling_rate=16000, decode=False)
    )
    os.makedirs(folder / "data", exist_ok=True)
    names = [f"data/test-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]
    for i, name in enumerate(names):
        data.shard(shards, i, contiguous=True).to_parquet(str(folder / name))
    return names


def expected_ids(names: list[str], rows: list[dict]) -> list[str]:
    """`<file stem>-<row index>` of each row, in order (the shards are contiguous and the same size)."""
    return [f"{os.path.basename(name)[: -len('.parquet')]}-{index}" for name, index in places(names, rows)]


def places(names: list[str], rows: list[dict]) -> list[tuple[str, int]]:
    per_shard = len(rows) // len(names)
    return [(names[i // per_shard], i % per_shard) for i in range(len(rows))]


def check_output(tables: list[pa.Table], rows: list[dict], root: str, names: list[str]) -> None:
    for table in tables:  # no audio bytes, under any name
        assert "audio_bytes" not in table.column_names
        assert not [f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    out = {row["id"]: row for row in pa.concat_tables(tables, promote_options="default").to_pylist()}
    ids = expected_ids(names, rows)
    assert sorted(out) == sorted(ids)  # every row once, ids from the file stem and row index
    assert [out[i]["audio"] for i in ids] == [f"{root}/{name}#{index}" for name, index in places(names, rows)]
    assert [out[i]["reference"] for i in ids] == [r["text"] for r in rows]
    bad = ids[NOT_AUDIO]
    assert out[bad]["error"].startswith(f"unreadable: {out[bad]['audio']}: not audio"), out[bad]["error"]
    good = [k for k in range(len(rows)) if k != NOT_AUDIO]
    assert [out[ids[k]]["error"] for k in good] == [None] * len(good)
    assert [out[ids[k]]["audio_path"] for k in good] == [os.path.basename(rows[k]["audio_filepath"]) for k in good]
    wer = jiwer.wer([rows[k]["text"] for k in good], [out[ids[k]]["text"] for k in good])
    assert wer <= 0.10, [(rows[k]["text"], out[ids[k]]["text"]) for k in good]


def test_hf_parquet_reader_names_rows_and_keeps_bytes_out_of_the_ids_read(tmp_path):
    rows = demo_rows(CLIPS)
    names = write_hf_parquet(tmp_path, rows)
    table = read_manifest(str(tmp_path / "data/test-*.parquet"))
    assert table["id"].to_pylist() == expected_ids(names, rows)
    assert table["reference"].to_pylist() == [r["text"] for r in rows]
    assert table["audio_bytes"].to_pylist()[0] == open(rows[0]["audio_filepath"], "rb").read()
    assert table["audio"].to_pylist()[1] == f"{tmp_path}/{names[0]}#1"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_hf_parquet_job_end_to_end(ray_session, tmp_path, where, request):
    rows = demo_rows(CLIPS)
    names = write_hf_parquet(tmp_path, rows)
    options = {}
    if where == "s3":
        s3_endpoint = request.getfixturevalue("s3_endpoint")
        fs, bucket = request.getfixturevalue("s3_bucket")
        for name in names:
            fs.put_file(str(tmp_path / name), f"{bucket}/{name}")
        root, output = f"s3://{bucket}", f"s3://{bucket}/out"
        options = dict(s3_endpoint_url=s3_endpoint, storage_options=S3_CREDENTIALS)
    else:
        root, output = str(tmp_path), str(tmp_path / "out")
    summary = run(
        TranscribeConfig(manifest=f"{root}/data/test-*.parquet", output=output, model=DEMO_MODEL, **options, **FAST)
    )
    if where == "s3":
        fs.invalidate_cache()
        tables = []
        for path in fs.glob(f"{bucket}/out/*.parquet"):
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f))
    else:
        tables = [pq.read_table(f) for f in (tmp_path / "out").glob("*.parquet")]
    check_output(tables, rows, root, names)
    assert (summary["rows_in"], summary["rows_ok"], summary["rows_missing"]) == (CLIPS, CLIPS - 1, 0)
    assert summary["errors_by_reason"] == {"unreadable": 1}


def test_resume_after_sigkill_with_hf_parquet(ray_session, tmp_path):
    rows = demo_rows(24)
    names = write_hf_parquet(tmp_path, rows, shards=4, damaged=None)
    output = tmp_path / "out"
    intact = killed_mid_job(str(tmp_path / "data/test-*.parquet"), output, ray_session, files=3)
    assert 0 < len(intact) < len(rows), "the driver must be killed mid-job for this test to mean anything"

    summary = run(
        TranscribeConfig(
            manifest=str(tmp_path / "data/test-*.parquet"),
            output=str(output),
            model=DEMO_MODEL,
            batch_size=2,
            feature_batch_size=2,
            rows_per_file=2,
            rows_per_block=2,
            num_beams=1,
        )
    )
    written = [i for f in sorted(output.glob("*.parquet")) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert sorted(written) == sorted(expected_ids(names, rows))  # every row exactly once
    assert summary["rows_this_run"] == len(rows) - len(intact)
    assert summary["rows_missing"] == summary["rows_duplicated"] == 0 and summary["rows_ok"] == len(rows)
    assert json.loads((output / "_s2t" / "summary.json").read_text())["rows_ok"] == len(rows)
