"""Audio stored in tar shards, read by Ray Data tasks into the job's rows (pipeline/rows.py SCHEMA and passthrough
columns) plus each row's audio file bytes (`audio_bytes`, which the feature stage decodes; see pipeline/audio.py).
Every tar is read as one sequential stream: one open per shard, never a request per sample.

WebDataset (`shard-{000000..000127}.tar`): a sample is the consecutive members sharing a key, the path up to the
first dot of the basename. Its audio is the member whose extension libsndfile reads (else its one other member that
is not `.json`/`.txt`, which then fails to decode as `unreadable`); `<key>.json` may give `id`, `text`, `tgt_lang`,
`duration`, `offset` and passthrough fields, `<key>.txt` the reference. Id: the json's `id`, else `<shard stem>/<key>`.

NeMo tarred audio (a manifest whose `audio_filepath` names a member of tar `shard_id`): the manifest's rows are
grouped by `shard_id` on the cluster and each group streams its tar once, taking the members its rows name.

Damage is contained to its shard: a tar cut short, or with bytes that are no tar header, gives the samples before
the break and then error rows (WebDataset: one row `<shard stem>/.damaged` naming the shard and the break, nothing
lists the samples lost; NeMo: one per manifest row whose member was not reached). A member that is not audio fails
in the feature stage. Nothing here fails the job.

Why not `ray.data.read_webdataset`: it reads a shard with tarfile in one read task that either returns every sample
or raises; a shard cut short fails its task, and the job, and what preceded the break is lost. tarfile also ends an
archive quietly at a corrupt header past the first member (tests/test_shards.py), so the break must be watched for.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyarrow as pa
import soundfile
from ray.data.datasource import FileBasedDatasource

from .audio import INLINE_AUDIO, is_remote
from .ids import SharedIds
from .listing import expand
from .reasons import StoreUnavailable, is_transient
from .rows import SCHEMA, IdNumbering, ManifestError, normalise
from .storage import RowRetry

# WebDataset's split of a member name into sample key and field (webdataset.tariterators.base_plus_ext).
SAMPLE_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# Audio fields by extension: what libsndfile reads, and what FFmpeg (PyAV) does: audio files and the audio tracks of
# video files. The extension only picks the field; pipeline.audio picks the decoder by what the bytes are.
AUDIO_SUFFIXES = frozenset(name.lower() for name in soundfile.available_formats()) | {
    "oga",
    "opus",
    "aif",
    "snd",
    "mp3",
    "mpga",
    "mpeg",
    "m4a",
    "m4b",
    "mp4",
    "aac",
    "mov",
    "mkv",
    "mka",
    "webm",
    "amr",
    "3gp",
    "3g2",
    "wma",
    "asf",
    "ac3",
    "eac3",
    "ape",
    "wv",
    "tta",
    "spx",
    "mpc",
    "dts",
    "gsm",
    "mp2",
}
TEXT_FIELDS = ("json", "txt")
DAMAGED = ".damaged"  # the key of a WebDataset shard's damage row: no sample's key starts with a dot
MEMBERS_KEPT = 1000  # tarfile keeps every header it read; a long shard's are dropped now and then
# NeMo names a repeated source file's second entry `<name>-sub<N>.<ext>` without writing it again: it is `<name>.<ext>`.
NEMO_REPEAT = re.compile(r"-sub\d+(?=\.[^.]*$|$)")


@dataclass
class Damage:
    """Where a tar stopped being a tar: `reason` truncated or corrupt, `detail` says where and why; `member`: the
    member whose data was cut short (its header was whole), None when the break is at a header."""

    reason: str
    detail: str
    member: str | None = None


class _Header(tarfile.TarInfo):
    """A TarInfo that records the header errors tarfile swallows: past the first member it ends the archive quietly
    at a header it cannot read (corrupt bytes, a file cut short), exactly as at the end-of-archive marker."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the end-of-archive marker: a proper end
            raise
        except tarfile.HeaderError as error:
            if getattr(tar, "damage", None) is None:
                cut = isinstance(error, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError))
                tar.damage = Damage(
                    "truncated" if cut else "corrupt",
                    f"the file ends at byte {tar.offset} without tar's end-of-archive marker"
                    if isinstance(error, tarfile.EmptyHeaderError)
                    else f"no tar header at byte {tar.offset} ({error})",
                )
            raise


TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def tar_members(f, read_data: Callable[[str], bool]) -> Iterator[tuple[str, bytes | None] | Damage]:
    """The file members of one tar in order, as (name, bytes), the bytes only where `read_data(name)` (else None:
    skipped, by a seek when `f` is seekable, else read past); then, if the tar breaks, one Damage, the last item.
    A stream and a seekable file of the same bytes give the same members and the same damage."""
    seekable = getattr(f, "seekable", lambda: False)()
    try:
        tar = tarfile.open(fileobj=f, mode="r:*" if seekable else "r|*", tarinfo=_Header)
    except TAR_ERRORS as error:
        store_failure(error)
        yield Damage("corrupt", f"not a tar file ({error})")
        return
    member = None
    try:
        while (member := tar.next()) is not None:
            if len(tar.members) > MEMBERS_KEPT:
                tar.members.clear()
            if member.isfile():
                yield member.name, tar.extractfile(member).read() if read_data(member.name) else None
    except TAR_ERRORS as error:
        store_failure(error)
        cut = isinstance(error, EOFError) or "unexpected end" in str(error)
        where = f" in member {member.name} (header at byte {member.offset})" if member is not None else ""
        yield getattr(tar, "damage", None) or Damage(
            "truncated" if cut else "corrupt",
            f"the tar breaks{where}: {error}",
            member.name if member is not None else None,
        )
        return
    if getattr(tar, "damage", None) is not None:
        yield tar.damage


def store_failure(error: Exception) -> None:
    """Raise StoreUnavailable for a failure of the store or the network while a tar is read: no damage of the tar,
    but a read to do again (Ray Data's read tasks do, matching its message; `read_nemo_shard` does itself)."""
    if is_transient(error):
        raise StoreUnavailable("reading a tar", error) from error


def shard_stem(url: str) -> str:
    name = posixpath.basename(url)
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def member_url(shard_url: str, member: str) -> str:
    return f"{shard_url}/{member}"


# ---- WebDataset ---------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    key: str
    fields: dict[str, tuple[str, bytes | None]] = field(default_factory=dict)  # extension -> (member name, bytes)

    def audio(self) -> tuple[str, bytes | None] | None:
        """The audio member: one of an audio extension (AUDIO_SUFFIXES), else the one member that is neither json nor
        txt (which the feature stage then names unreadable)."""
        by_suffix = [ext for ext in self.fields if ext.rsplit(".", 1)[-1] in AUDIO_SUFFIXES]
        others = [ext for ext in self.fields if ext not in TEXT_FIELDS]
        chosen = by_suffix[:1] or (others if len(others) == 1 else [])
        return self.fields[chosen[0]] if chosen else None

    def record(self, stem: str, url: str) -> tuple[dict, str | None]:
        """(the manifest record of this sample, an error of the sample itself or None)."""
        audio = self.audio()
        record = {"id": f"{stem}/{self.key}", "audio_filepath": None, "_line": self.key}
        error = None
        if "json" in self.fields:
            name, data = self.fields["json"]
            try:
                fields = json.loads(data)
                if not isinstance(fields, dict):
                    raise ValueError(f"a JSON {type(fields).__name__}, not an object")
                record.update((k, v) for k, v in fields.items() if k not in ("audio_filepath", "_line"))
            except (ValueError, UnicodeDecodeError) as exc:
                error = f"bad_manifest_line: {member_url(url, name)}: not a JSON object ({exc})"
        if "txt" in self.fields and record.get("text") in (None, "") and record.get("tgt_text") in (None, ""):
            record["text"] = self.fields["txt"][1].decode("utf-8", "replace").strip()
        if audio is not None:
            record["audio_filepath"] = member_url(url, audio[0])
        elif error is None:
            error = (
                f"missing: {url}: sample {self.key} has no audio member "
                f"(it has {', '.join(name for name, _ in self.fields.values())})"
            )
        return record, error


def webdataset_rows(f, url: str, rows_per_block: int, with_audio: bool = True) -> Iterator[pa.Table]:
    """One WebDataset shard (an open binary stream; `url` names it) -> tables of at most `rows_per_block` rows, with
    each sample's audio bytes in `audio_bytes` when `with_audio` (else those members are skipped, and the tables
    are what the summary needs). Importable on its own, e.g. to measure shard reads."""
    stem, numbering = shard_stem(url), IdNumbering()
    block: list[tuple[Sample, bool]] = []
    sample, damage = None, None

    def wanted(name: str) -> bool:
        match = SAMPLE_MEMBER.match(name)
        return with_audio or (match is not None and match[2].lower() in TEXT_FIELDS)

    for item in tar_members(f, wanted):
        if isinstance(item, Damage):
            damage = item
            # Cut short in a member whose header came (whether or not its data was being read): the sample before
            # it is whole.
            cut = SAMPLE_MEMBER.match(damage.member or "")
            if sample is not None and cut is not None and cut[1] != sample.key:
                block.append(sample)
                sample = Sample(cut[1])
            break
        name, data = item
        match = SAMPLE_MEMBER.match(name)
        if match is None:  # no extension: no field of any sample (WebDataset skips these too)
            continue
        key, ext = match[1], match[2].lower()
        if sample is not None and sample.key != key:
            block.append(sample)
            if len(block) == rows_per_block:
                yield _sample_table(block, stem, url, numbering, with_audio)
                block = []
            sample = None
        sample = sample or Sample(key)
        sample.fields[ext] = (name, data)
    if damage is None and sample is not None:
        block.append(sample)
    if block:
        yield _sample_table(block, stem, url, numbering, with_audio)
    if damage is not None:  # the sample in progress is not known whole: it goes with the rest
        lost = f"; sample {sample.key} and any after it are lost" if sample is not None else ""
        yield pa.Table.from_pylist(
            [
                {
                    "id": f"{stem}/{DAMAGED}",
                    "audio": url,
                    "offset_s": 0.0,
                    "duration_s": None,
                    "reference": None,
                    "tgt_lang": None,
                    "error": f"{damage.reason}: {url}: {damage.detail}{lost}",
                }
            ],
            schema=SCHEMA,
        )


def _sample_table(samples: list[Sample], stem: str, url: str, numbering: IdNumbering, with_audio: bool) -> pa.Table:
    records, errors = zip(*(sample.record(stem, url) for sample in samples))
    table = normalise(list(records), url, None, numbering)
    if any(errors):
        merged = [mine or theirs for mine, theirs in zip(errors, table["error"].to_pylist())]
        table = table.set_column(table.column_names.index("error"), "error", pa.array(merged, pa.string()))
    if with_audio:
        audio = [sample.audio() for sample in samples]
        table = table.append_column(INLINE_AUDIO, pa.array([a[1] if a else None for a in audio], pa.binary()))
    return table


class WebDatasetDatasource(FileBasedDatasource):
    """Ray Data's file datasource (its listing, read tasks, retries, filesystem) for WebDataset shards: one read
    task per shard, streaming it into blocks of `rows_per_block` samples."""

    def __init__(
        self,
        paths: list[str],
        *,
        rows_per_block: int,
        urls: dict,
        with_audio: bool = True,
        shared: SharedIds | None = None,
        **kwargs,
    ):
        super().__init__(paths, **kwargs)
        self.rows_per_block, self.urls, self.with_audio, self.shared = rows_per_block, urls, with_audio, shared

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        blocks = webdataset_rows(f, self.urls.get(path, path), self.rows_per_block, self.with_audio)
        yield from self.shared.named(blocks, path) if self.shared else blocks

    def _open_input_source(self, filesystem, path, **open_args):
        """Without audio (the summary's ids) a local, uncompressed shard is opened for random access: its audio
        members are skipped by seeks, not read. Elsewhere it is streamed again (on S3 a seek past s3fs's 50 MB
        read-ahead block costs a request of its own: no fewer bytes, more requests)."""
        import pyarrow.fs

        if (
            not self.with_audio
            and isinstance(filesystem, pyarrow.fs.LocalFileSystem)
            and self.resolve_compression(path, open_args) is None
        ):
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)


# ---- NeMo tarred audio ----------------------------------------------------------------------------------------------


class TarredAudio:
    """The tars of a NeMo tarred dataset (`audio__OP_0..127_CL_.tar`, `audio_{0..127}.tar`, a glob), each known by
    the shard id in its name (NeMo writes `audio_{shard_id}.tar`: the last number of the name)."""

    def __init__(self, pattern: str, storage_options: dict | None = None):
        import fsspec

        self.pattern = pattern
        self.fs, path = fsspec.core.url_to_fs(pattern, **(storage_options or {}))
        remote = is_remote(pattern)
        files = expand(self.fs, path, pattern)
        self.paths: dict[int, tuple[str, str]] = {}  # shard id -> (path in self.fs, URL)
        for path in files:
            numbers = re.findall(r"\d+", shard_stem(path))
            if not numbers:
                raise ManifestError(f"{pattern}: {path} has no shard number in its name (NeMo: audio_<shard_id>.tar)")
            shard = int(numbers[-1])
            if shard in self.paths:
                raise ManifestError(f"{pattern}: {self.paths[shard][0]} and {path} have the same shard number {shard}")
            self.paths[shard] = (path, self.fs.unstrip_protocol(path) if remote else path)

    def attach(self, rows, rows_per_block: int):
        """The manifest's rows (a Ray Dataset) with their members' bytes: grouped by shard on the cluster (a hash
        shuffle of the manifest's rows only, not of audio), each group streaming its tar once."""
        from .output import arrow_filesystem, shuffle_partitions

        return (
            rows.map_batches(_with_shard_number, batch_format="pyarrow", batch_size=None)
            .groupby("_shard", num_partitions=shuffle_partitions())
            .map_groups(
                read_nemo_shard,
                batch_format="pyarrow",
                fn_kwargs=dict(
                    tars=self.paths,
                    filesystem=arrow_filesystem(self.fs),
                    rows_per_block=rows_per_block,
                    pattern=self.pattern,
                ),
            )
        )


def _with_shard_number(batch: pa.Table) -> pa.Table:
    """`_shard`: the row's shard_id as an integer, -1 where there is none (a bad line, a row without shard_id)."""
    values = batch["shard_id"].to_pylist() if "shard_id" in batch.column_names else [None] * batch.num_rows
    return batch.append_column("_shard", pa.array([_shard_number(v) for v in values], pa.int64()))


def _shard_number(value) -> int:
    try:
        number = int(value)
        return number if number >= 0 and number == float(value) else -1
    except (TypeError, ValueError):
        return -1


def read_nemo_shard(
    rows: pa.Table, tars: dict, filesystem, rows_per_block: int, pattern: str, retry: RowRetry = RowRetry()
) -> Iterator[pa.Table]:
    """The manifest rows of one shard -> the same rows with `audio_bytes`, in blocks of at most `rows_per_block`,
    streaming the tar once; every row comes back once, an error row where its member could not be had. A read the
    store broke is done again (`retry`: its attempts and backoff) for the members not yet found; after the last,
    their rows are `unavailable` (retryable: the next run does them again)."""
    shard = rows["_shard"][0].as_py()
    rows = rows.drop_columns(["_shard"])
    path, url = tars.get(shard, (None, None))
    members = rows["audio"].to_pylist()
    errors = rows["error"].to_pylist()
    if url is not None:
        rows = rows.set_column(
            rows.column_names.index("audio"),
            "audio",
            pa.array([member_url(url, m) if m is not None else None for m in members], pa.string()),
        )
    # Members are matched by stem, as NeMo's own dataset matches them: `--force_codec flac` writes x.flac for the
    # manifest's x.wav.
    wanted: dict[str, list[int]] = {}
    for i, (member, error) in enumerate(zip(members, errors)):
        if error is None and url is not None:
            wanted.setdefault(member_stem(NEMO_REPEAT.sub("", member)), []).append(i)
    failed = {i: error for i, error in enumerate(errors) if error is not None}
    if url is None:
        reason = (
            f"missing: no tar of {pattern} has shard number {shard}"
            if shard >= 0
            else "bad_manifest_line: the row has no shard_id (a NeMo tarred manifest gives each row its tar's)"
        )
        failed.update({i: f"{reason} ({members[i]})" for i in range(len(members)) if i not in failed})
    found: list[tuple[int, bytes]] = []
    damage = None
    for attempt in range(retry.attempts if wanted else 0):
        damage = None
        try:
            with filesystem.open_input_stream(path) as f:
                for item in tar_members(f, lambda name: member_stem(name) in wanted):
                    if isinstance(item, Damage):
                        damage = item
                        break
                    name, data = item
                    found.extend((i, data) for i in wanted.pop(member_stem(name), []))
                    if len(found) >= rows_per_block:
                        yield _with_bytes(rows, found[:rows_per_block])
                        found = found[rows_per_block:]
                    if not wanted:  # every member this shard's rows name: the rest of the tar is not needed
                        break
            break
        except Exception as error:
            if not is_transient(error):
                if not isinstance(error, OSError):
                    raise
                damage = Damage(
                    "missing" if isinstance(error, FileNotFoundError) else "unreadable", f"cannot be opened ({error})"
                )  # the tar cannot be opened at all
                break
            damage = Damage("unavailable", f"the store failed while the tar was read ({error})")
            if attempt < retry.attempts - 1:
                retry.wait(attempt)  # then the members not found yet, from the tar's start
    if found:
        yield _with_bytes(rows, found)
    for member, indexes in wanted.items():
        for i in indexes:
            failed[i] = (
                f"{damage.reason}: {url}: {damage.detail}; member {members[i]} not reached"
                if damage
                else f"missing: {url}: no member {members[i]} in the tar"
            )
    if failed:
        indexes = sorted(failed)
        table = rows.take(indexes)
        table = table.set_column(
            table.column_names.index("error"), "error", pa.array([failed[i] for i in indexes], pa.string())
        )
        yield table.append_column(INLINE_AUDIO, pa.nulls(len(indexes), pa.binary()))


def member_stem(name: str) -> str:
    """A tar member's or manifest entry's file name less its extension (NeMo's key: os.path.splitext(basename))."""
    return posixpath.splitext(posixpath.basename(name))[0]


def _with_bytes(rows: pa.Table, found: list[tuple[int, bytes]]) -> pa.Table:
    table = rows.take(pa.array([i for i, _ in found], pa.int64()))
    return table.append_column(INLINE_AUDIO, pa.array([data for _, data in found], pa.binary()))
