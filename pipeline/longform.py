"""Long recordings in the batch job: split at pauses before the feature stage, joined back after the write.

A row longer than `max_segment_s` becomes one row per segment (id `<row id>~<index>`, its own offset and duration),
so the segments of a 1-hour file spread over the feature and generation actors like any utterances. The recording is
read in blocks to find the segments, and each segment reads only its own slice: memory stays bounded.

After the write, `join_segments` replaces the segment rows of each recording whose segments are all there with one
row: the joined `text`, a `segments` list (`start_s`, `end_s`, `text`, in the recording's time), and the first
segment error if any. It runs again at the start of every run, so a run killed between the two steps is completed.
"""

from __future__ import annotations

import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

from s2t_model.segment import segment_stream

from .audio import AudioError, _check_duration, _open
from .output import output_files

SEGMENT_FIELDS = [("segment_of", pa.string()), ("segment_index", pa.int32()), ("segment_count", pa.int32()),
                  ("segment_start_s", pa.float64()), ("recording_duration_s", pa.float64())]
SEGMENT_COLUMNS = [name for name, _ in SEGMENT_FIELDS]
SEGMENTS_TYPE = pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string())]))
BLOCK_S = 60.0  # seconds of audio read at a time while looking for pauses


def split_long_audio(batch: pa.Table, max_segment_s: float, max_duration_s: float, storage_options: dict | None,
                     done: frozenset = frozenset()) -> pa.Table:
    """Rows -> the same rows, each long one replaced by its segments not yet in `done` (ids already written)."""
    rows = []
    for row in batch.to_pylist():
        row.update(dict.fromkeys(SEGMENT_COLUMNS))
        if row["error"] is None:
            try:
                rows.extend(split_row(row, max_segment_s, max_duration_s, storage_options, done))
                continue
            except AudioError as error:
                row["error"] = str(error)
            except Exception as error:  # this row's file system or codec failure only
                row["error"] = f"unreadable: {row['audio']}: {type(error).__name__}: {error}"
        rows.append(row)
    schema = batch.schema
    for name, kind in SEGMENT_FIELDS:
        schema = schema.append(pa.field(name, kind))
    return pa.Table.from_pylist(rows, schema=schema)


def split_row(row: dict, max_segment_s: float, max_duration_s: float, storage_options, done) -> list[dict]:
    with _open(row["audio"], storage_options) as f:
        try:
            sound = soundfile.SoundFile(f)
        except (soundfile.LibsndfileError, RuntimeError, TypeError):
            return [row]  # the feature stage reads it again and says what is wrong with it
        with sound:
            offset = row["offset_s"] or 0.0
            seconds = row["duration_s"] if row["duration_s"] is not None else sound.frames / sound.samplerate - offset
            if seconds <= max_segment_s:
                return [row]
            _check_duration(row["audio"], seconds, 0.0, max_duration_s)
            sound.seek(round(offset * sound.samplerate))
            blocks = sound.blocks(blocksize=round(BLOCK_S * sound.samplerate), frames=round(seconds * sound.samplerate),
                                  dtype="float32", always_2d=True)
            segments = list(segment_stream(blocks, sound.samplerate, max_segment_s))
    if not segments:
        row["error"] = f"no_speech: {row['audio']}: {seconds:.1f} s without a segment of speech"
        return [row]
    pieces = []
    for index, segment in enumerate(segments):
        piece_id = f"{row['id']}~{index:05d}"
        if piece_id in done:
            continue
        pieces.append({**row, "id": piece_id, "offset_s": offset + segment.start_s, "duration_s": segment.duration_s,
                       "segment_of": row["id"], "segment_index": index, "segment_count": len(segments),
                       "segment_start_s": segment.start_s, "recording_duration_s": seconds})
    return pieces


def join_segments(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Replace the segment rows of every complete recording with its joined row; returns how many were joined.

    Recordings are told apart by folder too: a partitioned output (the backfill's tgt_lang=xx) holds one per folder.
    """
    parts: dict[tuple[str, str], list[dict]] = {}
    holders: dict[str, pa.Table] = {}
    ids: set[tuple[str, str]] = set()
    for path in output_files(fs, root):
        folder = path.rsplit("/", 1)[0]
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            ids.update((folder, i) for i in parquet.read(columns=["id"]).column("id").to_pylist())
            if "segment_of" not in parquet.schema_arrow.names:
                continue
            segment_of = parquet.read(columns=["segment_of"]).column("segment_of")
            if segment_of.null_count == len(segment_of):
                continue
            table = holders[path] = parquet.read()
        for row in table.filter(pa.compute.is_valid(table.column("segment_of"))).to_pylist():
            parts.setdefault((folder, row["segment_of"]), []).append(row)
    # One row per segment index (a segment redone after a crash may be there twice).
    parts = {key: sorted({r["segment_index"]: r for r in rows}.values(), key=lambda r: r["segment_index"])
             for key, rows in parts.items()}
    complete = {key: rows for key, rows in parts.items() if len(rows) == rows[0]["segment_count"]}
    by_folder: dict[str, list[dict]] = {}
    for (folder, parent), rows in complete.items():
        if (folder, parent) not in ids:  # else joined by a run killed before it removed the parts
            by_folder.setdefault(folder, []).append(joined_row(rows))
    schema = next(iter(holders.values())).schema if holders else None
    for folder, joined in by_folder.items():
        columns = [c for c in joined[0] if c != "segments"]
        fields = [schema.field(c) for c in columns] + [pa.field("segments", SEGMENTS_TYPE)]
        with fs.open(f"{folder}/joined-{uuid.uuid4().hex}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(joined, schema=pa.schema(fields)), f)
    # Only then do the parts go: a run killed in between finds the recording joined and removes them next time.
    remove_segments(fs, holders, set(complete))
    return sum(len(joined) for joined in by_folder.values())


def joined_row(parts: list[dict]) -> dict:
    first = parts[0]
    row = {k: v for k, v in first.items() if k not in SEGMENT_COLUMNS}
    texts = [p["text"] for p in parts if p["text"]]
    tokens = sum(p["num_tokens"] or 0 for p in parts)
    failed = next((p for p in parts if p["error"]), None)
    row.update(
        id=first["segment_of"],
        offset_s=first["offset_s"] - first["segment_start_s"],
        duration_s=first["recording_duration_s"],
        text=None if failed else " ".join(texts),
        num_tokens=None if failed else tokens,
        avg_logprob=None if failed or not tokens else
        sum((p["avg_logprob"] or 0.0) * (p["num_tokens"] or 0) for p in parts) / tokens,
        error=None if not failed else failed["error"].replace(":", f": segment {failed['segment_index']} at "
                                                                   f"{failed['segment_start_s']:.1f} s:", 1),
        segments=[{"start_s": p["segment_start_s"], "end_s": p["segment_start_s"] + p["duration_s"],
                   "text": p["text"]} for p in parts],
    )
    return row


def remove_segments(fs, holders: dict[str, pa.Table], done: set[tuple[str, str]]) -> None:
    for path, table in holders.items():
        folder = path.rsplit("/", 1)[0]
        keep = pa.array([(folder, p) not in done for p in table.column("segment_of").to_pylist()])
        kept = table.filter(keep)
        if kept.num_rows == table.num_rows:
            continue
        # Removed before the rest is written again: a run killed in between redoes those rows, never doubles them.
        fs.rm(path)
        if kept.num_rows:
            folder, name = path.rsplit("/", 1)
            with fs.open(f"{folder}/rest-{uuid.uuid4().hex[:8]}-{name}", "wb") as f:
                pq.write_table(kept, f)
