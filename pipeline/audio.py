"""Reading one utterance's audio from any fsspec URL: a slice of a file, or a member of an uncompressed zip; or
from bytes a row carries itself (`audio_bytes`: a tar member, a Parquet cell), when `audio` only names where they
came from.

Every failure is an `AudioError` whose `reason` is one word (missing, empty, unreadable, corrupt, truncated,
too_short, too_long) and whose message names the file: the job records it on the row and goes on with the others.
"""

from __future__ import annotations

import io
import re

import fsspec
import numpy as np
import soundfile
import soxr

# fairseq S2T manifests point into uncompressed zips: `archive.zip:byte_offset:byte_length`.
ZIP_MEMBER = re.compile(r"^(?P<path>.+\.zip):(?P<offset>\d+):(?P<length>\d+)$")


DATA_CHUNK_LOG = re.compile(r"^data\s*:\s*(?P<claimed>\d+) \(should be (?P<there>\d+)\)", re.MULTILINE)
ROUNDING_S = 0.1  # how far past the end of a file a manifest's offset + duration may reach
WHOLE_FILE_BYTES = 16 << 20  # remote files up to this size are fetched whole (larger: streamed, slices read alone)
# Reads at once per audio actor and per long-form split task: a feature batch's reads all in flight while the actor
# computes another batch's features (behind s2t bench io's 100 ms proxy, 16 reads at once kept 82 rows/s coming, 32
# kept 107).
IO_CONCURRENCY = 32
ONE_GET_MAX_S = 300.0  # a row of up to this long from offset 0 is first asked for with one GET of WHOLE_FILE_BYTES
# A row's own encoded audio file (WebDataset and NeMo tar members, Hugging Face datasets' Audio bytes): read from it,
# not from `audio`; dropped once the features are computed, never written to the output.
INLINE_AUDIO = "audio_bytes"


class AudioError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


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

    Only the slice is decoded when the format can seek (wav, flac, ogg); channels are averaged; other rates are
    resampled with soxr. The length is checked from the header before anything is decoded.
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
    """`load_audio` for an open binary file (an upload, say); `name` is how errors refer to it."""
    try:
        sound = soundfile.SoundFile(f)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        detail = getattr(error, "error_string", error)
        raise AudioError("unreadable", f"{name}: not audio that libsndfile can read ({detail})") from None
    with sound:
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
        rate = sound.samplerate
    # libsndfile stops quietly at a corrupt or cut-off block: fewer samples than the header promised.
    if frames is not None and len(samples) < frames:
        raise AudioError("truncated", f"{name}: decoded {len(samples)} of {frames} samples, the file is cut short")
    _check_duration(name, len(samples) / rate, min_duration_s, max_duration_s)
    # Float formats can hold NaN or Inf, which no feature or score survives (and JSON cannot carry).
    if not np.isfinite(samples).all():
        raise AudioError("corrupt", f"{name}: non-finite samples (NaN or Inf)")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate).astype(np.float32)
    return np.ascontiguousarray(mono)


def slice_frames(sound: soundfile.SoundFile, name: str, offset_s: float, duration_s: float | None
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
        raise AudioError("truncated", f"{name}: the header promises {promised / rate:.2f} s, the file holds "
                                      f"{sound.frames / rate:.2f} s")
    if start > 0 and start >= sound.frames:
        raise AudioError("bad_manifest_line", f"{name}: offset {offset_s:.6g} s is past the end of the file "
                                              f"({sound.frames / rate:.2f} s)")
    available = sound.frames - start
    if frames is not None and frames - available > ROUNDING_S * rate:
        raise AudioError("truncated", f"{name}: the manifest asks for {frames / rate:.2f} s from {offset_s:.6g} s, "
                                      f"the file has {available / rate:.2f} s there")
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


def open_audio(uri: str, storage_options: dict | None, data: bytes | None = None, connections: int = 1,
               one_get: bool = False) -> io.BufferedIOBase:
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
    except FileNotFoundError:
        raise AudioError("missing", f"{path}: no such file") from None
    except OSError as error:
        raise AudioError("missing", f"{path}: cannot be opened ({error})") from None
    if member:
        offset, length = int(member["offset"]), int(member["length"])
        if offset + length > size:
            raise AudioError("truncated", f"{uri}: the byte range ends past the archive's {size} bytes")
        size = length
        data = fs.cat_file(fs_path, start=offset, end=offset + length)
        f = io.BytesIO(data)
    if size == 0:
        f.close()
        raise AudioError("empty", f"{uri}: the file has zero bytes")
    if not member and size <= WHOLE_FILE_BYTES and "file" not in fs.protocol:
        # A small file on an object store: one GET, decoded from memory. libsndfile reading the remote file itself
        # calls back into Python for each small read, and threads doing so hardly overlap (behind s2t bench io's proxy,
        # 50 ms a request, 16 threads: 8 files/s that way, 42 fetched first).
        with f:
            return io.BytesIO(f.read())
    return f


def first_bytes(fs, path: str) -> bytes | None:
    """The whole file in one ranged GET (no HEAD first: on an object store each request is a round trip of 30-100
    ms), or None when it is larger than WHOLE_FILE_BYTES or the store refused the range (an empty object can: the
    HEAD that follows then says what is wrong). FileNotFoundError passes: a missing file is missing either way."""
    try:
        head = fs.cat_file(path, start=0, end=WHOLE_FILE_BYTES)
    except FileNotFoundError:
        raise
    except OSError:
        return None
    return head if len(head) < WHOLE_FILE_BYTES else None


def filesystem(path: str, storage_options: dict | None, connections: int = 1):
    """(filesystem, path) for `path`, its client able to keep `connections` requests in flight: s3fs (aiobotocore)
    keeps 10 connections by default, and the 11th read at once would wait for one."""
    options = dict(storage_options or {})
    if fsspec.core.split_protocol(path)[0] in ("s3", "s3a") and connections > 10:
        options["config_kwargs"] = {"max_pool_connections": connections, **options.get("config_kwargs", {})}
    return fsspec.core.url_to_fs(path, **options)
