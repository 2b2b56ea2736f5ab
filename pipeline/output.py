"""The job's output folder: its Parquet files, the ones a killed run left cut short, and its rows as Ray Datasets.

The driver lists files and reads footers (per file, never per row); rows are read by Ray Data read tasks.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

log = logging.getLogger(__name__)


def arrow_filesystem(fs: fsspec.AbstractFileSystem):
    import pyarrow.fs

    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


MARKER = "_s2t_output.json"  # the job's own mark on a folder it writes
LEASE_FILES = re.compile(r"^_lease\.json$|^_lease\.takeover-[^/]+$")
OWN_FILES = re.compile(rf"^{re.escape(MARKER)}$|^_summary\.json$|^s2t-[0-9A-Za-z]+_\d+-\d+\.parquet$")


class OutputError(ValueError):
    """The output folder cannot be used (raised before any work starts)."""


class OutputNames(FilenameProvider):
    """The job's own file names, `s2t-<write uuid>_<task>-<i>.parquet`: with the marker, how it knows its files."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"s2t-{write_uuid}_{task_index:06}"


def check_output(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> None:
    """Refuse an output path that is a file, or a folder holding files the job did not write (a manifest kept
    there, another tool's Parquet): read back as done rows, they would lose rows or fail the job mid-way."""
    if fs.isfile(root):
        raise OutputError(f"{uri}: the output is a file, not a folder")
    if not fs.exists(root):
        return
    names = [posixpath.relpath(path, root.rstrip("/")) for path in fs.find(root)]
    marked = MARKER in names
    foreign = [name for name in names if not LEASE_FILES.match(name) and not (marked and OWN_FILES.match(name))]
    if foreign:
        shown = ", ".join(f"{uri.rstrip('/')}/{name}" for name in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise OutputError(f"{uri}: holds files not written by s2t transcribe: {shown}{more}; use an empty or new "
                          f"folder, or move them")


def mark_output(fs: fsspec.AbstractFileSystem, root: str) -> None:
    if not fs.exists(f"{root.rstrip('/')}/{MARKER}"):
        with fs.open(f"{root.rstrip('/')}/{MARKER}", "w") as f:
            json.dump({"written_by": "s2t transcribe"}, f)


def output_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    fs.invalidate_cache(root)  # s3fs keeps listings: the driver's own, made before a write, would hide its files
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.find(root) if p.endswith(".parquet"))


def footers(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, pq.FileMetaData]:
    """Every output file's footer. A file a killed run left half-written has none: it is removed, and its rows
    count as not done, so they are done again."""
    found = {}
    for path in output_files(fs, root):
        try:
            with fs.open(path, "rb") as f:
                found[path] = pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as error:
            log.warning("removing %s, left unfinished by an earlier run (%s); its rows are done again", path, error)
            fs.rm(path)
    return found


def holds_segments(metadata: pq.FileMetaData) -> bool:
    """Whether a file holds segment rows of a long recording not yet joined (from its row groups' statistics)."""
    names = metadata.schema.to_arrow_schema().names
    if "segment_of" not in names:
        return False
    column = names.index("segment_of")
    for i in range(metadata.num_row_groups):
        statistics = metadata.row_group(i).column(column).statistics
        if statistics is None or not statistics.has_null_count or statistics.null_count < metadata.row_group(i).num_rows:
            return True
    return False


def rows_dataset(fs: fsspec.AbstractFileSystem, root: str, files: list[str], columns: list[str]):
    """The output's `columns` as a Ray Dataset (read tasks; hive partitions such as tgt_lang=fr become columns)."""
    import ray

    return ray.data.read_parquet(files, filesystem=arrow_filesystem(fs),
                                 partitioning=ray.data.datasource.Partitioning("hive", base_dir=root)
                                 ).select_columns(columns).map_batches(  # the select is pushed into the read
        plain_strings, batch_format="pyarrow", batch_size=None)


def plain_strings(batch: pa.Table) -> pa.Table:
    """large_string columns (as Ray's Parquet reader may give them) as string: the manifest's rows have string
    ids, and joins and group-bys need one type on both sides."""
    return batch.cast(pa.schema([pa.field(f.name, pa.string()) if f.type == pa.large_string() else f
                                 for f in batch.schema]))


def scan_output(fs: fsspec.AbstractFileSystem, root: str, wanted) -> list[tuple[str, pa.Table]]:
    """(path, its columns that `wanted` names) for every output file, read here: for tests and tools only."""
    accept = wanted if callable(wanted) else set(wanted).__contains__
    tables = []
    for path in footers(fs, root):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            tables.append((path, parquet.read(columns=[c for c in parquet.schema_arrow.names if accept(c)])))
    return tables


def read_output(fs: fsspec.AbstractFileSystem, root: str, wanted) -> pa.Table:
    """The output's columns that `wanted` names (a list or a predicate), from every file, read here (tools only)."""
    tables = [table for _, table in scan_output(fs, root, wanted)]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({"id": pa.array([], pa.string())})


def shuffle_partitions() -> int:
    """Hash partitions for joins and group-bys: one per CPU of the cluster. Ray's default (200) costs more in
    task overhead than it gains below millions of rows per partition on small clusters."""
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 2)))
