"""Reading one utterance's audio from any fsspec URL: a slice of a file, or a member of an uncompressed zip; or
from bytes a row carries itself (`audio_bytes`: a tar member, a Parquet cell), when `audio` only names where they
came from.

Two decoders, chosen by what the file is (libsndfile recognises it by its content, never by its name), as measured
by `s2t bench decode` (docs/audio-formats.md): libsndfile for what it reads right and fastest (WAV, FLAC, AIFF,
Ogg Vorbis, ...: the samples the job always had); PyAV (FFmpeg's libraries) for MP3 (libsndfile takes the length
from the first frame when there is no Xing/Info header, and counts cover art as audio), Opus (PyAV decodes it
faster) and everything libsndfile does not recognise: m4a/AAC, mp4/mov/mkv audio tracks, webm, AMR, WMA, ...

Every failure is an `AudioError` whose `reason` is a `Reason` (missing, empty, unreadable, corrupt, truncated,
too_short, too_long; unavailable when the store failed, which is retryable) and whose message names the file: the
job records it on the row and goes on with the others.
"""

from __future__ import annotations

import io
import itertools
import re
from typing import Iterator

import av
import fsspec
import numpy as np
import soundfile
import soxr

from . import storage  # noqa: F401 (sets the S3 client's tries in every process that reads audio)
from .reasons import Reason, is_transient

# fairseq S2T manifests point into uncompressed zips: `archive.zip:byte_offset:byte_length`.
ZIP_MEMBER = re.compile(r"^(?P<path>.+\.zip):(?P<offset>\d+):(?P<length>\d+)$")


DATA_CHUNK_LOG = re.compile(r"^data\s*:\s*(?P<claimed>\d+) \(should be (?P<there>\d+)\)", re.MULTILINE)
ROUNDING_S = 0.1  # how far past the end of a file a manifest's offset + duration may reach
WHOLE_FILE_BYTES = 16 << 20  # remote files up to this size are fetched whole (larger: streamed, slices read alone)
# Reads at once per audio actor and per long-form split task: a feature batch's reads all in flight while the actor
# computes another batch's features, so that the store's latency hides behind that work (rows/s by concurrency:
# docs/benchmarks.md, `s2t bench io`; why 32: docs/decisions/2026-12-01-object-store-reads.md).
IO_CONCURRENCY = 32
ONE_GET_MAX_S = 300.0  # a row of up to this long from offset 0 is first asked for with one GET of WHOLE_FILE_BYTES
# A row's own encoded audio file (WebDataset and NeMo tar members, Hugging Face datasets' Audio bytes): read from it,
# not from `audio`; dropped once the features are computed, never written to the output.
INLINE_AUDIO = "audio_bytes"


# What libsndfile recognises but PyAV decodes (see the module's docstring): by libsndfile's format, and subtype.
PYAV_FORMATS = frozenset({"MPEG"})
PYAV_SUBTYPES = frozenset({"OPUS", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III"})
# FFmpeg demuxers whose seeks land on a timestamped packet at or before the target (an index, cues, granule
# positions). Elsewhere (mp3 above all: without a TOC a seek guesses the byte from the bit rate and the timestamps
# after it are guesses too) a slice is decoded from the start and its samples counted.
SEEKS_EXACTLY = frozenset({"mov", "mp4", "matroska", "webm", "ogg", "asf", "flac", "wav"})
PREROLL_S = 0.5  # decoded and dropped before a slice found by seeking


class AudioError(Exception):
    def __init__(self, reason: str, message: str):
        self.reason = Reason(reason)
        super().__init__(f"{self.reason}: {message}")


def load_audio(
    uri: str,
    sampling_rate: int,
    offset_s: float = 0.0,
    duration_s: float | None = None,
    min_duration_s: float = 0.0,
    max_duration_s: float = float("inf"),
    storage_options: dict | None = None,
    data: bytes | None = None,
    connections: int = 1,
) -> np.ndarray:
    """Mono float32 samples at `sampling_rate` of [offset_s, offset_s + duration_s) of `uri` (to the end if None),
    or of `data`, the file's bytes when the row carries them (`uri` then only names them in errors).
    connections: how many reads this process makes at once (its object-store client keeps as many connections).

    Only the slice is decoded where the format can seek (wav, flac, ogg; through PyAV also mp4/mov, mkv/webm); channels
    are averaged; other rates are resampled with soxr. Through libsndfile the length is checked from the header before
    anything is decoded; through PyAV, from what is decoded, as it is decoded.
    """
    # An utterance from its start: most likely a file of its own, small enough to fetch whole in one request.
    one_get = not offset_s and (duration_s is None or duration_s <= ONE_GET_MAX_S)
    with open_audio(uri, storage_options, data, connections, one_get) as f:
        return decode_audio(f, uri, sampling_rate, offset_s, duration_s, min_duration_s, max_duration_s)


def decode_audio(
    f,
    name: str,
    sampling_rate: int,
    offset_s: float = 0.0,
    duration_s: float | None = None,
    min_duration_s: float = 0.0,
    max_duration_s: float = float("inf"),
) -> np.ndarray:
    """`load_audio` for an open, seekable binary file (an upload, say); `name` is how errors refer to it."""
    sound, detail = open_libsndfile(f)
    if sound is None or prefers_pyav(sound):
        if sound is not None:
            sound.close()
        f.seek(0)
        with PyAVAudio(f, name, detail) as source:
            mono = source.read(offset_s, duration_s, max_duration_s)
            rate = source.rate
        _check_duration(name, len(mono) / rate, min_duration_s, max_duration_s)
    else:
        with sound:
            samples, rate = read_libsndfile(sound, name, offset_s, duration_s, min_duration_s, max_duration_s)
        mono = to_mono(samples)
    # Float formats can hold NaN or Inf, which no feature or score survives (and JSON cannot carry).
    if not np.isfinite(mono).all():
        raise AudioError("corrupt", f"{name}: non-finite samples (NaN or Inf)")
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate).astype(np.float32)
    return np.ascontiguousarray(mono)


def open_libsndfile(f) -> tuple[soundfile.SoundFile | None, str | None]:
    """(the file opened by libsndfile, None) or (None, why libsndfile cannot read it)."""
    try:
        return soundfile.SoundFile(f), None
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        return None, str(getattr(error, "error_string", error))


def prefers_pyav(sound: soundfile.SoundFile) -> bool:
    """Whether a file libsndfile opened is decoded by PyAV instead (see the module's docstring)."""
    return sound.format in PYAV_FORMATS or sound.subtype in PYAV_SUBTYPES


def read_libsndfile(
    sound: soundfile.SoundFile,
    name: str,
    offset_s: float,
    duration_s: float | None,
    min_duration_s: float,
    max_duration_s: float,
) -> tuple[np.ndarray, int]:
    """(samples (N, channels) float32, rate) of the slice; the length is checked from the header first."""
    start, frames = slice_frames(sound, name, offset_s, duration_s)
    if frames is not None:
        _check_duration(name, frames / sound.samplerate, min_duration_s, max_duration_s)
    try:
        if start:
            sound.seek(start)
        samples = sound.read(frames if frames is not None else -1, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        detail = getattr(error, "error_string", error)
        raise AudioError("corrupt", f"{name}: decoding stopped ({detail}): the file is damaged or cut short") from None
    # libsndfile stops quietly at a corrupt or cut-off block: fewer samples than the header promised.
    if frames is not None and len(samples) < frames:
        raise AudioError("truncated", f"{name}: decoded {len(samples)} of {frames} samples, the file is cut short")
    _check_duration(name, len(samples) / sound.samplerate, min_duration_s, max_duration_s)
    return samples, sound.samplerate


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(N, channels) -> (N,) float32, channels averaged: the same numbers as `samples.mean(axis=1)`, column by column
    (a reduction along the short interleaved axis is several times slower: docs/audio-formats.md, bench decode)."""
    if samples.shape[1] == 1:
        return samples[:, 0]
    mono = samples[:, 0].copy()
    for channel in range(1, samples.shape[1]):
        mono += samples[:, channel]
    mono /= samples.shape[1]
    return mono


class PyAVAudio:
    """The first audio stream of a file through PyAV (FFmpeg): mono float32 at the stream's own rate, read whole
    (`read`) or in blocks (`blocks`), a slice found by seeking where the container seeks exactly and decoded from its
    first sample on. Lengths are what was decoded, never what a header says."""

    def __init__(self, f, name: str, libsndfile_says: str | None = None):
        self.name = name
        try:
            self.container = av.open(f, "r", metadata_errors="ignore")
        except (av.error.FFmpegError, ValueError, OSError) as error:
            also = f"; libsndfile: {libsndfile_says}" if libsndfile_says else ""
            raise AudioError(
                "unreadable", f"{name}: not audio that libsndfile or FFmpeg can read ({error}{also})"
            ) from None
        if not self.container.streams.audio:
            self.container.close()
            raise AudioError("unreadable", f"{name}: no audio stream in this {self.container.format.name} file")
        self.stream = self.container.streams.audio[0]
        self.stream.thread_type = "AUTO"
        self.rate = self.stream.codec_context.sample_rate or self.stream.rate
        self.first_s: float | None = None  # the time of the stream's sample 0
        self.started = False

    def __enter__(self) -> "PyAVAudio":
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()

    @property
    def indexed_length_s(self) -> float | None:
        """The length an exact index states (mp4/mov: the sample tables), else None. Used only to pass a row on
        unread; the length a row gets is what was decoded."""
        if "mov" in self.container.format.name.split(",") and self.stream.duration:
            return float(self.stream.duration * self.stream.time_base)
        return None

    def read(self, offset_s: float = 0.0, duration_s: float | None = None, max_s: float = float("inf")) -> np.ndarray:
        """[offset_s, offset_s + duration_s) of the stream (to its end if None) as one array."""
        blocks = list(self.blocks(offset_s, duration_s, max_s=max_s))
        return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)

    def blocks(
        self,
        offset_s: float = 0.0,
        duration_s: float | None = None,
        block_samples: int = 0,
        max_s: float = float("inf"),
    ) -> Iterator[np.ndarray]:
        """The slice's samples in blocks of at least `block_samples` (0: as decoded), the last one shorter. Raises
        truncated when the stream ends more than ROUNDING_S before the slice, bad_manifest_line when it ends before
        `offset_s`, too_long when more than `max_s` seconds are decoded (memory stays bounded)."""
        rate, name = self.rate, self.name
        start = round(offset_s * rate)
        wanted = None if duration_s is None else round(duration_s * rate)
        pending, held, got = [], 0, 0
        for position, mono in self._decoded_from(offset_s):
            mono = mono[max(0, start - position) :]  # samples before the slice's first
            if wanted is not None:
                mono = mono[: wanted - got]
            if not len(mono):
                if wanted is not None and got >= wanted:
                    break
                continue
            got += len(mono)
            if got > max_s * rate:
                raise AudioError("too_long", f"{name}: more than {max_s} s of audio, the maximum")
            pending.append(mono)
            held += len(mono)
            if held >= block_samples:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, held = [], 0
        if pending:
            yield np.concatenate(pending)
        if not got and start > 0:
            raise AudioError("bad_manifest_line", f"{name}: offset {offset_s:.6g} s is past the end of the file")
        if wanted is not None and wanted - got > ROUNDING_S * rate:
            raise AudioError(
                "truncated",
                f"{name}: the manifest asks for {wanted / rate:.2f} s from {offset_s:.6g} s, "
                f"the file has {got / rate:.2f} s there",
            )
        promised = self.indexed_length_s
        if not offset_s and duration_s is None and promised and promised - got / rate > ROUNDING_S:
            raise AudioError(
                "truncated", f"{name}: the index promises {promised:.2f} s, the file holds {got / rate:.2f} s"
            )

    def _decoded_from(self, offset_s: float) -> Iterator[tuple[int, np.ndarray]]:
        """(the first sample's position in the stream, mono samples) per decoded frame, from at or before offset_s."""
        if self.started:  # read before: from the start again
            self.container.seek(0)
        self.started = True
        frames = self._frames()
        first, second = next(frames, None), next(frames, None)
        if first is None:
            return
        self.rate = first.sample_rate or self.rate
        # The time of sample 0 from the second frame: a decoder that drops the first frame's leading samples (Opus
        # pre-skip, AAC priming) leaves that frame's timestamp where the dropped samples began.
        self.first_s = (
            None
            if first.time is None
            else float(first.time)
            if second is None or second.time is None
            else float(second.time) - first.samples / self.rate
        )
        # From the start: positions are counted samples.
        position, frames = 0, itertools.chain([first], [second] if second is not None else [], frames)
        if offset_s > 0 and self.first_s is not None and SEEKS_EXACTLY & set(self.container.format.name.split(",")):
            position, frames = self._seek(offset_s)
        for frame in frames:
            mono = self._mono(frame)
            yield position, mono
            position += len(mono)

    def _seek(self, offset_s: float) -> tuple[int, Iterator]:
        """(position of the first frame after a seek to offset_s, the frames from it); from the start again where
        the seek did not land on a timestamped frame at or before offset_s."""
        # Some of what precedes the slice is decoded and dropped: a decoder's first frame after a seek lacks the
        # overlap of the frame before (AAC, Vorbis) or its pre-roll (Opus: 80 ms).
        target = max(0.0, offset_s - PREROLL_S)
        try:
            self.container.seek(int((target + self.first_s) / self.stream.time_base), stream=self.stream)
        except av.error.FFmpegError:
            pass
        else:
            frames = self._frames()
            frame = next(frames, None)
            if frame is not None and frame.time is not None:
                position = round((float(frame.time) - self.first_s) * self.rate)
                if position <= round(target * self.rate):
                    return position, itertools.chain([frame], frames)
        self.container.seek(0)
        return 0, self._frames()

    def _frames(self) -> Iterator:
        try:
            for packet in self.container.demux(self.stream):
                yield from packet.decode()
        except av.error.FFmpegError as error:
            raise AudioError(
                "corrupt", f"{self.name}: decoding stopped ({error}): the file is damaged or cut short"
            ) from None

    def _mono(self, frame) -> np.ndarray:
        """One decoded frame -> (samples,) float32 at self.rate."""
        samples = frame.to_ndarray()
        channels = len(frame.layout.channels)
        if not frame.format.is_planar:
            samples = samples.reshape(-1, channels).T
        scale = INTEGER_SCALE.get(samples.dtype.str[1:])
        if samples.dtype == np.uint8:
            samples = (samples.astype(np.float32) - 128.0) / 128.0
        elif scale is not None:
            samples = samples.astype(np.float32) / np.float32(scale)
        else:
            samples = samples.astype(np.float32, copy=False)
        mono = to_mono(samples.T)
        if frame.sample_rate != self.rate:  # a stream whose rate changes midway: at its first rate
            mono = soxr.resample(mono, frame.sample_rate, self.rate).astype(np.float32)
        return np.ascontiguousarray(mono)


INTEGER_SCALE = {"i2": 2.0**15, "i4": 2.0**31, "i8": 2.0**63}


def slice_frames(
    sound: soundfile.SoundFile, name: str, offset_s: float, duration_s: float | None
) -> tuple[int, int | None]:
    """(first frame, frame count) of [offset_s, offset_s + duration_s) of an open file, the count None when neither
    the manifest nor the file knows it. The one rule for audio that is not there: an offset at or past the end is
    the manifest's mistake (bad_manifest_line); a slice reaching more than ROUNDING_S past the end is truncated."""
    rate = sound.samplerate
    start = round(offset_s * rate)
    frames = round(duration_s * rate) if duration_s is not None else None
    if sound.frames <= 0:  # some formats do not know their length
        return start, frames
    promised = header_frames(sound)
    if promised - sound.frames > ROUNDING_S * rate:
        raise AudioError(
            "truncated",
            f"{name}: the header promises {promised / rate:.2f} s, the file holds {sound.frames / rate:.2f} s",
        )
    if start > 0 and start >= sound.frames:
        raise AudioError(
            "bad_manifest_line",
            f"{name}: offset {offset_s:.6g} s is past the end of the file ({sound.frames / rate:.2f} s)",
        )
    available = sound.frames - start
    if frames is not None and frames - available > ROUNDING_S * rate:
        raise AudioError(
            "truncated",
            f"{name}: the manifest asks for {frames / rate:.2f} s from {offset_s:.6g} s, "
            f"the file has {available / rate:.2f} s there",
        )
    # Manifests round durations: a slice that overshoots the end by a little is read to the end.
    return start, available if frames is None else min(frames, available)


def header_frames(sound: soundfile.SoundFile) -> int:
    """The frames the file's header promises. libsndfile trims a WAV data chunk that runs past the end of the file
    to what is there, and says so only in its log (`data : <header's bytes> (should be <bytes there>)`)."""
    claimed = DATA_CHUNK_LOG.search(sound.extra_info)
    if claimed is None or sound.format not in ("WAV", "WAVEX", "RF64"):
        return sound.frames
    there = int(claimed["there"])
    return round(sound.frames * int(claimed["claimed"]) / there) if there else sound.frames


def _check_duration(uri: str, seconds: float, min_s: float, max_s: float) -> None:
    if seconds < min_s:
        raise AudioError("too_short", f"{uri}: {seconds:.3f} s of audio, less than the minimum {min_s} s")
    if seconds > max_s:
        raise AudioError("too_long", f"{uri}: {seconds:.1f} s of audio, more than the maximum {max_s} s")


def is_remote(uri: str | None) -> bool:
    """Whether reading `uri` waits on a network (any URL but file://)."""
    return uri is not None and "://" in uri and not uri.startswith("file://")


def open_audio(
    uri: str, storage_options: dict | None, data: bytes | None = None, connections: int = 1, one_get: bool = False
) -> io.BufferedIOBase:
    """A seekable binary file for the audio: `data` when given, else `uri`'s file streamed, zip members read as
    their byte range. one_get: the file is most likely small (an utterance of its own): on an object store, ask for
    it with one ranged GET before anything else."""
    if data is not None:
        if not data:
            raise AudioError("empty", f"{uri}: zero bytes of audio")
        return io.BytesIO(data)
    member = ZIP_MEMBER.match(uri)
    path = member["path"] if member else uri
    try:
        fs, fs_path = filesystem(path, storage_options, connections)
        if one_get and not member and is_remote(path):
            whole = first_bytes(fs, fs_path)
            if whole is not None:
                if not whole:
                    raise AudioError("empty", f"{uri}: the file has zero bytes")
                return io.BytesIO(whole)
        # Opening learns the size (one HEAD on object stores): no separate size request, a round trip saved.
        f = None if member else fs.open(fs_path, "rb")
        size = fs.size(fs_path) if member else getattr(f, "size", None)
        size = fs.size(fs_path) if size is None else size
        if member:
            offset, length = int(member["offset"]), int(member["length"])
            if offset + length > size:
                raise AudioError("truncated", f"{uri}: the byte range ends past the archive's {size} bytes")
            size = length
            f = io.BytesIO(fs.cat_file(fs_path, start=offset, end=offset + length))
        if size == 0:
            f.close()
            raise AudioError("empty", f"{uri}: the file has zero bytes")
        if not member and size <= WHOLE_FILE_BYTES and "file" not in fs.protocol:
            # A small file on an object store: one GET, decoded from memory. libsndfile reading the remote file
            # itself calls back into Python for each small read, and threads doing so hardly overlap
            # (docs/decisions/2026-12-01-object-store-reads.md).
            with f:
                return io.BytesIO(f.read())
        return f
    except AudioError:
        raise
    except Exception as error:
        raise storage_error(path, error) from None


def storage_error(path: str, error: Exception) -> "AudioError":
    """The AudioError of a failed read of `path`: `missing` for no such file (404), `unavailable` for a failure of
    the store or the network (5xx, throttling, resets, incomplete bodies, timeouts: retryable), else `unreadable`."""
    if isinstance(error, FileNotFoundError):
        return AudioError("missing", f"{path}: no such file")
    if is_transient(error):
        return AudioError(
            "unavailable", f"{path}: the store failed after its retries ({type(error).__name__}: {error})"
        )
    return AudioError("unreadable", f"{path}: cannot be read ({type(error).__name__}: {error})")


def as_audio_error(uri: str, error: Exception) -> AudioError:
    """Any failure of a row's read as its AudioError (a codec's or a file system's exception: `storage_error`'s
    reasons for a file system's, else unreadable)."""
    if isinstance(error, AudioError):
        return error
    if isinstance(error, FileNotFoundError) or is_transient(error):
        return storage_error(uri, error)
    return AudioError("unreadable", f"{uri}: {type(error).__name__}: {error}")


def store_failed(error: Exception) -> bool:
    """Whether a row's read failed for the store's sake (worth reading again: `storage.RowRetry`)."""
    return as_audio_error("", error).reason is Reason.UNAVAILABLE


def first_bytes(fs, path: str) -> bytes | None:
    """The whole file in one ranged GET (no HEAD first: on an object store each request is a round trip of 30-100
        ms), or None when it is larger than WHOLE_FILE_BYTES or the store refused the range (an empty object can: the
        HEAD that follows then says what is wrong). FileNotFoundError and the store's failures pass: a missing file is
    missing either way, and the client has spent its retries."""
    try:
        head = fs.cat_file(path, start=0, end=WHOLE_FILE_BYTES)
    except FileNotFoundError:
        raise
    except OSError as error:
        if is_transient(error):
            raise
        return None
    return head if len(head) < WHOLE_FILE_BYTES else None


def filesystem(path: str, storage_options: dict | None, connections: int = 1):
    """(filesystem, path) for `path`, its client able to keep `connections` requests in flight: s3fs (aiobotocore)
    keeps 10 connections by default, and the 11th read at once would wait for one."""
    options = dict(storage_options or {})
    if fsspec.core.split_protocol(path)[0] in ("s3", "s3a") and connections > 10:
        options["config_kwargs"] = {"max_pool_connections": connections, **options.get("config_kwargs", {})}
    return fsspec.core.url_to_fs(path, **options)
