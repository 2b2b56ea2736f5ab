"""Manifest files of each format, parsed by Ray Data read tasks into blocks of the job's rows (pipeline/rows.py).

NeMo JSONL (`audio_filepath`, `duration`, `offset`, `text`, `id`) and Lhotse cuts, fairseq S2T TSV (`id`, `audio`,
`n_frames`, `tgt_text`, `speaker`, `tgt_lang`; `audio` may be `archive.zip:offset:length`), CSV, Parquet and Arrow
with either naming. A Parquet file whose audio column is `struct<bytes: binary, path: string>` (Hugging Face
datasets' Audio feature) carries its audio: its rows get the cell's bytes as `audio_bytes` and an `audio` naming
`<file>#<row index>`. A line that cannot be parsed keeps its place as a row whose `error` is
`bad_manifest_line: <file>:<line>: ...`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from .audio import INLINE_AUDIO
from .ids import SharedIds
from .listing import suffix_of
from .rows import IdNumbering, RowByRow, normalise, normalise_table, resolve

ARROW_LINES = 4096  # JSONL lines parsed by Arrow at once (its cost per call is that of ~100 lines)


class ManifestDatasource(FileBasedDatasource):
    """Ray Data's file datasource for manifest shards: read tasks per file (Ray's listing, retries, filesystem),
    each parsing its file line by line into blocks of `rows_per_block` rows."""

    def __init__(
        self,
        paths: list[str],
        *,
        rows_per_block: int,
        bases: dict,
        urls: dict,
        with_audio: bool = True,
        shared: SharedIds | None = None,
        **kwargs,
    ):
        super().__init__(paths, **kwargs)
        self.rows_per_block, self.bases, self.urls, self.with_audio = rows_per_block, bases, urls, with_audio
        self.shared = shared

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        blocks = read_blocks(f, self.urls.get(path, path), self.rows_per_block, self.bases.get(path), self.with_audio)
        yield from self.shared.named(blocks, path) if self.shared else blocks

    def _open_input_source(self, filesystem, path, **open_args):
        if suffix_of(path) == "parquet":  # a footer first: random access, not a stream
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)


def read_blocks(f, uri: str, rows_per_block: int, base: str | None, with_audio: bool = True) -> Iterator[pa.Table]:
    """One manifest file (an open binary stream) -> tables of at most `rows_per_block` normalised rows."""
    seen = IdNumbering()
    if suffix_of(uri) in ("jsonl", "json"):
        # Each block parsed by Arrow when it can be, with no Python object per row (several times cheaper a row:
        # docs/benchmarks.md); a block it cannot take goes the row-by-row way, which gives each row its own error.
        for lines in _line_blocks(f, rows_per_block * -(-ARROW_LINES // rows_per_block)):
            table = _json_table([line for _, line in lines], uri, base, seen) or normalise(
                list(_json_records(_decoded(lines), uri)), uri, base, seen, strict=False
            )
            for start in range(0, table.num_rows, rows_per_block):
                yield table.slice(start, rows_per_block)
        return
    block = []
    for record in file_records(f, uri, with_audio):
        block.append(record)
        if len(block) == rows_per_block:
            yield normalise(block, uri, base, seen, strict=False)
            block = []
    if block:
        yield normalise(block, uri, base, seen, strict=False)


def file_records(f, uri: str, with_audio: bool = True) -> Iterator[dict]:
    """The records of one manifest file, each with its `_line`, and `_bad_line` when it could not be parsed."""
    kind = suffix_of(uri)
    return (
        _parquet_records(f, uri, with_audio)
        if kind == "parquet"
        else _arrow_records(f, uri, with_audio)
        if kind == "arrow"
        else _delimited_records(_lines(f), "\t" if kind == "tsv" else ",", uri)
        if kind in ("tsv", "csv")
        else _json_records(_lines(f), uri)
    )


def _raw_lines(f) -> Iterator[bytes]:
    rest = b""
    while chunk := f.read(1 << 20):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _lines(f) -> Iterator[tuple[int, str | None]]:
    """Numbered lines of a binary stream, decoded (`_decoded`)."""
    return _decoded(enumerate(_raw_lines(f), start=1))


def _decoded(lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, str | None]]:
    """Numbered lines, decoded; a line that is not UTF-8 comes as None (a bad line, not a failed file). The first
    line is read as utf-8-sig: Excel and Notepad start their exports with a byte-order mark."""
    for number, line in lines:
        yield number, _decode(line, "utf-8-sig" if number == 1 else "utf-8")


def _line_blocks(f, size: int) -> Iterator[list[tuple[int, bytes]]]:
    """Blocks of `size` numbered lines that are not blank (bytes, a first line's byte-order mark removed)."""
    block = []
    for number, line in enumerate(_raw_lines(f), start=1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if line.strip():
            block.append((number, line))
            if len(block) == size:
                yield block
                block = []
    if block:
        yield block


def _decode(line: bytes, encoding: str = "utf-8") -> str | None:
    try:
        return line.decode(encoding).rstrip("\r")
    except UnicodeDecodeError:
        return None


def _json_records(lines: Iterable[tuple[int, str | None]], uri: str) -> Iterator[dict]:
    for number, line in lines:
        if line is not None and not line.strip():
            continue
        try:
            if line is None:
                raise ValueError("not UTF-8 text")
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            record = lhotse_cut(record, uri)
        except ValueError as error:
            record = {"_bad_line": f"not a JSON object ({error}): {(line or '')[:80]!r}"}
        record["_line"] = number
        yield record


SHAR_CUTS = re.compile(r"^cuts\.(\d+)\.jsonl(\.gz)?$")  # Lhotse Shar: cuts.000000.jsonl.gz beside recording.000000.tar


def lhotse_cut(record: dict, uri: str) -> dict:
    """A Lhotse cut (a JSON line of `CutSet.to_file`, or of a Shar's cuts file) -> a manifest record: the cut's id,
    its recording's source as the audio (a Shar's: the member `<cut id>.*` of the recording tar with the cuts file's
    number, matched by stem as NeMo tarred audio is), its `start` as offset, `duration`, and its supervisions' texts
    joined as the reference. Any other record is kept as it is."""
    recording = record.get("recording")
    if not isinstance(recording, dict) or not isinstance(record.get("supervisions"), list) or "start" not in record:
        return record
    texts = [s.get("text") for s in record.pop("supervisions") if isinstance(s, dict) and s.get("text")]
    sources = recording.get("sources") or [{}]
    record.pop("recording")
    record.pop("type", None)
    shard = SHAR_CUTS.match(posixpath.basename(uri))
    if sources[0].get("type") == "shar" and shard:
        record.update(audio_filepath=f"{record.get('id')}.flac", shard_id=int(shard[1]))
    else:
        record["audio_filepath"] = sources[0].get("source")
    record.update(offset=record.pop("start"), text=" ".join(texts) if texts else None, recording_id=recording.get("id"))
    return record


def _delimited_records(lines: Iterable[tuple[int, str | None]], delimiter: str, uri: str) -> Iterator[dict]:
    # fairseq writes its TSVs unquoted (csv.QUOTE_NONE); CSV files follow the usual quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(
        (line if line is not None else "\x00" for _, line in lines), delimiter=delimiter, quoting=quoting
    )
    header = next(reader, None)
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            yield {"_bad_line": f"{len(row)} fields, the header has {len(header)}", "_line": reader.line_num}
        else:
            yield {**dict(zip(header, row)), "_line": reader.line_num}


def _parquet_records(f, uri: str, with_audio: bool = True) -> Iterator[dict]:
    """Parquet rows, read a batch at a time; those of a file holding audio bytes as `_inline_audio` gives them."""
    parquet = pq.ParquetFile(f)
    audio = audio_struct_column(parquet.schema_arrow)
    columns = None
    if audio is not None and not with_audio:  # the bytes are not even read: only the rest of the row
        columns = [n for n in parquet.schema_arrow.names if n != audio] + [f"{audio}.path"]
    # A batch of rows with their audio may be tens of MB: smaller batches for those.
    batches = parquet.iter_batches(batch_size=4096 if audio is None else 64, columns=columns)
    yield from _batch_records(batches, audio, uri, with_audio)


def _arrow_records(f, uri: str, with_audio: bool = True) -> Iterator[dict]:
    """The rows of an Arrow IPC stream file (`datasets`' save_to_disk writes data-0000i-of-0000n.arrow)."""
    reader = pa.ipc.open_stream(f)
    yield from _batch_records(reader, audio_struct_column(reader.schema), uri, with_audio)


def _batch_records(batches, audio: str | None, uri: str, with_audio: bool) -> Iterator[dict]:
    records = (record for batch in batches for record in batch.to_pylist())
    for index, record in enumerate(records):
        record["_line"] = index + 1
        yield record if audio is None else _inline_audio(record, audio, uri, index, with_audio)


def audio_struct_column(schema: pa.Schema) -> str | None:
    """The column holding audio files' bytes: the one Hugging Face datasets' schema metadata (key `huggingface`)
    calls Audio, else the first of the Audio feature's Arrow type, struct<bytes: binary, path: string>."""
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
        named = [name for name, feature in features.items() if feature.get("_type") == "Audio"]
    except (ValueError, KeyError, TypeError, AttributeError):
        named = []
    structs = [
        f.name
        for f in schema
        if pa.types.is_struct(f.type)
        and f.type.get_field_index("bytes") >= 0
        and f.type.get_field_index("path") >= 0
        and f.type.field("bytes").type in (pa.binary(), pa.large_binary())
    ]
    return next((name for name in named if name in structs), structs[0] if structs else None)


def _inline_audio(record: dict, column: str, uri: str, index: int, with_audio: bool) -> dict:
    """A Parquet row carrying its audio -> a manifest record: its bytes as `audio_bytes` (none: b"", which the feature
    stage calls empty), `audio` naming the file and row, the cell's path as `<column>_path`, and an id from the
    file and row when it has none (`<file stem>-<row index>`, Hugging Face datasets' order). A cell with a path and
    no bytes (`datasets`' to_parquet of a column built from file paths) names its file instead: `audio` is the path
    (relative ones from the Parquet file's folder, as `datasets` reads them), read as any manifest's."""
    cell = record.pop(column) or {}
    record["_audio"] = f"{uri}#{index}"
    record[f"{column}_path"] = cell.get("path")
    if with_audio and not cell.get("bytes") and cell.get("path"):
        record["_audio"] = resolve(
            cell["path"], posixpath.dirname(uri) if "://" in uri else os.path.dirname(os.path.abspath(uri))
        )
        record[INLINE_AUDIO] = None
        if "://" not in record["_audio"] and not os.path.exists(record["_audio"]):
            record["_error"] = (
                f"missing: {uri}#{index}: the audio cell has no bytes and its path "
                f"{record['_audio']} is not there; write the Parquet with its audio in it "
                f"(`datasets`' embed_external_files, as push_to_hub does)"
            )
    elif with_audio:
        record[INLINE_AUDIO] = cell.get("bytes") or b""
    if record.get("id") in (None, ""):
        record["id"] = f"{posixpath.basename(uri).rsplit('.', 1)[0]}-{index}"
    return record


def _json_table(lines: list[bytes], uri: str, base: str | None, numbering: IdNumbering) -> pa.Table | None:
    """JSONL lines (none blank) -> the table `normalise` gives for them, computed by Arrow with no Python object per
    row; None when the block needs the row-by-row path: a line that is not a JSON object, a nested, date-like or
    oddly typed value, a number to refuse, a row naming no audio."""
    data = b"\n".join(lines)
    try:
        table = pajson.read_json(
            io.BytesIO(data), read_options=pajson.ReadOptions(use_threads=False, block_size=len(data) + 1)
        )
        if table.num_rows != len(lines) or any(
            pa.types.is_nested(t) or pa.types.is_temporal(t) or pa.types.is_binary(t) for t in table.schema.types
        ):
            raise RowByRow
        return normalise_table(table, base, numbering)
    except (RowByRow, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
