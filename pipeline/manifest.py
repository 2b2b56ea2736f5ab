"""Manifests of any kind, from any fsspec URL, read by Ray Data read tasks into the rows the job works on.

Accepted: NeMo JSONL (`audio_filepath`, `duration`, `offset`, `text`, `id`), fairseq S2T TSV (`id`, `audio`,
`n_frames`, `tgt_text`, `speaker`, `tgt_lang`; `audio` may be `archive.zip:offset:length`), CSV and Parquet with
either naming, or a glob of audio files. A Parquet file whose audio column is `struct<bytes: binary, path: string>`
(Hugging Face datasets' Audio feature) carries its audio: its rows get the cell's bytes as `audio_bytes` and an
`audio` naming `<file>#<row index>`. Every input row becomes exactly one row:

    id, audio, offset_s, duration_s, reference, tgt_lang, error, and the manifest's other columns unchanged

A manifest may be sharded: a glob or brace list whose files are manifests (`manifests/part-*.jsonl`,
`manifest_{000..127}.jsonl`, NeMo's `manifest__OP_0..127_CL_.json`) is one manifest read in parallel, one read task
per file, each streaming its file in blocks. What a pattern names is decided by the files' extensions: manifest
extensions (.jsonl, .json, .tsv, .csv, .parquet) make shards, .tar (.tar.gz, .tgz) WebDataset shards, anything else
is a glob of audio files; a mix is an error. A NeMo tarred audio manifest comes with the pattern of its tars
(`tarred_audio`). Tar shards are read by pipeline/shards.py. A line that cannot be parsed keeps its place as a row
whose `error` is `bad_manifest_line: <file>:<line>: ...`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import posixpath
import re
from typing import Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from .audio import INLINE_AUDIO, is_remote

AUDIO_COLUMNS = ("audio_filepath", "audio", "path", "file")
REFERENCE_COLUMNS = ("text", "tgt_text", "sentence", "transcription", "transcript")  # first found is the reference
PRIVATE_KEYS = ("_bad_line", "_line", "_audio", "_error")  # what the readers add to a record, never a column
TGT_LANG_COLUMNS = ("tgt_lang", "target_lang")
MANIFEST_SUFFIXES = ("jsonl", "json", "tsv", "csv", "parquet", "arrow")  # arrow: `datasets`' save_to_disk
TAR_SUFFIXES = ("tar", "tgz")  # .tar.gz is "tar" to suffix_of
# Columns the job writes itself; a manifest column of the same name is passed through as manifest_<name>.
OUTPUT_COLUMNS = ("id", "audio", "offset_s", "duration_s", "reference", "text", "tgt_lang", "num_tokens",
                  "avg_logprob", "error", "model", "segments", "segment_of", "segment_index", "segment_count",
                  "segment_start_s", "recording_duration_s", "recording_offset_s", "run_id")
SCHEMA = pa.schema([("id", pa.string()), ("audio", pa.string()), ("offset_s", pa.float64()),
                    ("duration_s", pa.float64()), ("reference", pa.string()), ("tgt_lang", pa.string()),
                    ("error", pa.string())])
MAX_SECONDS = 1e7  # ~116 days: an offset or duration beyond it is a mistake, not a recording
ARROW_LINES = 4096  # JSONL lines parsed by Arrow at once (its cost per call is that of ~100 lines)
PEEK_ROWS = 100  # records of the first file read on the driver to fail early on a manifest that cannot work


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (raised before any work starts)."""


def is_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[{") or "_OP_" in uri


def suffix_of(path: str) -> str:
    name = posixpath.basename(path).lower().removesuffix(".gz")
    return name.rsplit(".", 1)[-1] if "." in name else ""


def kind_of(path: str) -> str:
    suffix = suffix_of(path)
    return "manifest" if suffix in MANIFEST_SUFFIXES else "webdataset" if suffix in TAR_SUFFIXES else "audio"


def expand(fs, path: str, uri: str) -> list[str]:
    """The files a glob or brace pattern names, sorted; ManifestError when none."""
    import braceexpand

    # NeMo writes `{` and `}` as _OP_ and _CL_ in its shard lists.
    pattern = path.replace("_OP_", "{").replace("_CL_", "}")
    files = sorted({f for each in braceexpand.braceexpand(pattern)
                    for f in (fs.glob(each) if any(c in each for c in "*?[") else [each] if fs.exists(each) else [])})
    if not files:
        raise ManifestError(f"{uri}: the pattern matches no files")
    return files


class Manifest:
    """Where a manifest's rows come from: its files (`kind` "manifest": each a manifest shard; "webdataset": each a
    WebDataset tar shard; "audio": each an audio file, one row apiece), listed on the driver (file names only, never
    rows). `tarred_audio` (pipeline.shards.TarredAudio): the tars a NeMo tarred manifest's members are in."""

    def __init__(self, uri: str, storage_options: dict | None = None, tarred_audio=None):
        self.uri = uri
        self.fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.storage_options = storage_options
        self.remote = is_remote(uri)
        self.files = expand(self.fs, path, uri) if is_glob(uri) else self._single(path)
        kinds = {kind_of(f) for f in self.files}
        if len(kinds) > 1:
            names = {"manifest": f"manifests ({', '.join(MANIFEST_SUFFIXES)})", "webdataset": "tar shards (.tar)",
                     "audio": "other files"}
            raise ManifestError(f"{uri}: the pattern matches both {' and '.join(names[k] for k in names if k in kinds)}"
                                f"; name files of one kind: manifest shards, tar shards or audio files")
        self.kind = kinds.pop()
        self.tarred_audio = tarred_audio if tarred_audio is not None or self.kind != "manifest" else self._shar()
        self.carries_audio = self.kind == "webdataset" or self.tarred_audio is not None  # rows with their audio's bytes
        if tarred_audio is not None and self.kind != "manifest":
            raise ManifestError(f"{uri}: tarred audio ({tarred_audio.pattern}) goes with a NeMo manifest of its "
                                f"members, not with {self.kind} files")
        if self.kind == "manifest":
            self.check_columns()

    def _single(self, path: str) -> list[str]:
        if not self.fs.exists(path):
            raise ManifestError(f"{self.uri}: no such manifest")
        if self.fs.isdir(path):
            shar = sorted(self.fs.glob(f"{path.rstrip('/')}/cuts.*.jsonl*"))
            return shar if shar else self._saved_dataset(path)
        if kind_of(path) == "audio":
            raise ManifestError(f"{self.uri}: unknown manifest type .{suffix_of(path)} "
                                f"(use .jsonl, .json, .tsv, .csv, .parquet, or .tar for WebDataset)")
        return [path]

    def _shar(self):
        """A Lhotse Shar's recording tars (`recording.<n>.tar` beside `cuts.<n>.jsonl.gz`): its cuts' audio."""
        if not all(SHAR_CUTS.match(posixpath.basename(f)) for f in self.files):
            return None
        folder = posixpath.dirname(self.files[0])
        if not self.fs.glob(f"{folder}/recording.*.tar"):
            return None
        from .shards import TarredAudio  # shards builds on this module's rows

        return TarredAudio(self.url(f"{folder}/recording.*.tar"), self.storage_options)

    def _saved_dataset(self, path: str) -> list[str]:
        """A folder `datasets`' save_to_disk wrote: its Arrow files, as its state.json lists them."""
        state = f"{path.rstrip('/')}/state.json"
        if not self.fs.exists(state):
            raise ManifestError(f"{self.uri}: a folder, and neither a Lhotse Shar (cuts.*.jsonl.gz) nor one `datasets`' "
                                f"save_to_disk wrote (state.json); name its manifest file, or a glob of its audio files")
        with self.fs.open(state) as f:
            files = [f"{path.rstrip('/')}/{entry['filename']}" for entry in json.load(f).get("_data_files", [])]
        if not files:
            raise ManifestError(f"{self.uri}: its state.json lists no data files")
        return files

    def url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path) if self.remote else path

    def check_columns(self) -> None:
        """Fail before any work when the first file's first records name no audio column."""
        uri = self.url(self.files[0])
        with self.fs.open(self.files[0], "rb", compression="infer") as f:
            records = list(itertools.islice(_records(f, uri, with_audio=False), PEEK_ROWS))
        if records and all("_bad_line" in record for record in records):  # not a manifest of this kind at all
            raise ManifestError(f"{uri}: no line of the first {len(records)} is a manifest row "
                                f"(line {records[0]['_line']}: {records[0]['_bad_line']})")
        if self.tarred_audio is not None and not any("shard_id" in record for record in records):
            raise ManifestError(f"{uri}: no shard_id in the first {len(records)} lines: not a NeMo tarred audio "
                                f"manifest (each line names a member of tar shard_id)")
        normalise(records, uri, self.base(self.files[0]))
        self.carries_audio = self.carries_audio or any("_audio" in record for record in records)

    def block_rows(self, wanted: int | None) -> int:
        """Rows per Ray Data block: `wanted`, else 1,024, or 256 for rows carrying their audio (~100 kB a row, not
        ~200 bytes). The driver keeps ~20 kB of Ray's bookkeeping for each block waiting on the actors (2 M rows: 646
        MB at 256 rows a block, 459 MB at 1,024; s2t bench scale), so rows are not made smaller than they need be."""
        return wanted or (256 if self.carries_audio else 1024)

    def base(self, path: str) -> str | None:
        """The folder relative audio paths of this file are read from (None: tar members, kept as named)."""
        if self.tarred_audio is not None:
            return None
        folder = posixpath.dirname(path)
        return self.fs.unstrip_protocol(folder) if self.remote else os.path.dirname(os.path.abspath(path))

    def labels(self) -> dict[str, str]:
        """Each file's path from the files' common folder, less its extension: what an id it shares with another file
        is prefixed with (`shards/a.jsonl` and `shards/b.jsonl` both holding `x`: `a/x` and `b/x`)."""
        root = posixpath.commonpath(self.files) if len(self.files) > 1 else posixpath.dirname(self.files[0])
        return {f: posixpath.splitext(posixpath.relpath(f, root))[0] for f in self.files}

    def repeats(self, rows_per_block: int, filesystem) -> tuple[object, object, int]:
        """(the digest set of the rows' ids as each file names them, the ObjectRef of the digests of ids more than one
        file holds or None, how many those are), read once on the cluster without audio bytes (WebDataset: each shard
        read, its audio skipped)."""
        from .ids import digest_set, repeated_ids

        found = digest_set(self.dataset(rows_per_block, filesystem, audio=False))
        repeated, count = repeated_ids(found) if len(self.files) > 1 else (None, 0)
        return found, repeated if count else None, count

    def ids(self, rows_per_block: int, filesystem) -> tuple[object, object, int]:
        """`repeats`, with the digest set of the ids as the work reads them: read a second time only where some id
        is in more than one file (then with its file's label)."""
        from .ids import digest_set

        found, repeated, count = self.repeats(rows_per_block, filesystem)
        if not count:
            return found, None, 0
        return digest_set(self.dataset(rows_per_block, filesystem, audio=False, repeated=repeated)), repeated, count

    def dataset(self, rows_per_block: int, filesystem, audio: bool = True, todo=None, repeated=None):
        """The rows as a Ray Dataset: one read task per file, each streaming its file in blocks. Rows from tar shards
        and from Parquet files holding audio carry its bytes (`audio_bytes`) unless `audio` is False (ids and the rest
        only: the summary's). todo: Dataset -> the rows still to do (a resume's filter), applied before tars are read
        where the rows are known without them (NeMo: a shard whose rows are all done is not read). repeated: the
        ObjectRef of the digests of ids more than one file holds (`ids.repeated_ids`): those get their file's label."""
        import ray

        todo = todo or (lambda rows: rows)
        repeated = RepeatedIds(repeated, self.labels()) if repeated is not None else None

        if self.kind == "audio":
            rows = [{"audio": self.url(f), "_line": i + 1} for i, f in enumerate(self.files)]
            table = normalise(rows, self.uri, base=None)
            return todo(ray.data.from_arrow([table.slice(i, rows_per_block)
                                             for i in range(0, len(table), rows_per_block)]))
        urls = {f: self.url(f) for f in self.files}
        if self.kind == "webdataset":
            from .shards import WebDatasetDatasource  # shards builds on this module's rows

            return todo(ray.data.read_datasource(
                WebDatasetDatasource(self.files, filesystem=filesystem, rows_per_block=rows_per_block, urls=urls,
                                     with_audio=audio, repeated=repeated), override_num_blocks=len(self.files)))
        rows = todo(ray.data.read_datasource(
            ManifestDatasource(self.files, filesystem=filesystem, rows_per_block=rows_per_block,
                               bases={f: self.base(f) for f in self.files}, urls=urls, with_audio=audio,
                               repeated=repeated),
            override_num_blocks=len(self.files),
        ))
        return self.tarred_audio.attach(rows, rows_per_block) if self.tarred_audio is not None and audio else rows


class RepeatedIds:
    """Ids more than one manifest file holds (the ObjectRef of their digests; each file numbers the ids repeated
    within it itself) and each file's label: a read task puts the label before such an id, so that every row keeps an
    id of its own, the same in every run."""

    def __init__(self, listed, labels: dict[str, str]):
        self.listed, self.labels = listed, labels

    def named(self, blocks: Iterable[pa.Table], path: str) -> Iterator[pa.Table]:
        import ray

        from .ids import qualified

        listed = ray.get(self.listed)
        for block in blocks:
            yield qualified(block, listed, self.labels[path])


class ManifestDatasource(FileBasedDatasource):
    """Ray Data's file datasource for manifest shards: read tasks per file (Ray's listing, retries, filesystem),
    each parsing its file line by line into blocks of `rows_per_block` rows."""

    def __init__(self, paths: list[str], *, rows_per_block: int, bases: dict, urls: dict, with_audio: bool = True,
                 repeated: RepeatedIds | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block, self.bases, self.urls, self.with_audio = rows_per_block, bases, urls, with_audio
        self.repeated = repeated

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        blocks = read_blocks(f, self.urls.get(path, path), self.rows_per_block, self.bases.get(path), self.with_audio)
        yield from self.repeated.named(blocks, path) if self.repeated else blocks

    def _open_input_source(self, filesystem, path, **open_args):
        if suffix_of(path) == "parquet":  # a footer first: random access, not a stream
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)


def read_blocks(f, uri: str, rows_per_block: int, base: str | None, with_audio: bool = True
                ) -> Iterator[pa.Table]:
    """One manifest file (an open binary stream) -> tables of at most `rows_per_block` normalised rows."""
    seen = Repeats()
    if suffix_of(uri) in ("jsonl", "json"):
        # Each block parsed by Arrow when it can be (~1.6 us a row, against ~10 us through Python objects); a block
        # it cannot take goes the row-by-row way, which gives each row its own error.
        for lines in _line_blocks(f, rows_per_block * -(-ARROW_LINES // rows_per_block)):
            table = _json_table([line for _, line in lines], uri, base, seen) or \
                normalise(list(_json_records(_decoded(lines), uri)), uri, base, seen, strict=False)
            for start in range(0, table.num_rows, rows_per_block):
                yield table.slice(start, rows_per_block)
        return
    block = []
    for record in _records(f, uri, with_audio):
        block.append(record)
        if len(block) == rows_per_block:
            yield normalise(block, uri, base, seen, strict=False)
            block = []
    if block:
        yield normalise(block, uri, base, seen, strict=False)


def _records(f, uri: str, with_audio: bool = True) -> Iterator[dict]:
    """The records of one manifest file, each with its `_line`, and `_bad_line` when it could not be parsed."""
    kind = suffix_of(uri)
    return (_parquet_records(f, uri, with_audio) if kind == "parquet" else
            _arrow_records(f, uri, with_audio) if kind == "arrow" else
            _delimited_records(_lines(f), "\t" if kind == "tsv" else ",", uri) if kind in ("tsv", "csv") else
            _json_records(_lines(f), uri))


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
    record.update(offset=record.pop("start"), text=" ".join(texts) if texts else None,
                  recording_id=recording.get("id"))
    return record


def _delimited_records(lines: Iterable[tuple[int, str | None]], delimiter: str, uri: str) -> Iterator[dict]:
    # fairseq writes its TSVs unquoted (csv.QUOTE_NONE); CSV files follow the usual quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader((line if line is not None else "\x00" for _, line in lines), delimiter=delimiter,
                        quoting=quoting)
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
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0
               and f.type.get_field_index("path") >= 0
               and f.type.field("bytes").type in (pa.binary(), pa.large_binary())]
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
        record["_audio"] = resolve(cell["path"], posixpath.dirname(uri) if "://" in uri else
                                   os.path.dirname(os.path.abspath(uri)))
        record[INLINE_AUDIO] = None
        if "://" not in record["_audio"] and not os.path.exists(record["_audio"]):
            record["_error"] = (f"missing: {uri}#{index}: the audio cell has no bytes and its path "
                                f"{record['_audio']} is not there; write the Parquet with its audio in it "
                                f"(`datasets`' embed_external_files, as push_to_hub does)")
    elif with_audio:
        record[INLINE_AUDIO] = cell.get("bytes") or b""
    if record.get("id") in (None, ""):
        record["id"] = f"{posixpath.basename(uri).rsplit('.', 1)[0]}-{index}"
    return record


class Repeats:
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


def normalise(records: list[dict], uri: str, base: str | None, repeats: Repeats | None = None,
              strict: bool = True) -> pa.Table:
    """Records as read (each with its `_line`) -> the job's table. Strict: raises ManifestError when no row could name
    its audio (the driver's look at a first file); else such rows get the error `names no audio file` (a read
    task's block of them is no reason to fail the job)."""
    repeats = repeats or Repeats()
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
    for row, numbered in zip(rows, repeats.number_all([row["id"] for row in rows])):
        row["id"] = numbered
    table = pa.Table.from_pylist(rows)
    return table.cast(pa.schema([SCHEMA.field(n) if n in SCHEMA.names else table.schema.field(n)
                                 for n in table.column_names]))


def _normalise_row(record: dict, uri: str, base: str | None) -> dict:
    where = f"{uri}:{record['_line']}"
    if "_bad_line" in record:
        return {"id": f"{posixpath.basename(uri)}:{record['_line']}", "audio": None, "offset_s": None,
                "duration_s": None, "reference": None, "tgt_lang": None,
                "error": f"bad_manifest_line: {where}: {record['_bad_line']}"}
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
        "id": str(record["id"]) if record.get("id") not in (None, "") else
        derive_id(audio, offset) if audio is not None else f"{posixpath.basename(uri)}:{record['_line']}",
        "audio": audio,
        "offset_s": offset,
        "duration_s": duration,
        "reference": None if reference is None else str(reference),
        "tgt_lang": _first(record, TGT_LANG_COLUMNS),
        "error": record.get("_error") or error,
    }


class RowByRow(Exception):
    """A block Arrow's JSON path leaves to `normalise` (which gives each odd row its own error)."""


def _json_table(lines: list[bytes], uri: str, base: str | None, repeats: Repeats) -> pa.Table | None:
    """JSONL lines (none blank) -> the table `normalise` gives for them, computed by Arrow with no Python object per
    row; None when the block needs the row-by-row path: a line that is not a JSON object, a nested, date-like or
    oddly typed value, a number to refuse, a row naming no audio."""
    data = b"\n".join(lines)
    try:
        table = pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(use_threads=False,
                                                                                    block_size=len(data) + 1))
        if table.num_rows != len(lines) or any(pa.types.is_nested(t) or pa.types.is_temporal(t) or
                                               pa.types.is_binary(t) for t in table.schema.types):
            raise RowByRow
        return _normalise_table(table, base, repeats)
    except (RowByRow, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None


def _normalise_table(table: pa.Table, base: str | None, repeats: Repeats) -> pa.Table:
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
    columns = {"id": None, "audio": audio, "offset_s": offset,
               "duration_s": duration, "reference": _first_text(table, REFERENCE_COLUMNS),
               "tgt_lang": _first_text(table, TGT_LANG_COLUMNS), "error": pa.nulls(table.num_rows, pa.string())}
    used = {audio_column, "id", "offset", "duration", *REFERENCE_COLUMNS[:2], *TGT_LANG_COLUMNS}
    for name in sorted(set(names) - used):
        key = f"manifest_{name}" if name in OUTPUT_COLUMNS else name
        if key in columns:
            raise RowByRow
        columns[key] = table[name]
    columns["id"] = pa.array(repeats.number_all(ids), pa.string())  # last: the block is not given back after this
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
    refused = pc.or_(pc.invert(pc.is_finite(seconds)), pc.or_(pc.greater(seconds, MAX_SECONDS),
                                                              pc.less(seconds, 0.0)))
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


def read_manifest(uri: str, storage_options: dict | None = None) -> pa.Table:
    """The whole manifest as one table, read here: for small manifests, tests and tools (the job streams instead)."""
    manifest = Manifest(uri, storage_options)
    if manifest.kind == "audio":
        return normalise([{"audio": manifest.url(f), "_line": i + 1} for i, f in enumerate(manifest.files)],
                         uri, base=None)
    tables = []
    for path in manifest.files:
        with manifest.fs.open(path, "rb", compression="infer") as f:
            if manifest.kind == "webdataset":
                from .shards import webdataset_rows

                tables.extend(webdataset_rows(f, manifest.url(path), 1 << 16, with_audio=False))
            else:
                tables.extend(read_blocks(f, manifest.url(path), 1 << 16, manifest.base(path)))
    return pa.concat_tables(tables, promote_options="default") if tables else SCHEMA.empty_table()
