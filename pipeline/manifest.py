"""Where a manifest's rows come from, from any fsspec URL: its files listed on the driver, and the Ray Dataset of
their rows, read by the datasource their kind needs.

A manifest is one file (NeMo JSONL, fairseq S2T TSV, CSV, Parquet, Arrow: pipeline/records.py reads them), a
folder (a Lhotse Shar, or one `datasets`' save_to_disk wrote), or a glob or brace list (pipeline/listing.py):
`manifests/part-*.jsonl`, `manifest_{000..127}.jsonl` and NeMo's `manifest__OP_0..127_CL_.json` are one manifest
read in parallel, one read task per file, each streaming its file in blocks; a pattern of .tar files is WebDataset
shards and any other a glob of audio files (pipeline/shards.py reads tars). A NeMo tarred audio manifest comes with
the pattern of its tars (`tarred_audio`). Every input row becomes exactly one row (pipeline/rows.py).
"""

from __future__ import annotations

import itertools
import json
import os
import posixpath

import fsspec
import pyarrow as pa

from .audio import is_remote
from .ids import SharedIds, digest_set, shared_ids
from .listing import MANIFEST_SUFFIXES, expand, is_glob, kind_of, suffix_of
from .records import SHAR_CUTS, ManifestDatasource, file_records, read_blocks
from .rows import SCHEMA, ManifestError, normalise
from .shards import TarredAudio, WebDatasetDatasource, webdataset_rows

PEEK_ROWS = 100  # records of the first file read on the driver to fail early on a manifest that cannot work


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
            names = {
                "manifest": f"manifests ({', '.join(MANIFEST_SUFFIXES)})",
                "webdataset": "tar shards (.tar)",
                "audio": "other files",
            }
            raise ManifestError(
                f"{uri}: the pattern matches both {' and '.join(names[k] for k in names if k in kinds)}"
                f"; name files of one kind: manifest shards, tar shards or audio files"
            )
        self.kind = kinds.pop()
        self.tarred_audio = tarred_audio if tarred_audio is not None or self.kind != "manifest" else self._shar()
        self.carries_audio = self.kind == "webdataset" or self.tarred_audio is not None  # rows with their audio's bytes
        if tarred_audio is not None and self.kind != "manifest":
            raise ManifestError(
                f"{uri}: tarred audio ({tarred_audio.pattern}) goes with a NeMo manifest of its "
                f"members, not with {self.kind} files"
            )
        if self.kind == "manifest":
            self.check_columns()

    def _single(self, path: str) -> list[str]:
        if not self.fs.exists(path):
            raise ManifestError(f"{self.uri}: no such manifest")
        if self.fs.isdir(path):
            shar = sorted(self.fs.glob(f"{path.rstrip('/')}/cuts.*.jsonl*"))
            return shar if shar else self._saved_dataset(path)
        if kind_of(path) == "audio":
            raise ManifestError(
                f"{self.uri}: unknown manifest type .{suffix_of(path)} "
                f"(use .jsonl, .json, .tsv, .csv, .parquet, or .tar for WebDataset)"
            )
        return [path]

    def _shar(self):
        """A Lhotse Shar's recording tars (`recording.<n>.tar` beside `cuts.<n>.jsonl.gz`): its cuts' audio."""
        if not all(SHAR_CUTS.match(posixpath.basename(f)) for f in self.files):
            return None
        folder = posixpath.dirname(self.files[0])
        if not self.fs.glob(f"{folder}/recording.*.tar"):
            return None
        return TarredAudio(self.url(f"{folder}/recording.*.tar"), self.storage_options)

    def _saved_dataset(self, path: str) -> list[str]:
        """A folder `datasets`' save_to_disk wrote: its Arrow files, as its state.json lists them."""
        state = f"{path.rstrip('/')}/state.json"
        if not self.fs.exists(state):
            raise ManifestError(
                f"{self.uri}: a folder, and neither a Lhotse Shar (cuts.*.jsonl.gz) nor one `datasets`' "
                f"save_to_disk wrote (state.json); name its manifest file, or a glob of its audio files"
            )
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
            records = list(itertools.islice(file_records(f, uri, with_audio=False), PEEK_ROWS))
        if records and all("_bad_line" in record for record in records):  # not a manifest of this kind at all
            raise ManifestError(
                f"{uri}: no line of the first {len(records)} is a manifest row "
                f"(line {records[0]['_line']}: {records[0]['_bad_line']})"
            )
        if self.tarred_audio is not None and not any("shard_id" in record for record in records):
            raise ManifestError(
                f"{uri}: no shard_id in the first {len(records)} lines: not a NeMo tarred audio "
                f"manifest (each line names a member of tar shard_id)"
            )
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

    def ids_as_listed(self, rows_per_block: int, filesystem) -> tuple[object, object, int]:
        """(the digest set of the rows' ids as each file names them, the ObjectRef of the digests of ids more than one
        file holds or None, how many those are), read once on the cluster without audio bytes (WebDataset: each shard
        read, its audio skipped)."""
        found = digest_set(self.dataset(rows_per_block, filesystem, audio=False))
        shared, count = shared_ids(found) if len(self.files) > 1 else (None, 0)
        return found, shared if count else None, count

    def ids(self, rows_per_block: int, filesystem) -> tuple[object, object, int]:
        """`ids_as_listed`, with the digest set of the ids as the work reads them: read a second time only where some id
        is in more than one file (then with its file's label)."""
        found, shared, count = self.ids_as_listed(rows_per_block, filesystem)
        if not count:
            return found, None, 0
        return digest_set(self.dataset(rows_per_block, filesystem, audio=False, shared=shared)), shared, count

    def dataset(self, rows_per_block: int, filesystem, audio: bool = True, drop_done=None, shared=None):
        """The rows as a Ray Dataset: one read task per file, each streaming its file in blocks. Rows from tar shards
        and from Parquet files holding audio carry its bytes (`audio_bytes`) unless `audio` is False (ids and the rest
        only: the summary's). drop_done: Dataset -> the rows still to do (a resume's filter), applied before tars are
        read where the rows are known without them (NeMo: a shard whose rows are all done is not read). shared: the
        ObjectRef of the digests of ids more than one file holds (`ids.shared_ids`): those get their file's label."""
        import ray

        drop_done = drop_done or (lambda rows: rows)
        shared = SharedIds(shared, self.labels()) if shared is not None else None

        if self.kind == "audio":
            rows = [{"audio": self.url(f), "_line": i + 1} for i, f in enumerate(self.files)]
            table = normalise(rows, self.uri, base=None)
            return drop_done(
                ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, len(table), rows_per_block)])
            )
        urls = {f: self.url(f) for f in self.files}
        if self.kind == "webdataset":
            return drop_done(
                ray.data.read_datasource(
                    WebDatasetDatasource(
                        self.files,
                        filesystem=filesystem,
                        rows_per_block=rows_per_block,
                        urls=urls,
                        with_audio=audio,
                        shared=shared,
                    ),
                    override_num_blocks=len(self.files),
                )
            )
        rows = drop_done(
            ray.data.read_datasource(
                ManifestDatasource(
                    self.files,
                    filesystem=filesystem,
                    rows_per_block=rows_per_block,
                    bases={f: self.base(f) for f in self.files},
                    urls=urls,
                    with_audio=audio,
                    shared=shared,
                ),
                override_num_blocks=len(self.files),
            )
        )
        return self.tarred_audio.attach(rows, rows_per_block) if self.tarred_audio is not None and audio else rows


def read_manifest(uri: str, storage_options: dict | None = None) -> pa.Table:
    """The whole manifest as one table, read here: for small manifests, tests and tools (the job streams instead)."""
    manifest = Manifest(uri, storage_options)
    if manifest.kind == "audio":
        return normalise(
            [{"audio": manifest.url(f), "_line": i + 1} for i, f in enumerate(manifest.files)], uri, base=None
        )
    tables = []
    for path in manifest.files:
        with manifest.fs.open(path, "rb", compression="infer") as f:
            if manifest.kind == "webdataset":
                tables.extend(webdataset_rows(f, manifest.url(path), 1 << 16, with_audio=False))
            else:
                tables.extend(read_blocks(f, manifest.url(path), 1 << 16, manifest.base(path)))
    return pa.concat_tables(tables, promote_options="default") if tables else SCHEMA.empty_table()
