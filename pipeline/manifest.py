"""Manifests of any kind, from any fsspec URL, read into one table with the columns the job works on.

Accepted: NeMo JSONL (`audio_filepath`, `duration`, `offset`, `text`, `id`), fairseq S2T TSV (`id`, `audio`,
`n_frames`, `tgt_text`, `speaker`, `tgt_lang`; `audio` may be `archive.zip:offset:length`), CSV and Parquet with
either naming, or a glob of audio files. Every input row becomes exactly one row of the table:

    id, audio, offset_s, duration_s, reference, tgt_lang, error, and the manifest's other columns unchanged

A line that cannot be parsed keeps its place as a row whose `error` says why, so the output accounts for it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

AUDIO_COLUMNS = ("audio_filepath", "audio", "path", "file")
REFERENCE_COLUMNS = ("text", "tgt_text", "transcript", "sentence")
TGT_LANG_COLUMNS = ("tgt_lang", "target_lang")
# Columns the job writes itself; a manifest column of the same name is passed through as manifest_<name>.
OUTPUT_COLUMNS = ("id", "audio", "offset_s", "duration_s", "reference", "text", "tgt_lang", "num_tokens",
                  "avg_logprob", "error", "model", "segments", "segment_of", "segment_index", "segment_count",
                  "segment_start_s", "recording_duration_s", "run_id")
SCHEMA = pa.schema([("id", pa.string()), ("audio", pa.string()), ("offset_s", pa.float64()),
                    ("duration_s", pa.float64()), ("reference", pa.string()), ("tgt_lang", pa.string()),
                    ("error", pa.string())])


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (raised before any work starts)."""


def is_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[")


def read_manifest(uri: str, storage_options: dict | None = None) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if is_glob(uri):
        files = sorted(fs.glob(path))
        if not files:
            raise ManifestError(f"{uri}: the glob matches no files")
        audio = [fs.unstrip_protocol(f) if "://" in uri else f for f in files]
        return normalise([{"audio": a} for a in audio], uri, base=None)
    if not fs.exists(path):
        raise ManifestError(f"{uri}: no such manifest")
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix == "parquet":
        records = pq.read_table(path, filesystem=fs).to_pylist()
    else:
        with fs.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
        if suffix in ("jsonl", "json"):
            records = _json_lines(text)
        elif suffix in ("tsv", "csv"):
            records = _delimited(text, "\t" if suffix == "tsv" else ",")
        else:
            raise ManifestError(f"{uri}: unknown manifest type .{suffix} (use .jsonl, .json, .tsv, .csv or .parquet)")
    base = fs.unstrip_protocol(posixpath.dirname(path)) if "://" in uri else os.path.dirname(os.path.abspath(path))
    return normalise(records, uri, base)


def _json_lines(text: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as error:
            record = {"_bad_line": f"line {number} is not a JSON object ({error}): {line[:80]!r}"}
        records.append(record)
    return records


def _delimited(text: str, delimiter: str) -> list[dict]:
    # fairseq writes its TSVs unquoted (csv.QUOTE_NONE); CSV files follow the usual quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting))
    if not rows:
        return []
    header, records = rows[0], []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            records.append({"_bad_line": f"line {number} has {len(row)} fields, the header has {len(header)}"})
        else:
            records.append(dict(zip(header, row)))
    return records


def _first(record: dict, names: tuple[str, ...]):
    for name in names:
        if record.get(name) not in (None, ""):
            return record[name]
    return None


def normalise(records: list[dict], uri: str, base: str | None) -> pa.Table:
    """Records as read -> the job's table; raises ManifestError when no row could name its audio."""
    columns = {name for record in records for name in record if name != "_bad_line"}
    audio_column = next((name for name in AUDIO_COLUMNS if name in columns), None)
    if records and audio_column is None:
        raise ManifestError(
            f"{uri}: no audio column; a manifest needs one of {', '.join(AUDIO_COLUMNS)} "
            f"(it has {', '.join(sorted(columns)) or 'no columns'})"
        )
    used = {audio_column, "id", "offset", "duration", *REFERENCE_COLUMNS[:2], *TGT_LANG_COLUMNS}
    passthrough = sorted(columns - used)
    rows, seen = [], {}
    for number, record in enumerate(records):
        row = _normalise_row(record, number, uri, base)
        # Ids must be unique for resuming to be exact: a repeated one gets #2, #3, ... in manifest order.
        seen[row["id"]] = seen.get(row["id"], 0) + 1
        if seen[row["id"]] > 1:
            row["id"] = f"{row['id']}#{seen[row['id']]}"
        for name in passthrough:
            value = record.get(name)
            key = f"manifest_{name}" if name in OUTPUT_COLUMNS else name
            row[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        rows.append(row)
    if not rows:
        return SCHEMA.empty_table()
    table = pa.Table.from_pylist(rows)
    return table.cast(pa.schema([SCHEMA.field(n) if n in SCHEMA.names else table.schema.field(n)
                                 for n in table.column_names]))


def _normalise_row(record: dict, number: int, uri: str, base: str | None) -> dict:
    if "_bad_line" in record:
        return {"id": f"{os.path.basename(uri)}:{number + 1}", "audio": None, "offset_s": None, "duration_s": None,
                "reference": None, "tgt_lang": None, "error": f"bad_manifest_line: {uri}: {record['_bad_line']}"}
    audio = _first(record, AUDIO_COLUMNS)
    error = None
    try:
        offset = float(record.get("offset") or 0.0)
        duration = float(record["duration"]) if record.get("duration") not in (None, "") else None
    except (TypeError, ValueError) as exc:
        offset, duration = 0.0, None
        error = f"bad_manifest_line: {uri}: row {number + 1}: offset/duration are not numbers ({exc})"
    if audio is None:
        error = f"bad_manifest_line: {uri}: row {number + 1} names no audio file"
    else:
        audio = resolve(str(audio), base)
    reference = _first(record, REFERENCE_COLUMNS[:2])
    return {
        "id": str(record["id"]) if record.get("id") not in (None, "") else derive_id(audio, offset, number),
        "audio": audio,
        "offset_s": offset,
        "duration_s": duration,
        "reference": None if reference is None else str(reference),
        "tgt_lang": _first(record, TGT_LANG_COLUMNS),
        "error": error,
    }


def resolve(audio: str, base: str | None) -> str:
    """An audio path relative to the manifest's folder -> a full path or URL; absolute ones are kept."""
    if base is None or "://" in audio or os.path.isabs(audio):
        return audio
    return posixpath.join(base, audio) if "://" in base else os.path.join(base, audio)


def derive_id(audio: str | None, offset: float, number: int) -> str:
    """A stable id from the audio path and offset: `<file stem>-<8 hex of sha1(path@offset)>`."""
    if audio is None:
        return f"row-{number + 1}"
    stem = posixpath.basename(audio.split(".zip:")[0] if ".zip:" in audio else audio).rsplit(".", 1)[0]
    digest = hashlib.sha1(f"{audio}@{offset:.6f}".encode()).hexdigest()[:8]
    return f"{stem}-{digest}"
