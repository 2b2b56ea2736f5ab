"""A manifest's records -> the job's rows, the one normalisation every reader (manifest files, tar shards) uses.

Every input row becomes exactly one row:

    id, audio, offset_s, duration_s, reference, tgt_lang, error, and the manifest's other columns unchanged

`normalise` takes records as Python dicts (any reader, each row its own error); `normalise_table` computes the same
table with Arrow from a block parsed by Arrow, and hands back (RowByRow) any block with a row it would not treat
exactly as `normalise` does (tests/test_manifest_arrow.py holds the two equal). An id repeated within one file is
numbered (`IdNumbering`); ids shared by several files are pipeline/ids.py's `SharedIds`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath

import pyarrow as pa
import pyarrow.compute as pc

AUDIO_COLUMNS = ("audio_filepath", "audio", "path", "file")
REFERENCE_COLUMNS = ("text", "tgt_text", "sentence", "transcription", "transcript")  # first found is the reference
PRIVATE_KEYS = ("_bad_line", "_line", "_audio", "_error")  # what the readers add to a record, never a column
TGT_LANG_COLUMNS = ("tgt_lang", "target_lang")
# Columns the job writes itself; a manifest column of the same name is passed through as manifest_<name>.
OUTPUT_COLUMNS = (
    "id",
    "audio",
    "offset_s",
    "duration_s",
    "reference",
    "text",
    "tgt_lang",
    "num_tokens",
    "avg_logprob",
    "error",
    "model",
    "segments",
    "segment_of",
    "segment_index",
    "segment_count",
    "segment_start_s",
    "recording_duration_s",
    "recording_offset_s",
    "run_id",
)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("audio", pa.string()),
        ("offset_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("reference", pa.string()),
        ("tgt_lang", pa.string()),
        ("error", pa.string()),
    ]
)
MAX_SECONDS = 1e7  # ~116 days: an offset or duration beyond it is a mistake, not a recording


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (raised before any work starts)."""


class IdNumbering:
    """Repeated ids of one file, numbered in file order: the second `x` becomes `x#2`, or the next `x#<n>` no row
    of the file has taken yet (so `x, x, x#2` give `x, x#2, x#2#2`). Holds each id given (~100 bytes a row; in the
    read task, not the driver: shard a manifest of tens of millions of rows). Ids repeated across shards are left as
    they are; the summary counts per manifest row."""

    def __init__(self):
        self.counts: dict[str, int] = {}  # the next number of each id seen more than once
        self.given: set[str] = set()

    def number_all(self, ids: list[str]) -> list[str]:
        if len(set(ids)) == len(ids) and self.given.isdisjoint(ids):  # the usual block: no id seen before
            self.given.update(ids)
            return ids
        return [self.number(row_id) for row_id in ids]

    def number(self, row_id: str) -> str:
        count = self.counts.get(row_id, 1)
        numbered = row_id if count == 1 else f"{row_id}#{count}"
        while numbered in self.given:
            count += 1
            numbered = f"{row_id}#{count}"
        if count > 1:
            self.counts[row_id] = count
        self.given.add(numbered)
        return numbered


def _first(record: dict, names: tuple[str, ...]):
    for name in names:
        if record.get(name) not in (None, ""):
            return record[name]
    return None


def normalise(
    records: list[dict], uri: str, base: str | None, numbering: IdNumbering | None = None, strict: bool = True
) -> pa.Table:
    """Records as read (each with its `_line`) -> the job's table. Strict: raises ManifestError when no row could name
    its audio (the driver's look at a first file); else such rows get the error `names no audio file` (a read
    task's block of them is no reason to fail the job)."""
    numbering = numbering or IdNumbering()
    columns = {name for record in records for name in record if name not in PRIVATE_KEYS}
    inline = any("_audio" in record for record in records)  # rows carrying their audio (a Parquet's audio bytes)
    audio_column = None if inline else next((name for name in AUDIO_COLUMNS if name in columns), None)
    if strict and audio_column is None and not inline and any("_bad_line" not in record for record in records):
        raise ManifestError(
            f"{uri}: no audio column; a manifest needs one of {', '.join(AUDIO_COLUMNS)} "
            f"(it has {', '.join(sorted(columns)) or 'no columns'})"
        )
    used = {audio_column, "id", "offset", "duration", *REFERENCE_COLUMNS[:2], *TGT_LANG_COLUMNS}
    passthrough = sorted(columns - used)
    rows = []
    for record in records:
        row = _normalise_row(record, uri, base)
        for name in passthrough:
            value = record.get(name)
            key = f"manifest_{name}" if name in OUTPUT_COLUMNS else name
            row[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        rows.append(row)
    if not rows:
        return SCHEMA.empty_table()
    for row, numbered in zip(rows, numbering.number_all([row["id"] for row in rows])):
        row["id"] = numbered
    table = pa.Table.from_pylist(rows)
    return table.cast(
        pa.schema([SCHEMA.field(n) if n in SCHEMA.names else table.schema.field(n) for n in table.column_names])
    )


def _normalise_row(record: dict, uri: str, base: str | None) -> dict:
    where = f"{uri}:{record['_line']}"
    if "_bad_line" in record:
        return {
            "id": f"{posixpath.basename(uri)}:{record['_line']}",
            "audio": None,
            "offset_s": None,
            "duration_s": None,
            "reference": None,
            "tgt_lang": None,
            "error": f"bad_manifest_line: {where}: {record['_bad_line']}",
        }
    audio = record.get("_audio") or _first(record, AUDIO_COLUMNS)
    error = None
    try:
        offset = _seconds(record, "offset") or 0.0
        duration = _seconds(record, "duration")
    except BadNumber as exc:
        offset, duration = 0.0, None
        error = f"bad_manifest_line: {where}: {exc}"
    if audio is None:
        error = f"bad_manifest_line: {where}: names no audio file"
    elif "_audio" not in record:
        audio = resolve(str(audio), base)
    reference = _first(record, REFERENCE_COLUMNS)
    return {
        "id": str(record["id"])
        if record.get("id") not in (None, "")
        else derive_id(audio, offset)
        if audio is not None
        else f"{posixpath.basename(uri)}:{record['_line']}",
        "audio": audio,
        "offset_s": offset,
        "duration_s": duration,
        "reference": None if reference is None else str(reference),
        "tgt_lang": _first(record, TGT_LANG_COLUMNS),
        "error": record.get("_error") or error,
    }


class RowByRow(Exception):
    """A block Arrow's JSON path leaves to `normalise` (which gives each odd row its own error)."""


def normalise_table(table: pa.Table, base: str | None, numbering: IdNumbering) -> pa.Table:
    """`normalise` of records parsed by Arrow (no error in any row, or RowByRow)."""
    names = table.column_names
    audio_column = next((name for name in AUDIO_COLUMNS if name in names), None)
    audio = _first_text(table, AUDIO_COLUMNS)
    if audio_column is None or audio.null_count:
        raise RowByRow
    if base is not None:  # `resolve`, by columns
        absolute = pc.or_(pc.match_substring(audio, "://"), pc.starts_with(audio, "/"))
        joined = pc.binary_join_element_wise(pa.scalar(base if base.endswith("/") else base + "/"), audio, "")
        audio = pc.if_else(absolute, audio, joined)
    offset = _seconds_column(table, "offset")
    offset = pc.if_else(pc.equal(pc.fill_null(offset, 0.0), 0.0), 0.0, offset)  # `or 0.0`
    duration = _seconds_column(table, "duration")
    ids = _given_ids(table).to_pylist()
    if None in ids:
        audios, offsets = audio.to_pylist(), offset.to_pylist()
        ids = [i if i is not None else derive_id(audios[k], offsets[k]) for k, i in enumerate(ids)]
    columns = {
        "id": None,
        "audio": audio,
        "offset_s": offset,
        "duration_s": duration,
        "reference": _first_text(table, REFERENCE_COLUMNS),
        "tgt_lang": _first_text(table, TGT_LANG_COLUMNS),
        "error": pa.nulls(table.num_rows, pa.string()),
    }
    used = {audio_column, "id", "offset", "duration", *REFERENCE_COLUMNS[:2], *TGT_LANG_COLUMNS}
    for name in sorted(set(names) - used):
        key = f"manifest_{name}" if name in OUTPUT_COLUMNS else name
        if key in columns:
            raise RowByRow
        columns[key] = table[name]
    columns["id"] = pa.array(numbering.number_all(ids), pa.string())  # last: the block is not given back after this
    return pa.table(columns).combine_chunks()


def _first_text(table: pa.Table, names: tuple[str, ...]) -> pa.ChunkedArray:
    """`_first` of string columns: each row's first value that is not null or ""."""
    found = []
    for name in names:
        if name not in table.column_names or pa.types.is_null(table[name].type):
            continue
        if not pa.types.is_string(table[name].type):
            raise RowByRow
        found.append(pc.if_else(pc.equal(table[name], ""), pa.scalar(None, pa.string()), table[name]))
    return pc.coalesce(*found) if found else _nulls(table, pa.string())


def _nulls(table: pa.Table, type: pa.DataType) -> pa.ChunkedArray:
    return pa.chunked_array([pa.nulls(table.num_rows, type)])


def _seconds_column(table: pa.Table, name: str) -> pa.ChunkedArray:
    """`_seconds` of a numeric column (null where absent); RowByRow where a row's number would be refused."""
    if name not in table.column_names or pa.types.is_null(table[name].type):
        return _nulls(table, pa.float64())
    if not (pa.types.is_integer(table[name].type) or pa.types.is_floating(table[name].type)):
        raise RowByRow
    seconds = pc.cast(table[name], pa.float64())
    refused = pc.or_(pc.invert(pc.is_finite(seconds)), pc.or_(pc.greater(seconds, MAX_SECONDS), pc.less(seconds, 0.0)))
    if name == "duration":
        refused = pc.or_(refused, pc.equal(seconds, 0.0))
    if pc.any(refused).as_py():
        raise RowByRow
    return seconds


def _given_ids(table: pa.Table) -> pa.ChunkedArray:
    """The `id` column as text, null where a row has none (null or "")."""
    if "id" not in table.column_names or pa.types.is_null(table["id"].type):
        return _nulls(table, pa.string())
    if pa.types.is_integer(table["id"].type):
        return pc.cast(table["id"], pa.string())
    return _first_text(table, ("id",))


class BadNumber(ValueError):
    pass


def _seconds(record: dict, name: str) -> float | None:
    """A manifest's offset or duration in seconds (None when absent); BadNumber says, briefly, what is wrong."""
    value = record.get(name)
    if value in (None, ""):
        return None
    shown = json.dumps(value)[:20] if isinstance(value, (bool, float)) else repr(value)[:20]
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan  # JSON's true is no duration
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds):
        raise BadNumber(f"{name} {shown} is not a number of seconds")
    shown = f"{seconds:.6g} s"
    if seconds > MAX_SECONDS:
        raise BadNumber(f"{name} {shown} is longer than any recording")
    if seconds < 0 or (name == "duration" and seconds == 0):
        raise BadNumber(f"{name} {shown} is {'negative' if seconds < 0 else 'not positive'}")
    return seconds


def resolve(audio: str, base: str | None) -> str:
    """An audio path relative to the manifest's folder -> a full path or URL; absolute ones are kept."""
    if base is None or "://" in audio or os.path.isabs(audio):
        return audio
    return posixpath.join(base, audio) if "://" in base else os.path.join(base, audio)


def derive_id(audio: str, offset: float) -> str:
    """A stable id from the audio path and offset: `<file stem>-<8 hex of sha1(path@offset)>`."""
    stem = posixpath.basename(audio.split(".zip:")[0] if ".zip:" in audio else audio).rsplit(".", 1)[0]
    digest = hashlib.sha1(f"{audio}@{offset:.6f}".encode()).hexdigest()[:8]
    return f"{stem}-{digest}"
