"""Long recordings in the batch job: split at pauses before the feature stage, joined back after the write.

A row longer than `max_segment_s` becomes one row per segment (id `<row id>~<index>`, its own offset and duration),
so the segments of a 1-hour file spread over the feature and generation actors like any utterances. The recording is
read in blocks to find the segments, and each segment reads only its own slice: memory stays bounded.

Segment rows never reach the output's own files: before the write, `set_aside_segments` puts them in
`_s2t/segments/` (with their bookkeeping columns, `segment_*`), and every other row gets the output's one set of
columns (`final_rows`: no `segment_*`, a `segments` column null for short rows), so every file of an output has the
same schema, as the tools that read Parquet datasets need (docs/ecosystem.md). After the write, `join_segments` (a
Ray Data group-by) replaces the segment rows of each recording whose segments are all there with one output row: the
joined `text`, a `segments` list (`start_s`, `end_s`, `text`, in the recording's time), and the first segment error
if any. It runs again at the start of every run, so a run killed between the two steps is completed.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile

from .audio import (
    INLINE_AUDIO,
    IO_CONCURRENCY,
    AudioError,
    PyAVAudio,
    _check_duration,
    as_audio_error,
    open_audio,
    open_libsndfile,
    prefers_pyav,
    slice_frames,
    store_failed,
)
from .output import (
    SEGMENT_COLUMNS,
    SEGMENT_FIELDS,
    SEGMENTS,
    SEGMENTS_TYPE,
    OutputFiles,
    OutputNames,
    arrow_filesystem,
    final_rows,
    footers,
    holds_segments,
    own_name,
    plain_strings,
    shuffle_partitions,
)
from .storage import RowRetry

BLOCK_S = 60.0  # seconds of audio read at a time while looking for pauses


def split_long_audio(
    batch: pa.Table,
    max_segment_s: float,
    max_duration_s: float,
    storage_options: dict | None,
    io_concurrency: int = IO_CONCURRENCY,
    row_retry: RowRetry = RowRetry(),
) -> pa.Table:
    """Rows -> the same rows, each long one replaced by its segments (the job drops those already written after).

    Rows are read `io_concurrency` at a time (each read is mostly waiting on storage); a row whose manifest duration
    is at most `max_segment_s` is not opened here at all: the feature stage reads it once."""
    schema = batch.schema
    for name, kind in SEGMENT_FIELDS + [("speech_s", pa.float64())]:
        schema = schema.append(pa.field(name, kind))
    # Rows that cannot be long pass as they are, without a Python object per row (most rows of most corpora).
    short = pc.fill_null(
        pc.or_kleene(pc.is_valid(batch["error"]), pc.less_equal(batch["duration_s"], max_segment_s)), False
    )
    kept = batch.filter(short)
    kept = pa.Table.from_arrays(
        [
            *kept.columns,
            *(pa.nulls(kept.num_rows, schema.field(name).type) for name in schema.names[len(kept.columns) :]),
        ],
        schema=schema,
    )
    long = batch.filter(pc.invert(short))
    if not long.num_rows:
        return kept
    with ThreadPoolExecutor(min(io_concurrency, long.num_rows), thread_name_prefix="split-read") as reads:
        results = list(
            reads.map(
                lambda row: split_or_error(
                    row, max_segment_s, max_duration_s, storage_options, io_concurrency, row_retry
                ),
                long.to_pylist(),
            )
        )
    return pa.concat_tables([kept, pa.Table.from_pylist([row for rows in results for row in rows], schema=schema)])


def split_or_error(
    row: dict,
    max_segment_s: float,
    max_duration_s: float,
    storage_options,
    connections: int = 1,
    row_retry: RowRetry = RowRetry(),
) -> list[dict]:
    """One row -> its segments, or itself (short, or with the error that kept it from being read, read again while
    the store fails)."""
    row.update(dict.fromkeys(SEGMENT_COLUMNS + ["speech_s"]))
    if row["error"] is not None or (row["duration_s"] is not None and row["duration_s"] <= max_segment_s):
        return [row]
    try:
        return row_retry.call(
            lambda: split_row(row, max_segment_s, max_duration_s, storage_options, connections), store_failed
        )
    except Exception as error:  # this row's file system or codec failure only
        row["error"] = str(as_audio_error(row["audio"], error))
    return [row]


def split_row(
    row: dict, max_segment_s: float, max_duration_s: float, storage_options, connections: int = 1
) -> list[dict]:
    # A length the manifest does not give, from the start: most likely an utterance of its own (one GET, no HEAD).
    one_get = not row["offset_s"] and row["duration_s"] is None
    with open_audio(row["audio"], storage_options, row.get(INLINE_AUDIO), connections, one_get) as f:
        sound, _ = open_libsndfile(f)
        if sound is None or prefers_pyav(sound):
            if sound is not None:
                sound.close()
            f.seek(0)
            return split_decoded(row, f, max_segment_s, max_duration_s)
        with sound:
            offset = row["offset_s"] or 0.0
            start, frames = slice_frames(sound, row["audio"], offset, row["duration_s"])  # what is not there: truncated
            if frames is None:
                return [row]  # a length neither the manifest nor the file knows: the feature stage reads it whole
            seconds = frames / sound.samplerate
            if seconds <= max_segment_s:
                return [row]
            _check_duration(row["audio"], seconds, 0.0, max_duration_s)
            sound.seek(start)
            blocks = sound.blocks(
                blocksize=round(BLOCK_S * sound.samplerate), frames=frames, dtype="float32", always_2d=True
            )
            from s2t_model.segment import segment_stream  # here: torch only in processes that split a recording

            segments = list(segment_stream(blocks, sound.samplerate, max_segment_s))
            return segment_rows_of(
                row,
                segments,
                seconds,
                lambda segment: encode_slice(sound, start + segment.start, segment.end - segment.start),
            )


def split_decoded(row: dict, f, max_segment_s: float, max_duration_s: float) -> list[dict]:
    """`split_row` for what PyAV decodes: the recording streamed once in blocks (its length is what was decoded,
    no header says it for sure), memory one block whatever its length."""
    from s2t_model.segment import segment_stream

    try:
        source = PyAVAudio(f, row["audio"])
    except AudioError:
        return [row]  # the feature stage reads it again and says what is wrong with it
    with source:
        offset = row["offset_s"] or 0.0
        indexed = source.indexed_length_s
        if not offset and row["duration_s"] is None and indexed is not None and indexed <= max_segment_s:
            return [row]  # an index that says short: the feature stage reads it once
        counted = [0]

        def blocks():
            for block in source.blocks(offset, row["duration_s"], round(BLOCK_S * source.rate), max_duration_s):
                counted[0] += len(block)
                yield block

        segments = list(segment_stream(blocks(), source.rate, max_segment_s))
        seconds = counted[0] / source.rate
        if seconds <= max_segment_s:
            return [{**row, "duration_s": seconds}]

        def own_slice(segment) -> bytes:
            out = io.BytesIO()
            samples = source.read(offset + segment.start_s, segment.duration_s)
            soundfile.write(out, samples, source.rate, format="WAV", subtype="FLOAT")  # decoded samples, unchanged
            return out.getvalue()

        return segment_rows_of(row, segments, seconds, own_slice)


def segment_rows_of(row: dict, segments: list, seconds: float, own_slice) -> list[dict]:
    """A recording's rows: one per segment, each carrying `own_slice(segment)` (bytes) when the
    recording came as bytes; or, without speech, the row itself with speech_s 0."""
    if not segments:  # no speech: the later stages give it the text "" without reading it again
        return [{**row, "duration_s": seconds, "speech_s": 0.0}]
    offset = row["offset_s"] or 0.0
    pieces = []
    for index, segment in enumerate(segments):
        piece = {
            **row,
            "id": f"{row['id']}~{index:05d}",
            "offset_s": offset + segment.start_s,
            "duration_s": segment.duration_s,
            "segment_of": row["id"],
            "segment_index": index,
            "segment_count": len(segments),
            "segment_start_s": segment.start_s,
            "recording_duration_s": seconds,
            "recording_offset_s": offset,
        }
        if row.get(INLINE_AUDIO) is not None:  # its own slice, not the recording's bytes once per segment
            piece.update({INLINE_AUDIO: own_slice(segment), "offset_s": 0.0})
        pieces.append(piece)
    return pieces


def encode_slice(sound: soundfile.SoundFile, start: int, frames: int) -> bytes:
    """Frames [start, start + frames) of an open file as a file of their own, samples unchanged: FLAC from FLAC
    (a fast compression level: this is transport, not storage), else WAV in the source's sample format."""
    container = "FLAC" if sound.format == "FLAC" else "WAV"
    subtype = sound.subtype if soundfile.check_format(container, sound.subtype) else "FLOAT"
    # Integer samples read as integers: libsndfile scales float to int16 by 32767 but int16 to float by 1/32768.
    dtype = {"PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32"}.get(subtype, "float32")
    sound.seek(start)
    samples = sound.read(frames, dtype=dtype, always_2d=True)
    out = io.BytesIO()
    options = {"compression_level": 0.0} if container == "FLAC" else {}
    soundfile.write(out, samples, sound.samplerate, format=container, subtype=subtype, **options)
    return out.getvalue()


def set_aside_segments(batch: pa.Table, folder: str, filesystem) -> pa.Table:
    """Rows before the write -> its rows in the output's schema; the segment rows among them are written to
    `folder` (`_s2t/segments/`) here, for `join_segments`. A task retried after its write writes them again: the
    join keeps one row per segment."""
    if "segment_of" in batch.column_names:
        is_segment = pc.fill_null(pc.is_valid(batch["segment_of"]), False)
        segments = batch.filter(is_segment)
        if segments.num_rows:
            pq.write_table(plain_strings(segments), own_name(folder), filesystem=filesystem)
        batch = batch.filter(pc.invert(is_segment))
    return final_rows(batch)


def write_output(dataset, fs: fsspec.AbstractFileSystem, root: str, rows_per_file: int) -> None:
    """The job's rows written to `root` (`OutputNames`), their segment rows set aside for `join_segments`."""
    fs.makedirs(f"{root.rstrip('/')}/{SEGMENTS}", exist_ok=True)
    filesystem = arrow_filesystem(fs)
    dataset.map_batches(
        set_aside_segments,
        fn_kwargs=dict(folder=f"{root.rstrip('/')}/{SEGMENTS}", filesystem=filesystem),
        batch_format="pyarrow",
        batch_size=None,
    ).write_parquet(root, filesystem=filesystem, min_rows_per_file=rows_per_file, filename_provider=OutputNames())


def join_segments(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Replace the segment rows of every complete recording with its joined row; returns how many were joined.

    Only files whose footer statistics show segment rows are read, by Ray Data read tasks; recordings are joined by
    a distributed group-by on (target language, recording id) — the language too, as a backfill holds a recording
    once per language — and a recording a killed run already joined (its id is in the output) is found by an
    anti-join, not written twice."""
    written = footers(fs, root)
    holders = [path for path, metadata in written.items() if holds_segments(metadata)]
    if not holders:
        return 0
    parts = with_lang_key(read_parquet_files(fs, holders)).map_batches(segment_rows, batch_format="pyarrow")
    complete = (
        parts.groupby([LANG_KEY, "segment_of"], num_partitions=shuffle_partitions())
        .map_groups(join_recording, batch_format="pyarrow")
        .materialize()
    )  # held by the object store, used twice below
    if not complete.count():
        return 0
    others = [path for path in written if path not in holders]
    new = (
        complete
        if not others
        else complete.join(
            with_lang_key(read_parquet_files(fs, others)).select_columns([LANG_KEY, "id"]),
            join_type="left_anti",
            num_partitions=shuffle_partitions(),
            on=(LANG_KEY, "id"),  # else joined by a run killed before the removal
        ).map_batches(plain_strings, batch_format="pyarrow", batch_size=None)
    )
    new.map_batches(joined_output, batch_format="pyarrow", batch_size=None).write_parquet(
        root, filesystem=arrow_filesystem(fs), filename_provider=OutputNames()
    )
    # Only then do the parts go: a run killed in between finds the recording joined and removes them next time.
    joined = {
        (row[LANG_KEY], row["segment_of"]) for row in complete.select_columns([LANG_KEY, "segment_of"]).take_all()
    }
    remove_segments(fs, holders, joined)
    return complete.count()


LANG_KEY = "lang_key"  # a row's target language, "" for none: a key with no nulls for the group-by and the join


def joined_output(batch: pa.Table) -> pa.Table:
    return final_rows(batch.drop_columns([LANG_KEY]))


def lang_key(batch: pa.Table) -> pa.Table:
    lang = (
        batch["tgt_lang"].cast(pa.string())
        if "tgt_lang" in batch.column_names
        else pa.nulls(batch.num_rows, pa.string())
    )
    return plain_strings(batch).append_column(LANG_KEY, pc.fill_null(lang, ""))


def with_lang_key(rows):
    return rows.map_batches(lang_key, batch_format="pyarrow", batch_size=None)


def segment_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["segment_of"]))


def read_parquet_files(fs, files: list[str]):
    import ray

    return ray.data.read_datasource(
        OutputFiles(files, columns=None, filesystem=arrow_filesystem(fs)), override_num_blocks=len(files)
    )


def join_recording(group: pa.Table) -> pa.Table:
    """The segment rows of one recording -> its joined row (with its keys, `lang_key` and `segment_of`), or no row
    while segments are missing."""
    # One row per segment index (a segment redone after a crash may be there twice).
    rows = sorted({r["segment_index"]: r for r in group.to_pylist()}.values(), key=lambda r: r["segment_index"])
    fields = [f for f in group.schema if f.name not in SEGMENT_COLUMNS + [LANG_KEY]] + [
        pa.field("segments", SEGMENTS_TYPE),
        pa.field(LANG_KEY, pa.string()),
        pa.field("segment_of", pa.string()),
    ]
    if len(rows) != rows[0]["segment_count"]:
        return pa.Table.from_pylist([], schema=pa.schema(fields))
    return pa.Table.from_pylist([{**joined_row(rows), "segment_of": rows[0]["segment_of"]}], schema=pa.schema(fields))


def joined_row(parts: list[dict]) -> dict:
    first = parts[0]
    row = {k: v for k, v in first.items() if k not in SEGMENT_COLUMNS}  # (lang_key kept: the group's key)
    texts = [p["text"] for p in parts if p["text"]]
    tokens = sum(p["num_tokens"] or 0 for p in parts)
    failed = next((p for p in parts if p["error"]), None)
    row.update(
        id=first["segment_of"],
        offset_s=first["recording_offset_s"]
        if first.get("recording_offset_s") is not None
        else first["offset_s"] - first["segment_start_s"],  # (segments written before recording_offset_s existed)
        duration_s=first["recording_duration_s"],
        text=None if failed else " ".join(texts),
        num_tokens=None if failed else tokens,
        avg_logprob=None
        if failed or not tokens
        else sum((p["avg_logprob"] or 0.0) * (p["num_tokens"] or 0) for p in parts) / tokens,
        speech_s=None if any(p.get("speech_s") is None for p in parts) else sum(p["speech_s"] for p in parts),
        low_confidence=None if failed else any(p.get("low_confidence") for p in parts),
        error=None
        if not failed
        else failed["error"].replace(
            ":", f": segment {failed['segment_index']} at {failed['segment_start_s']:.1f} s:", 1
        ),
        segments=[
            {"start_s": p["segment_start_s"], "end_s": p["segment_start_s"] + p["duration_s"], "text": p["text"]}
            for p in parts
        ],
    )
    if "words" in first:  # --word-timestamps: each segment's words moved into the recording's time
        row["words"] = (
            None
            if failed
            else [
                {**w, "start_s": p["segment_start_s"] + w["start_s"], "end_s": p["segment_start_s"] + w["end_s"]}
                for p in parts
                for w in p["words"] or []
            ]
        )
    return row


def remove_segments(fs, holders: list[str], joined: set[tuple[str, str]]) -> None:
    """Rewrite each file holding segments without those of the `joined` recordings, each (language key,
    recording id) (one file at a time)."""
    for path in holders:
        folder = path.rsplit("/", 1)[0]
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        keys = lang_key(table)
        keep = pa.array(
            [
                (lang, p) not in joined
                for lang, p in zip(keys[LANG_KEY].to_pylist(), table.column("segment_of").to_pylist())
            ]
        )
        kept = table.filter(keep)
        if kept.num_rows == table.num_rows:
            continue
        # Removed before the rest is written again: a run killed in between redoes those rows, never doubles them.
        fs.rm(path)
        if kept.num_rows:
            with fs.open(own_name(folder), "wb") as f:  # of the jobs' naming: the output's checks pass it
                pq.write_table(kept, f)
