"""The job's output folder: its Parquet files, the ones a killed run left cut short, and its rows as Ray Datasets.

The driver lists files and reads footers (per file, never per row); rows are read by Ray Data read tasks.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import uuid

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource, FilenameProvider

from . import storage  # noqa: F401 (sets the S3 client's tries in every process that writes the output)
from .reasons import reason_words

log = logging.getLogger(__name__)


def arrow_filesystem(fs: fsspec.AbstractFileSystem):
    import pyarrow.fs

    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


# The jobs' own files (marker, summaries, lease, segment rows not yet joined) live in one folder, `_s2t/`, so that the
# output folder reads as a Parquet dataset: duckdb, pandas, `datasets`, pyarrow and Ray skip a folder whose name
# starts with "_" (polars given the folder reads every file under it, hidden or not: docs/ecosystem.md).
META = "_s2t"
MARKER = f"{META}/output.json"  # the job's own mark on a folder it writes
SUMMARY = f"{META}/summary.json"  # `s2t transcribe`'s summary
RUNS = f"{META}/runs"  # `s2t backfill`'s summary of each run, <run id>.json
SEGMENTS = f"{META}/segments"  # segment rows of long recordings, until joined (pipeline/longform.py)
LEASE_FILES = re.compile(rf"^{META}/_lease\.json$|^{META}/_lease\.takeover-[^/]+$")
# What the jobs write: the marker, summaries, and Parquet files of their own naming.
OWN_FILES = re.compile(
    rf"^{re.escape(MARKER)}$|^{re.escape(SUMMARY)}$|^{RUNS}/[0-9A-Za-z-]+\.json$"
    rf"|^({SEGMENTS}/)?s2t-[0-9A-Za-z]+_\d+-\d+\.parquet$"
)
# What versions before `_s2t/` wrote (adopted with --adopt-output): the marker, summaries and lease at the top,
# backfill's files in tgt_lang=xx/ folders without a tgt_lang column.
OLDER_FILES = re.compile(
    r"^_s2t_output\.json$|^_summary\.json$|^_runs/[0-9A-Za-z-]+\.json$"
    r"|^_lease\.json$|^_lease\.takeover-[^/]+$"
)
OLDER_MOVES = {"_summary.json": SUMMARY, "_runs/": f"{RUNS}/"}
# The columns every version of the jobs wrote in each file, from the first on (backfill's tgt_lang was in its
# folder's name): Parquet files with all of them, in a folder without the marker, are an older version's output and
# can be adopted (docs/decisions/2026-12-01-adopting-older-outputs.md).
S2T_COLUMNS = {"id", "audio", "text", "num_tokens", "avg_logprob", "error", "model"}
JOBS = "s2t transcribe or s2t backfill"
# The bookkeeping of a long recording's segment rows (pipeline/longform.py), in no file of the output's own.
SEGMENT_FIELDS = [
    ("segment_of", pa.string()),
    ("segment_index", pa.int32()),
    ("segment_count", pa.int32()),
    ("segment_start_s", pa.float64()),
    ("recording_duration_s", pa.float64()),
    ("recording_offset_s", pa.float64()),
]
SEGMENT_COLUMNS = [name for name, _ in SEGMENT_FIELDS]
SEGMENTS_TYPE = pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string())]))
# The types of the columns the jobs add, the same in every file (a block of errors only would give some `null`).
OUTPUT_TYPES = {
    "offset_s": pa.float64(),
    "duration_s": pa.float64(),
    "error": pa.string(),
    "run_id": pa.string(),
    "tgt_lang": pa.string(),
    "speech_s": pa.float64(),
    "text": pa.string(),
    "num_tokens": pa.int32(),
    "avg_logprob": pa.float32(),
    "low_confidence": pa.bool_(),
    "model": pa.string(),
    "segments": SEGMENTS_TYPE,
}


class OutputError(ValueError):
    """The output folder cannot be used (raised before any work starts)."""


class OutputNames(FilenameProvider):
    """The job's own file names, `s2t-<write uuid>_<task>-<i>.parquet`: with the marker, how it knows its files."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"s2t-{write_uuid}_{task_index:06}"


def own_name(folder: str) -> str:
    """A new path in `folder` of the jobs' naming, for a file rewritten outside a Ray write."""
    return f"{folder.rstrip('/')}/s2t-{uuid.uuid4().hex}_000000-0.parquet"


def output_filesystem(uri: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The output folder's filesystem, with no listings cache. s3fs would keep the driver's listings (the checks',
    the lease's), and the folder changes under them: Ray's write tasks, in other processes, add files. `find` lists
    afresh and returns a new file, but `open` of it answers from the cached listing of its folder, which lacks it:
    FileNotFoundError without asking the server (fsspec's `_ls_from_cache`, "parent dir was listed but did not
    contain this file"). `footers` took that for a torn file and removed every file the run had just written."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}), use_listings_cache=False)


def check_output(fs: fsspec.AbstractFileSystem, root: str, uri: str, adopt: bool = False) -> None:
    """Refuse an output path that is a file, or a folder holding files the jobs did not write (a manifest kept
    there, another tool's Parquet): read back as done rows, they would lose rows or fail the job mid-way.
    An unmarked folder of this tool's Parquet files (an older version's output, its own files at the top) is
    refused with the way to adopt it, and passes with `adopt`."""
    if fs.isfile(root):
        raise OutputError(f"{uri}: the output is a file, not a folder")
    if not fs.exists(root):
        return
    names = [posixpath.relpath(path, root.rstrip("/")) for path in fs.find(root)]
    marked = MARKER in names
    foreign = [name for name in names if not LEASE_FILES.match(name) and not (marked and OWN_FILES.match(name))]
    if not foreign:
        return
    older = not marked and all(
        is_s2t_parquet(fs, f"{root.rstrip('/')}/{name}") if name.endswith(".parquet") else OLDER_FILES.match(name)
        for name in foreign
    )
    if older and adopt:
        return
    shown = ", ".join(f"{uri.rstrip('/')}/{name}" for name in foreign[:5])
    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
    if older:
        raise OutputError(
            f"{uri}: holds the output of an older version of s2t (no {MARKER}): {shown}{more}; pass "
            f"--adopt-output to take it as this job's output (its files are rewritten in this "
            f"version's layout and the folder marked)"
        )
    raise OutputError(
        f"{uri}: holds files not written by {JOBS}: {shown}{more}; use an empty or new folder, or move them"
    )


def is_s2t_parquet(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether `path` is a Parquet file with the columns every version of the jobs wrote (from its footer)."""
    try:
        with fs.open(path, "rb") as f:
            return S2T_COLUMNS <= set(pq.ParquetFile(f).schema_arrow.names)
    except pa.ArrowInvalid:
        return False


def mark_output(fs: fsspec.AbstractFileSystem, root: str, job: str) -> None:
    """Mark the folder as the jobs' own, first putting in this version's layout what the checks let pass in an
    unmarked folder (an older version's output, adopted): marked last, so an adoption cut short is done again."""
    root = root.rstrip("/")
    if fs.exists(f"{root}/{MARKER}"):
        return
    for path in fs.find(root) if fs.exists(root) else []:
        name = posixpath.relpath(path, root)
        if path.endswith(".parquet"):
            adopt_file(fs, root, path)
        elif name in OLDER_MOVES or name.startswith("_runs/"):
            moved = OLDER_MOVES.get(name) or f"{RUNS}/{name.removeprefix('_runs/')}"
            fs.makedirs(posixpath.dirname(f"{root}/{moved}"), exist_ok=True)
            fs.mv(path, f"{root}/{moved}")
        elif name == "_s2t_output.json" or name.startswith("_lease"):  # (an older run's lease: adopt no output
            fs.rm(path)  # one of them is filling in)
    for folder in fs.ls(root, detail=False) if fs.exists(root) else []:  # emptied: tgt_lang=xx/, _runs/
        name = posixpath.basename(folder.rstrip("/"))
        if (name.startswith("tgt_lang=") or name == "_runs") and fs.isdir(folder) and not fs.find(folder):
            fs.rm(folder, recursive=True)
    fs.makedirs(f"{root}/{META}", exist_ok=True)
    with fs.open(f"{root}/{MARKER}", "w") as f:
        json.dump({"written_by": job}, f)


def adopt_file(fs: fsspec.AbstractFileSystem, root: str, path: str) -> None:
    """An older version's file again in this version's layout: at the top of the output under the jobs' naming,
    with the `run_id` column the summary reads (null: no run of this version wrote its rows; the first versions had
    none) and `tgt_lang` in the rows when it was only in a backfill's folder name; its segment rows not yet joined in
    `_s2t/segments/`, the others in the output's one schema (longform.final_rows). Removed before it is written
    again, as longform's rewrites: a run killed in between redoes its rows, never doubles them."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    if "run_id" not in table.column_names:
        table = table.append_column("run_id", pa.nulls(table.num_rows, pa.string()))
    folder = posixpath.basename(posixpath.dirname(path))
    if folder.startswith("tgt_lang=") and "tgt_lang" not in table.column_names:
        table = table.append_column("tgt_lang", pa.array([folder.split("=", 1)[1]] * table.num_rows, pa.string()))
    segment = pc.is_valid(table["segment_of"]) if "segment_of" in table.column_names else None
    fs.rm(path)
    if segment is not None and pc.any(segment).as_py():
        fs.makedirs(f"{root}/{SEGMENTS}", exist_ok=True)
        with fs.open(own_name(f"{root}/{SEGMENTS}"), "wb") as f:
            pq.write_table(table.filter(segment), f)
        table = table.filter(pc.invert(segment))
    if table.num_rows:
        with fs.open(own_name(root), "wb") as f:
            pq.write_table(final_rows(table), f)


def final_rows(batch: pa.Table) -> pa.Table:
    """Output rows -> the same in the output's one schema: no bookkeeping columns, `segments` on every row (null but
    on a joined recording's), the jobs' columns in their one type, a manifest column no row of the block fills as
    string (not Arrow's `null` type, which would differ from the next file's)."""
    batch = batch.drop_columns([c for c in SEGMENT_COLUMNS if c in batch.column_names])
    if "segments" not in batch.column_names:
        batch = batch.append_column("segments", pa.nulls(batch.num_rows, SEGMENTS_TYPE))
    batch = batch.select([c for c in batch.column_names if c != "segments"] + ["segments"])  # last, in every file
    return batch.cast(
        pa.schema(
            [
                pa.field(f.name, OUTPUT_TYPES.get(f.name, pa.string() if pa.types.is_null(f.type) else f.type))
                for f in batch.schema
            ]
        )
    )


def output_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
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
        except pa.ArrowInvalid as error:  # only that: a file not found (say) is no reason to remove it
            log.warning("removing %s, left unfinished by an earlier run (%s); its rows are done again", path, error)
            fs.rm(path)
    return found


def drop_errors(fs: fsspec.AbstractFileSystem, root: str, reasons) -> int:
    """Rewrite the output files that hold error rows of `reasons` (a set of `Reason`) without them, so that the run
    does those rows again; -> how many rows left. Only files whose footer shows errors are read, one at a time, its
    error column first. A file is removed before the rest of its rows is written again (as longform's rewrites): a
    run killed in between does those rows again, never doubles them."""
    dropped = 0
    for path, metadata in footers(fs, root).items():
        if not holds_values(metadata, "error"):
            continue
        with fs.open(path, "rb") as f:
            redo = redone_rows(pq.read_table(f, columns=["error"])["error"], reasons)
        if not pc.any(redo).as_py():
            continue
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        kept = table.filter(pc.invert(redo))
        fs.rm(path)
        if kept.num_rows:
            with fs.open(own_name(posixpath.dirname(path)), "wb") as f:
                pq.write_table(kept, f)
        dropped += table.num_rows - kept.num_rows
    if dropped:
        log.info("%d error rows of %s are done again", dropped, ", ".join(sorted(reasons)))
    return dropped


def redone_rows(errors: pa.ChunkedArray, reasons) -> pa.ChunkedArray:
    """Whether each row's error has one of `reasons` (false for rows without error)."""
    errors = errors.cast(pa.string())  # (a column of nulls only may be typed null)
    words = reason_words(pc.fill_null(errors, ""))
    return pc.and_(pc.is_valid(errors), pc.is_in(words, value_set=pa.array(sorted(reasons), pa.string())))


def holds_segments(metadata: pq.FileMetaData) -> bool:
    """Whether a file holds segment rows of a long recording not yet joined."""
    return holds_values(metadata, "segment_of")


def holds_values(metadata: pq.FileMetaData, name: str) -> bool:
    """Whether some row of a file has a value in column `name` (from its row groups' statistics: not all null)."""
    names = metadata.schema.to_arrow_schema().names
    if name not in names:
        return False
    column = names.index(name)
    for i in range(metadata.num_row_groups):
        statistics = metadata.row_group(i).column(column).statistics
        if (
            statistics is None
            or not statistics.has_null_count
            or statistics.null_count < metadata.row_group(i).num_rows
        ):
            return True
    return False


def rows_dataset(fs: fsspec.AbstractFileSystem, root: str, files: list[str], columns: list[str] | None):
    """The output's `columns` (None: all) as a Ray Dataset, a read task per file."""
    import ray

    files_read = ray.data.read_datasource(
        OutputFiles(files, columns=columns, filesystem=arrow_filesystem(fs)), override_num_blocks=len(files)
    )
    return (files_read.select_columns(columns) if columns else files_read).map_batches(
        plain_strings, batch_format="pyarrow", batch_size=None
    )


class OutputFiles(FileBasedDatasource):
    """Output files, their `columns` only (those a file lacks are left out), streamed in row groups. Not
    `ray.data.read_parquet`: in Ray 2.60 every call lists the files with 32 new footer-reading actors, whose start
    costs seconds each time a job reads its output, and the driver has the footers already (`footers`). The figure:
    docs/decisions/2026-12-01-corpus-scale.md."""

    def __init__(self, paths: list[str], *, columns: list[str] | None, **kwargs):
        super().__init__(paths, **kwargs)
        self.columns = columns

    def _open_input_source(self, filesystem, path, **open_args):
        return filesystem.open_input_file(path)  # a footer first: random access, not a stream

    def _read_stream(self, f, path: str):
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        wanted = [c for c in self.columns if c in names] if self.columns is not None else None
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, columns=wanted)


def plain_strings(batch: pa.Table) -> pa.Table:
    """large_string (as Ray's Parquet reader may give them) and dictionary-encoded string columns as string: the
    manifest's rows have string ids, and joins and group-bys need one type on both sides."""
    return batch.cast(
        pa.schema(
            [
                pa.field(f.name, pa.string())
                if f.type == pa.large_string()
                or (pa.types.is_dictionary(f.type) and pa.types.is_string(f.type.value_type))
                else f
                for f in batch.schema
            ]
        )
    )


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
    return (
        pa.concat_tables(tables, promote_options="default") if tables else pa.table({"id": pa.array([], pa.string())})
    )


def shuffle_partitions() -> int:
    """Hash partitions for joins and group-bys: one per CPU of the cluster. Ray's default (200) costs more in
    task overhead than it gains below millions of rows per partition on small clusters."""
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 2)))


def with_run_id(batch: pa.Table, run_id: str) -> pa.Table:
    """Rows -> the same with the `run_id` that writes them (this module, not the job's: Ray Data's tasks import a
    function's module, and the job's imports torch, a slow import in every worker process)."""
    return batch.append_column("run_id", pa.array([run_id] * batch.num_rows, pa.string()))


def each_language(batch: pa.Table, langs: list[str], run_id: str) -> pa.Table:
    """Manifest rows -> one row per (row, language), with the run's id (a backfill's pairs to do)."""
    index = batch.column_names.index("tgt_lang")
    tables = [batch.set_column(index, "tgt_lang", pa.array([lang] * batch.num_rows, pa.string())) for lang in langs]
    return with_run_id(pa.concat_tables(tables), run_id)
