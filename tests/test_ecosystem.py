"""The jobs' output as the tools people analyse transcripts with read it: duckdb, polars, pandas, `datasets`, Ray.

One transcribe run and one backfill run over a manifest with short rows, two long recordings (joined with their
`segments`), a missing file (an error row) and rows translated to French; each output read by every tool at its
defaults, as `OUT/**/*.parquet` and as the folder `OUT` (polars given the folder reads every file under it, the jobs'
JSON too: docs/ecosystem.md), and every row and column must be there.
"""

import glob
import json
import os
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import demo_rows

from s2t_model import DEMO_LONG_FORM, DEMO_MODEL

SMALL = dict(batch_size=4, feature_batch_size=4, rows_per_file=4, rows_per_block=4, num_beams=1)


@pytest.fixture(scope="module")
def outputs(ray_session, tmp_path_factory):
    from pipeline.backfill import BackfillConfig
    from pipeline.backfill import run as backfill
    from pipeline.transcribe import TranscribeConfig
    from pipeline.transcribe import run as transcribe

    folder = tmp_path_factory.mktemp("ecosystem")
    rows = demo_rows(6)
    for row in rows[:3]:
        row["tgt_lang"] = "fr"  # translated by the transcribe job
    rows.append({"id": "gone", "audio_filepath": str(folder / "gone.flac"), "text": "x"})
    with open(os.path.join(DEMO_LONG_FORM, "manifest.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            row.pop("segments")
            rows.append({**row, "audio_filepath": os.path.join(DEMO_LONG_FORM, row["audio_filepath"])})
    manifest = folder / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    transcribe(TranscribeConfig(manifest=str(manifest), output=str(folder / "t"), model=DEMO_MODEL, **SMALL))
    backfill(
        BackfillConfig(manifest=str(manifest), output=str(folder / "b"), model=DEMO_MODEL, tgt_langs="fr,de", **SMALL)
    )
    ids = [row["id"] for row in rows]
    return {
        "t": (folder / "t", [(i, "fr" if n < 3 else None) for n, i in enumerate(ids)]),
        "b": (folder / "b", [(i, lang) for i in ids for lang in ("fr", "de")]),
    }


def readers(out: str):
    """(name, a function giving a pandas DataFrame) for each tool and way of pointing it at the output."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl
    import ray

    datasets.disable_progress_bars()
    pattern = f"{out}/**/*.parquet"
    files = sorted(glob.glob(pattern, recursive=True))  # pandas and Ray take a list, not a ** glob
    return [
        ("duckdb glob", lambda: duckdb.sql(f"select * from read_parquet('{pattern}')").df()),
        ("duckdb folder", lambda: duckdb.sql(f"select * from read_parquet('{out}')").df()),
        ("polars glob", lambda: pl.scan_parquet(pattern).collect().to_pandas()),
        ("pandas files", lambda: pd.read_parquet(files)),
        ("pandas folder", lambda: pd.read_parquet(out)),
        ("datasets glob", lambda: datasets.load_dataset("parquet", data_files=pattern, split="train").to_pandas()),
        ("datasets folder", lambda: datasets.load_dataset(out, split="train").to_pandas()),
        ("ray files", lambda: ray.data.read_parquet(files).to_pandas()),
        ("ray folder", lambda: ray.data.read_parquet(out).to_pandas()),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["t", "b"])
def test_every_reader_gets_every_row_and_column_of_an_output(outputs, job):
    out, expected = outputs[job]
    schemas = {pq.read_schema(f) for f in glob.glob(f"{out}/**/*.parquet", recursive=True)}
    assert len(schemas) == 1, schemas  # one schema for every file
    columns = set(schemas.pop().names)
    assert {"segments", "tgt_lang", "error", "text"} <= columns and not any(c.startswith("segment_") for c in columns)
    warnings.filterwarnings("ignore")
    for name, read in readers(str(out)):
        frame = read()
        assert set(frame.columns) == columns, name
        langs = [None if not isinstance(lang, str) else lang for lang in frame["tgt_lang"]]
        assert sorted(zip(frame["id"], langs), key=str) == sorted(expected, key=str), name
        long = frame[frame["id"].str.startswith("long-form")]
        assert len(long) == 2 * (1 if job == "t" else 2) and all(len(s) > 3 for s in long["segments"]), name
        assert frame[frame["id"] == "gone"]["error"].str.startswith("missing").all(), name


def test_an_output_of_the_layout_before_s2t_folder_is_adopted_into_it(tmp_path):
    """A backfill output as the versions before `_s2t/` left it (marker, runs and lease at the top, tgt_lang=xx/
    folders, files with and without `segment_*` columns, one row of a recording not yet joined): refused without
    --adopt-output, and with it rewritten so that every reader sees one schema with `tgt_lang` in the rows."""
    import fsspec
    import pandas as pd

    from pipeline.output import MARKER, RUNS, SEGMENTS, OutputError, check_output, mark_output

    out = tmp_path / "out"
    (out / "_runs").mkdir(parents=True)
    (out / "_s2t_output.json").write_text('{"written_by": "s2t backfill"}')
    (out / "_runs" / "20261201T000000-a1b2c3.json").write_text("{}")
    base = {
        "audio": ["a.flac"],
        "text": ["un"],
        "num_tokens": pa.array([1], pa.int32()),
        "avg_logprob": pa.array([-0.1], pa.float32()),
        "error": pa.array([None], pa.string()),
        "model": ["m"],
        "run_id": ["r"],
    }
    segment = {"segment_of": pa.array([None], pa.string()), "segment_index": pa.array([None], pa.int32())}
    for lang, extra in (
        ("fr", segment),
        ("de", {"segments": pa.array([[{"start_s": 0.0, "end_s": 1.0, "text": "eins"}]])}),
    ):
        (out / f"tgt_lang={lang}").mkdir()
        pq.write_table(
            pa.table({"id": [f"a-{lang}"], **base, **extra}),
            out / f"tgt_lang={lang}" / f"s2t-{'a' * 32}_000000-0.parquet",
        )
    pq.write_table(
        pa.table({"id": ["long~00000"], **base, "segment_of": ["long"], "segment_index": pa.array([0], pa.int32())}),
        out / "tgt_lang=fr" / f"s2t-{'b' * 32}_000000-0.parquet",
    )
    fs = fsspec.filesystem("file")
    with pytest.raises(OutputError, match="--adopt-output"):
        check_output(fs, str(out), str(out))
    check_output(fs, str(out), str(out), adopt=True)
    mark_output(fs, str(out), "s2t backfill")
    check_output(fs, str(out), str(out))
    assert (out / MARKER).exists() and (out / RUNS / "20261201T000000-a1b2c3.json").exists()
    assert len(list((out / SEGMENTS).glob("*.parquet"))) == 1  # joined by the next run
    frame = pd.read_parquet(out)
    assert sorted(zip(frame["id"], frame["tgt_lang"])) == [("a-de", "de"), ("a-fr", "fr")]
    assert len({pq.read_schema(f) for f in out.glob("*.parquet")}) == 1
    assert not [p for p in out.iterdir() if p.name not in ("_s2t",) and not p.name.endswith(".parquet")]


# ---- Inputs as the libraries write them ---------------------------------------------------------------------------


def test_datasets_parquet_cells_with_a_path_and_no_bytes_name_their_files(tmp_path, monkeypatch):
    """`datasets`' to_parquet of an Audio column built from paths keeps `{bytes: null, path}`: absolute, an fsspec
    URL, relative to the Parquet file (written from its folder); each row reads its file, and one whose file is no
    longer there (the Parquet shipped without it) says how to embed."""
    import shutil

    import datasets

    from pipeline.manifest import read_manifest

    rows = demo_rows(3)
    shutil.copy(rows[2]["audio_filepath"], tmp_path / "beside.flac")
    shutil.copy(rows[2]["audio_filepath"], tmp_path / "gone.flac")
    paths = [
        rows[0]["audio_filepath"],
        f"file://{rows[1]['audio_filepath']}",
        "beside.flac",
        str(tmp_path / "gone.flac"),
    ]
    monkeypatch.chdir(tmp_path)  # datasets reads the sizes of the files it is given (relative: from here)
    table = datasets.Dataset.from_dict({"audio": paths, "text": [r["text"] for r in rows] + ["x"]})
    table.cast_column("audio", datasets.Audio(sampling_rate=16000)).to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "gone.flac").unlink()
    monkeypatch.chdir("/")
    assert pq.read_table(tmp_path / "train.parquet")["audio"].to_pylist()[0] == {"bytes": None, "path": paths[0]}

    out = read_manifest(str(tmp_path / "train.parquet")).to_pylist()
    assert [r["audio"] for r in out[:3]] == [paths[0], paths[1], str(tmp_path / "beside.flac")]
    assert [r["audio_bytes"] for r in out] == [None] * 4 and [r["error"] for r in out[:3]] == [None] * 3
    assert (
        out[3]["error"].startswith(f"missing: {tmp_path}/train.parquet#3: ")
        and "embed_external_files" in out[3]["error"]
    )
    assert [r["reference"] for r in out[:3]] == [r["text"] for r in rows]


def test_a_save_to_disk_folder_is_read_as_its_arrow_files(tmp_path):
    """`datasets`' save_to_disk (Arrow IPC files and state.json): the folder, or a glob of its .arrow files, is a
    manifest whose rows carry their audio as its Parquet files do."""
    import datasets

    from pipeline.manifest import read_manifest

    rows = demo_rows(4)
    cells = [
        {"bytes": open(r["audio_filepath"], "rb").read(), "path": os.path.basename(r["audio_filepath"])} for r in rows
    ]
    saved = datasets.Dataset.from_dict(
        {"id": [r["id"] for r in rows], "audio": cells, "sentence": [r["text"] for r in rows]}
    )
    saved.cast_column("audio", datasets.Audio(sampling_rate=16000)).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    assert len(list((tmp_path / "ds").glob("data-*.arrow"))) == 2
    for uri in (str(tmp_path / "ds"), str(tmp_path / "ds" / "*.arrow")):
        out = read_manifest(uri).to_pylist()
        assert [r["id"] for r in out] == [r["id"] for r in rows]
        assert [r["reference"] for r in out] == [r["text"] for r in rows]
        assert [r["audio_bytes"] for r in out] == [c["bytes"] for c in cells]


def test_nemo_members_are_matched_by_stem_as_nemo_matches_them(tmp_path):
    """convert_to_tarred_audio_dataset.py --force_codec flac writes x.flac while its manifest keeps x.wav."""
    import pyarrow.fs
    from test_shards import audio_bytes, nemo_group, write_tar

    from pipeline.shards import read_nemo_shard

    rows = demo_rows(2)
    write_tar(tmp_path / "audio_0.tar", [("a.flac", audio_bytes(rows[0])), ("b.flac", audio_bytes(rows[1]))])
    tars = {0: (str(tmp_path / "audio_0.tar"),) * 2}
    read = [
        r
        for t in read_nemo_shard(
            nemo_group(["b.wav", "a.wav", "c.wav"], [{}, {}, {}]), tars, pyarrow.fs.LocalFileSystem(), 8, "audio_0.tar"
        )
        for r in t.to_pylist()
    ]
    by_id = {r["id"]: r for r in read}
    assert by_id["row-0"]["audio_bytes"] == audio_bytes(rows[1]) and by_id["row-1"]["audio_bytes"] == audio_bytes(
        rows[0]
    )
    assert by_id["row-2"]["error"].startswith("missing: ") and by_id["row-2"]["audio_bytes"] is None


def lhotse_cuts(rows: list[dict]):
    """A CutSet of the rows' files, written by lhotse itself; the last cut a window of its recording."""
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    cuts = []
    for row in rows:
        recording = Recording.from_file(row["audio_filepath"], recording_id=row["id"])
        supervision = SupervisionSegment(
            id=row["id"],
            recording_id=row["id"],
            start=0.0,
            duration=recording.duration,
            text=row["text"],
            language="en",
        )
        cuts.append(
            MonoCut(
                id=f"{row['id']}-cut",
                start=0.0,
                duration=recording.duration,
                channel=0,
                recording=recording,
                supervisions=[supervision],
            )
        )
    window = Recording.from_file(rows[0]["audio_filepath"], recording_id="window")
    cuts.append(MonoCut(id="window-cut", start=0.5, duration=1.0, channel=0, recording=window, supervisions=[]))
    return CutSet.from_cuts(cuts)


def test_lhotse_cuts_manifests_give_each_cut_its_recording_slice_reference_and_id(tmp_path):
    from pipeline.manifest import read_manifest

    rows = demo_rows(3)
    cuts = lhotse_cuts(rows)
    cuts.to_file(str(tmp_path / "cuts.jsonl.gz"))
    out = read_manifest(str(tmp_path / "cuts.jsonl.gz")).to_pylist()
    assert [r["id"] for r in out] == [cut.id for cut in cuts]
    assert [r["audio"] for r in out] == [r["audio_filepath"] for r in rows] + [rows[0]["audio_filepath"]]
    assert [(r["offset_s"], r["duration_s"]) for r in out] == [(cut.start, cut.duration) for cut in cuts]
    assert [r["reference"] for r in out] == [r["text"] for r in rows] + [None]


@pytest.mark.slow
def test_lhotse_shar_cuts_take_their_audio_from_the_recording_tars(ray_session, tmp_path):
    """`to_shar` writes cuts.<n>.jsonl.gz beside recording.<n>.tar; each cut's audio is the tar's member of its id,
    read once per tar; samples equal to what lhotse itself loads from the Shar."""
    import io

    import numpy as np
    import pyarrow.fs
    import soundfile
    from lhotse import CutSet

    from pipeline.manifest import Manifest

    rows = demo_rows(5)
    (tmp_path / "shar").mkdir()
    lhotse_cuts(rows).to_shar(str(tmp_path / "shar"), fields={"recording": "flac"}, shard_size=4)
    assert sorted(p.name for p in (tmp_path / "shar").iterdir()) == [
        "cuts.000000.jsonl.gz",
        "cuts.000001.jsonl.gz",
        "recording.000000.tar",
        "recording.000001.tar",
    ]
    theirs = {cut.id: cut for cut in CutSet.from_shar(in_dir=str(tmp_path / "shar"))}
    for uri in (str(tmp_path / "shar"), str(tmp_path / "shar" / "cuts.*.jsonl.gz")):
        manifest = Manifest(uri)
        out = manifest.dataset(4, pyarrow.fs.LocalFileSystem()).take_all()
        assert sorted(r["id"] for r in out) == sorted(theirs)
        for row in out:
            cut = theirs[row["id"]]
            assert row["error"] is None and row["reference"] == (cut.supervisions[0].text if cut.supervisions else None)
            samples, _ = soundfile.read(io.BytesIO(row["audio_bytes"]), dtype="float32")
            np.testing.assert_array_equal(samples, cut.load_audio()[0])
            assert (row["offset_s"], row["duration_s"]) == (0.0, cut.duration)

    # And the job over the Shar: one row per cut, under its id, scored against its supervision's text.
    from pipeline.transcribe import TranscribeConfig, run

    summary = run(
        TranscribeConfig(manifest=str(tmp_path / "shar"), output=str(tmp_path / "out"), model=DEMO_MODEL, **SMALL)
    )
    written = pa.concat_tables(pq.read_table(f) for f in (tmp_path / "out").glob("*.parquet"))
    assert sorted(written["id"].to_pylist()) == sorted(theirs) and summary["rows_ok"] == len(theirs)
    assert summary["rows_missing"] == summary["rows_duplicated"] == 0 and summary["wer"] < 10
