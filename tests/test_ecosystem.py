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
    from pipeline.backfill import BackfillConfig, run as backfill
    from pipeline.transcribe import TranscribeConfig, run as transcribe

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
    backfill(BackfillConfig(manifest=str(manifest), output=str(folder / "b"), model=DEMO_MODEL, tgt_langs="fr,de",
                            **SMALL))
    ids = [row["id"] for row in rows]
    return {"t": (folder / "t", [(i, "fr" if n < 3 else None) for n, i in enumerate(ids)]),
            "b": (folder / "b", [(i, lang) for i in ids for lang in ("fr", "de")])}


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
    base = {"audio": ["a.flac"], "text": ["un"], "num_tokens": pa.array([1], pa.int32()),
            "avg_logprob": pa.array([-0.1], pa.float32()), "error": pa.array([None], pa.string()), "model": ["m"],
            "run_id": ["r"]}
    segment = {"segment_of": pa.array([None], pa.string()), "segment_index": pa.array([None], pa.int32())}
    for lang, extra in (("fr", segment), ("de", {"segments": pa.array([[{"start_s": 0.0, "end_s": 1.0,
                                                                         "text": "eins"}]])})):
        (out / f"tgt_lang={lang}").mkdir()
        pq.write_table(pa.table({"id": [f"a-{lang}"], **base, **extra}),
                       out / f"tgt_lang={lang}" / f"s2t-{'a' * 32}_000000-0.parquet")
    pq.write_table(pa.table({"id": ["long~00000"], **base, "segment_of": ["long"],
                             "segment_index": pa.array([0], pa.int32())}),
                   out / "tgt_lang=fr" / f"s2t-{'b' * 32}_000000-0.parquet")
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
