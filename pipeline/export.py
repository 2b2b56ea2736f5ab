"""`s2t export OUTPUT --format srt|vtt|txt|json --to DIR`: one file per recording of a transcription job's output.

The output's rows stream through Ray Data (a read task per Parquet file, as the summary reads them); each block's
rows are written by the task that read them, so no row travels to the driver. A file is named after the row's id
(characters outside [A-Za-z0-9._-] become "_"), with its target language when it has one: `<id>.srt`,
`<id>.fr.vtt`. What a file holds:
- srt, vtt: a cue per segment of a long recording (`segments`), or per word with `--cues words` (the job's
  `--word-timestamps` column); a short row is one cue over its whole duration;
- txt: the text; json: id, text, duration_s, tgt_lang, segments and words.
Every row is accounted for: written, or counted as an error (rows whose transcription failed get no file), or as a
segment of a recording not joined yet (a run still in progress).
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from .config import JobConfig
from .output import footers, output_filesystem, rows_dataset
from .subtitles import subtitles

FORMATS = ("srt", "vtt", "txt", "json")
COLUMNS = ("id", "text", "duration_s", "tgt_lang", "segments", "words", "error", "segment_of")
COUNTS = pa.schema([("written", pa.int64()), ("errors", pa.int64()), ("unjoined", pa.int64())])


class ExportConfig(JobConfig):
    output: str = Field(description="a transcription job's output folder, any fsspec URL")
    format: Literal["srt", "vtt", "txt", "json"] = Field(description="file format")
    to: str = Field(description="folder for the files, any fsspec URL")
    cues: Literal["segments", "words"] = Field(
        "segments", description="srt/vtt cues: a long recording's segments, or its words (needs --word-timestamps)"
    )
    storage_options: dict = Field(default_factory=dict, description="fsspec options for both URLs")


def file_name(row: dict, extension: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(row["id"]))
    return f"{stem}.{row['tgt_lang']}.{extension}" if row.get("tgt_lang") else f"{stem}.{extension}"


def cues(row: dict, by: str) -> list[tuple[float, float, str]]:
    if by == "words":
        if row.get("words") is None:
            raise ValueError(f"{row['id']}: no words in the output: transcribe with --word-timestamps")
        return [(w["start_s"], w["end_s"], w["word"]) for w in row["words"]]
    if row.get("segments"):
        return [(s["start_s"], s["end_s"], s["text"]) for s in row["segments"] if s["text"]]
    return [(0.0, row["duration_s"] or 0.0, row["text"])] if row["text"] else []


def render(row: dict, file_format: str, by: str) -> str:
    if file_format == "txt":
        return row["text"] + "\n" if row["text"] else ""
    if file_format == "json":
        return (
            json.dumps(
                {k: row.get(k) for k in ("id", "text", "duration_s", "tgt_lang", "segments", "words")},
                ensure_ascii=False,
            )
            + "\n"
        )
    return subtitles(cues(row, by), file_format)


def write_files(batch: pa.Table, to: str, file_format: str, by: str, storage_options: dict | None) -> pa.Table:
    """A block of output rows -> their files under `to`; returns the block's counts (one row)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(to, **(storage_options or {}))
    unjoined = (
        pc.is_valid(batch["segment_of"]) if "segment_of" in batch.column_names else pa.array([False] * batch.num_rows)
    )
    written = errors = 0
    for row in batch.filter(pc.invert(unjoined)).to_pylist():
        if row.get("error") or row.get("text") is None:
            errors += 1
            continue
        with fs.open(posixpath.join(root, file_name(row, file_format)), "w", encoding="utf-8") as f:
            f.write(render(row, file_format, by))
        written += 1
    return pa.table(
        {"written": [written], "errors": [errors], "unjoined": [pc.sum(unjoined).as_py() or 0]}, schema=COUNTS
    )


def run(config: ExportConfig) -> dict:
    """-> {"written", "errors", "unjoined"}: rows exported, rows left out for their error, segment rows."""
    import fsspec

    fs, root = output_filesystem(config.output, config.storage_options or None)
    found = footers(fs, root)
    if not found:
        raise SystemExit(f"s2t export: {config.output} holds no output files")
    present = set().union(*(m.schema.to_arrow_schema().names for m in found.values()))
    if config.cues == "words" and config.format in ("srt", "vtt") and "words" not in present:
        raise SystemExit(f"s2t export: {config.output} has no words column: transcribe with --word-timestamps")
    out_fs, out_root = fsspec.core.url_to_fs(config.to, **(config.storage_options or {}))
    out_fs.makedirs(out_root, exist_ok=True)
    rows = rows_dataset(fs, root, list(found), [c for c in COLUMNS if c in present])
    counts = rows.map_batches(
        write_files,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs=dict(
            to=config.to, file_format=config.format, by=config.cues, storage_options=config.storage_options or None
        ),
    )
    totals = counts.sum(["written", "errors", "unjoined"]) if counts.count() else {}
    return {name: int(totals.get(f"sum({name})", 0) or 0) for name in COUNTS.names}
