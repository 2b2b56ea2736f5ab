"""Long recordings cut into utterance-sized segments where Silero VAD hears pauses (s2t_model.vad), streaming.

Segments are the VAD's speech regions under the package's own rules (`get_speech_timestamps_from_probs`): a pause of
`SEGMENT_VAD.min_silence_duration_ms` ends a region, `speech_pad_ms` of it stays on each side, and a region longer
than `max_segment_s` is cut in its longest pause (or at the limit where it has none). Non-speech (noise, tones,
music, silence) gives no segment at all.

Why every clear pause, not only as often as `max_segment_s` needs: models trained on single utterances (the demo
model: one clip of 1-3 numbers) do much worse on several at once. Why 300 ms: pauses inside the demo utterances
last up to 0.25 s. Why 150 ms of pad: with 300 ms the demo model hears the neighbouring pause as a word more often.

Why Silero's pauses and not frame energies: a hand-written energy segmenter, compared on the same recordings, did
as well or worse on every one and took noise for speech (docs/decisions/2026-11-30-vad-segmenter.md).

Streaming: `segment_stream` takes the audio in blocks; the VAD's state carries from block to block, and what is held
is one block and one probability per 32 ms (450 kB an hour). Segments come once the last block is in.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import numpy as np
import soxr

from .vad import SAMPLE_RATE, ProbabilityStream, SileroVAD, VadOptions, detector_input, regions_from_probs, shared_vad

MAX_SEGMENT_S = 20.0
SEGMENT_VAD = VadOptions(min_silence_duration_ms=300, speech_pad_ms=150)
LEVEL_CHUNK = 30 * SAMPLE_RATE  # samples the detector's input level is set for at a time
MIN_MAX_SEGMENT_S = 1.0  # max_segment_s below this leaves no room for speech between the pads


@dataclasses.dataclass(frozen=True)
class Segment:
    """Samples [start, end) of the recording, and the same in seconds."""

    start: int
    end: int
    start_s: float
    end_s: float

    @classmethod
    def from_samples(cls, start: int, end: int, sampling_rate: int) -> Segment:
        return cls(start, end, start / sampling_rate, end / sampling_rate)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def find_segments(
    audio: np.ndarray, sampling_rate: int, max_segment_s: float = MAX_SEGMENT_S, vad: SileroVAD | None = None
) -> list[Segment]:
    """A whole recording (N,) or (N, channels), float or int16 -> its segments, in order."""
    return list(segment_stream([audio], sampling_rate, max_segment_s, vad))


def segment_stream(
    blocks: Iterable[np.ndarray], sampling_rate: int, max_segment_s: float = MAX_SEGMENT_S, vad: SileroVAD | None = None
) -> Iterator[Segment]:
    """Consecutive blocks of one recording (any sizes, e.g. `soundfile.SoundFile.blocks`) -> its segments; memory
    stays bounded whatever the recording's length."""
    if not sampling_rate or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive number of Hz, got {sampling_rate!r}")
    if max_segment_s < MIN_MAX_SEGMENT_S:
        raise ValueError(f"max_segment_s must be at least {MIN_MAX_SEGMENT_S} s, got {max_segment_s}")
    probs = ProbabilityStream(vad or shared_vad())
    resampler = (
        None if sampling_rate == SAMPLE_RATE else soxr.ResampleStream(sampling_rate, SAMPLE_RATE, 1, dtype="float32")
    )
    # The detector hears each LEVEL_CHUNK of the recording at its level (`detector_input`): chunks on a fixed grid,
    # so that how the blocks come does not change the segments, and a whole-recording level is not needed first.
    pending: list[np.ndarray] = []
    held = num_samples = 0

    def push_chunks(samples: np.ndarray, last: bool = False) -> None:
        nonlocal pending, held
        pending.append(samples)
        held += len(samples)
        if held < LEVEL_CHUNK and not last:
            return
        data = np.concatenate(pending)
        whole = len(data) if last else len(data) // LEVEL_CHUNK * LEVEL_CHUNK
        for start in range(0, whole, LEVEL_CHUNK):
            probs.push(detector_input(data[start : min(start + LEVEL_CHUNK, whole)]))
        pending, held = [data[whole:]], len(data) - whole

    for block in blocks:
        mono = to_mono_float32(block)
        num_samples += len(mono)
        push_chunks(mono if resampler is None else resampler.resample_chunk(mono))
    push_chunks(
        np.zeros(0, np.float32) if resampler is None else resampler.resample_chunk(np.zeros(0, np.float32), last=True),
        last=True,
    )
    regions = regions_from_probs(probs.finish(), probs.num_samples, SEGMENT_VAD, max_speech_duration_s=max_segment_s)
    for region in regions:
        start, end = round(region.start_s * sampling_rate), min(num_samples, round(region.end_s * sampling_rate))
        yield Segment.from_samples(start, end, sampling_rate)


def to_mono_float32(block: np.ndarray) -> np.ndarray:
    """(N,) or (N, channels), float or int16 -> (N,) float32; channels averaged (as pipeline.audio does)."""
    block = np.asarray(block)
    if block.dtype == np.int16:
        block = block.astype(np.float32) / 32768.0
    elif not np.issubdtype(block.dtype, np.floating):
        raise ValueError(f"expected float or int16 samples, got dtype {block.dtype}")
    if block.ndim == 2:
        # Column by column, not mean(axis=1): a reduction along the short interleaved axis is several times slower.
        mono = block[:, 0].astype(np.float32)  # a copy
        for channel in range(1, block.shape[1]):
            mono += block[:, channel]
        block = mono / np.float32(block.shape[1]) if block.shape[1] > 1 else mono
    elif block.ndim != 1:
        raise ValueError(f"expected (samples,) or (samples, channels) audio, got shape {block.shape}")
    return block.astype(np.float32, copy=False)
