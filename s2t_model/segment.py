"""Long recordings cut into utterance-sized segments at pauses, from frame energies alone (numpy, no model).

Frames of 25 ms every 10 ms give a log energy in dB. Each decision looks at the frames around it (`CONTEXT_S`
before, `max_segment_s` and about 2 s after) and finds the level of the pauses there: Otsu's threshold splits the
frames into loud and soft, the soft runs of at least `FLOOR_PAUSE_S` are pauses, and their median is the floor. A
frame is loud from the floor plus `margin_db` (or plus the pauses' own spread, for uneven noise) up, so loudness
and noise floor do not matter. Gaps shorter than `min_pause_s` count as loud, loud runs shorter than `MIN_SPEECH_S`
next to `BURST_QUIET_S` of quiet as quiet (a burst of noise in a pause). A stretch without `MIN_CONTRAST_DB` of
contrast (a tone, steady noise, silence) has no pauses: all speech if louder than `UNIFORM_SPEECH_DB`, else silence.

Quiet next to speech that does not sound like the pauses (off their level by more than their spread) is the
utterance's own silence, up to `OWN_SILENCE_S`: a clip recorded elsewhere and joined in, as in the bundled
long-form recordings. It stays with its speech, and the segment ends at the step into the pauses' noise; elsewhere
`pad_s` of the pause is kept next to the speech. The demo model, trained on such clips, hears a step of
background noise as a word: 0.1 s of the pauses' noise before each true utterance takes its WER on the first
bundled recording from 0.4% to 3.8%.

Segments are made one after another, each from the first speech after the previous one:

- a quiet run of at least `split_pause_s` that sounds like the pauses ends the segment once it holds
  `min_segment_s` (a shorter start runs on into the next speech: merged, never dropped); the rest of the pause
  goes to neither segment, so long silence is trimmed, at the start and end of the recording too;
- a segment that reaches `max_segment_s` without such a pause is cut in its longest shorter pause (at least
  `min_pause_s`; the later one of equals), or at exactly `max_segment_s` where it has no pause at all;
- at the end of the recording, speech after the last pause that is shorter than `min_segment_s` joins the segment
  before it if that one has room.

Why split at every clear pause, not only as often as `max_segment_s` needs: models trained on single utterances
(the demo model: one clip of 1-3 numbers) do much worse on several at once. On the bundled long-form recordings,
the true utterances grouped into segments of up to 20 s give 45% and 38% WER against 0.4% and 4% one by one; up to
8 s still 6% and 8%. `split_pause_s=math.inf` cuts only where `max_segment_s` needs it.

Streaming: `segment_stream` takes the audio in blocks and yields segments as it goes, holding about `CONTEXT_S +
max_segment_s` + 2 s of frame energies (100 floats a second) and one block of samples; `split_stream` yields each
segment's samples too. Each decision reads a fixed span of frames from the current position, never more, so the
segments do not depend on how the audio was cut into blocks: `find_segments` is the stream of one block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator

import numpy as np

FRAME_MS = 25.0
SHIFT_MS = 10.0
POWER_FLOOR = 1e-10  # -100 dB: digital silence stays finite
MAX_SEGMENT_S = 20.0
SPLIT_PAUSE_S = 0.3  # a pause this long ends a segment (pauses within the demo utterances: up to 0.25 s)
MIN_PAUSE_S = 0.1  # shorter quiet runs are no pause (gaps between syllables)
MIN_SPEECH_S = 0.1  # shorter loud runs next to BURST_QUIET_S of quiet are no speech (bursts of noise) ...
BURST_QUIET_S = 0.3  # ... on either side
PAD_S = 0.15  # silence kept before and after speech
MIN_SEGMENT_S = 1.0  # a pause splits only after this much of a segment
MARGIN_DB = 6.0  # loud: this far above the pauses' level
FLOOR_PERCENTILE = 5.0  # the floor where the context has no pause: this percentile of its frames
MIN_CONTRAST_DB = 12.0  # loudest frame to the floor: less than this, and the context has no pauses
UNIFORM_SPEECH_DB = -45.0  # dBFS: a context without contrast is speech above this level, silence below
FLOOR_PAUSE_S = 0.3  # quiet runs this long tell the level of the pauses
ROOM_DB = 2.0  # frames this close to the pauses' level (at least) sound like the pauses
SMOOTH_FRAMES = 5  # frames averaged to tell whether quiet sounds like the pauses
OWN_SILENCE_S = 0.5  # quiet that does not sound like the pauses goes with the speech next to it, up to this long
CONTEXT_S = 10.0  # seconds before the current position that the pauses' level is measured on too


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


def find_segments(audio: np.ndarray, sampling_rate: int, max_segment_s: float = MAX_SEGMENT_S,
                  **options) -> list[Segment]:
    """A whole recording (N,) or (N, channels), float or int16 -> its segments, in order.

    options: split_pause_s, min_pause_s, pad_s, min_segment_s, margin_db (see `Segmenter`)."""
    return list(segment_stream([audio], sampling_rate, max_segment_s, **options))


def segment_stream(blocks: Iterable[np.ndarray], sampling_rate: int, max_segment_s: float = MAX_SEGMENT_S,
                   **options) -> Iterator[Segment]:
    """Consecutive blocks of one recording (any sizes, e.g. `soundfile.SoundFile.blocks`) -> its segments, each
    yielded once the audio it depends on has arrived; memory stays bounded whatever the recording's length."""
    segmenter = Segmenter(sampling_rate, max_segment_s, **options)
    for block in blocks:
        yield from segmenter.push(block)
    yield from segmenter.finish()


def split_stream(blocks: Iterable[np.ndarray], sampling_rate: int, max_segment_s: float = MAX_SEGMENT_S,
                 **options) -> Iterator[tuple[Segment, np.ndarray]]:
    """As `segment_stream`, with each segment's samples (mono float32), keeping only the audio a coming segment
    may still need (at most about `max_segment_s` plus a block)."""
    segmenter = Segmenter(sampling_rate, max_segment_s, **options)
    audio = _AudioBuffer()
    for block in blocks:
        mono = to_mono_float32(block)
        audio.append(mono)
        for segment in segmenter.push(mono):
            yield segment, audio.take(segment.start, segment.end)
        audio.drop_before(segmenter.first_needed_sample)
    for segment in segmenter.finish():
        yield segment, audio.take(segment.start, segment.end)


def to_mono_float32(block: np.ndarray) -> np.ndarray:
    """(N,) or (N, channels), float or int16 -> (N,) float32; channels averaged (as pipeline.audio does)."""
    block = np.asarray(block)
    if block.dtype == np.int16:
        block = block.astype(np.float32) / 32768.0
    elif not np.issubdtype(block.dtype, np.floating):
        raise ValueError(f"expected float or int16 samples, got dtype {block.dtype}")
    if block.ndim == 2:
        block = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
    elif block.ndim != 1:
        raise ValueError(f"expected (samples,) or (samples, channels) audio, got shape {block.shape}")
    return block.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------- energies

def frame_energies(samples: np.ndarray, window: int, shift: int) -> np.ndarray:
    """(N,) float32 -> (T,) mean power in dB of frames [t * shift, t * shift + window), T = 1 + (N - window) // shift.

    Each frame's value depends on its own samples only, so blocks give the same values as the whole."""
    if len(samples) < window:
        return np.empty(0)
    frames = np.lib.stride_tricks.sliding_window_view(samples, window)[::shift]  # (T, W), a view
    power = np.einsum("tw,tw->t", frames, frames, dtype=np.float64) / window  # (T,)
    return 10.0 * np.log10(np.maximum(power, POWER_FLOOR))


def pause_levels(energies: np.ndarray, pause_frames: int, margin_db: float = MARGIN_DB) -> tuple[float, float, float]:
    """(floor, threshold, spread) in dB for a context of frame energies (T,): frames below the threshold are quiet,
    frames within `spread` of the floor sound like the pauses. Without contrast: threshold +inf (all silence) or
    -inf (all speech), floor -inf.

    The floor is the level of the pauses: Otsu's threshold splits the frames into loud and soft, and the soft runs
    of at least `pause_frames` are the pauses, their median energy the floor. Pauses, not the quietest frames: those
    may be an utterance's own silence, quieter than the room (an utterance recorded elsewhere and joined in). The
    threshold is the floor plus `margin_db`, or plus the pauses' own spread (twice their median absolute deviation,
    about the 90th percentile less the median) where their noise is that uneven (pink or brown noise)."""
    lowest = float(np.percentile(energies, FLOOR_PERCENTILE))
    if float(energies.max()) - lowest < MIN_CONTRAST_DB:
        return -math.inf, (-math.inf if float(np.median(energies)) > UNIFORM_SPEECH_DB else math.inf), 0.0
    starts, ends = true_runs(energies < otsu_threshold(energies))
    long = ends - starts >= pause_frames
    if not long.any():  # no pause: the quietest frames are the floor
        return lowest, lowest + margin_db, ROOM_DB
    pauses = np.concatenate([energies[a:b] for a, b in zip(starts[long], ends[long])])
    floor = float(np.median(pauses))
    spread = max(ROOM_DB, 2.0 * float(np.median(np.abs(pauses - floor))))  # ~ the 90th percentile, robust
    return floor, floor + max(margin_db, spread), spread


def otsu_threshold(energies: np.ndarray, bin_db: float = 1.0) -> float:
    """The level that splits `energies` into two classes of the largest between-class variance (in `bin_db` steps)."""
    counts, edges = np.histogram(energies, np.arange(np.floor(energies.min()), energies.max() + bin_db, bin_db))
    if len(counts) < 2:
        return float(edges[-1])
    sums = counts * (edges[:-1] + edges[1:]) / 2
    below, sum_below = np.cumsum(counts)[:-1], np.cumsum(sums)[:-1]  # (K - 1,): classes split at each inner edge
    above, sum_above = counts.sum() - below, sums.sum() - sum_below
    between = below * above * (sum_below / np.maximum(below, 1) - sum_above / np.maximum(above, 1)) ** 2
    return float(edges[1 + int(np.argmax(between))])


def speech_frames(energies: np.ndarray, levels: tuple[float, float, float], own_frames: int, min_gap_frames: int,
                  min_speech_frames: int, burst_quiet_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (T,) -> (loud, own, room), bool (T,) each.

    Loud: >= threshold, quiet runs shorter than `min_gap_frames` filled (gaps between syllables), loud runs shorter
    than `min_speech_frames` with `burst_quiet_frames` of quiet on a side dropped (bursts of noise in a pause).
    Room: quiet, and sounds like the pauses: a 50 ms average of the quiet frames within the spread of the floor.
    Own: quiet frames next to loud ones, up to the farthest that does not sound like the pauses within
    `own_frames`: an utterance's own silence, from a clip recorded elsewhere and joined in. Segments take it whole
    and are cut at the step into the pauses' noise, which a model trained on such clips takes for a word."""
    floor, threshold, spread = levels
    loud = ~drop_runs(energies < threshold, min_gap_frames)
    loud = drop_runs(loud, min_speech_frames, burst_quiet_frames)
    if not math.isfinite(floor) or len(energies) == 0:
        return loud, np.zeros_like(loud), ~loud
    quiet = (~loud).astype(np.float64)
    kernel = np.ones(SMOOTH_FRAMES)
    smooth = np.convolve(10.0 ** (energies / 10.0) * quiet, kernel, "same") / np.maximum(
        np.convolve(quiet, kernel, "same"), 1.0)  # mean power of the quiet frames around each frame
    room = ~loud & (np.abs(10.0 * np.log10(np.maximum(smooth, POWER_FLOOR)) - floor) <= spread)
    other = ~loud & ~room
    own = np.zeros_like(loud)
    for start, end in zip(*true_runs(~loud)):
        near = np.flatnonzero(other[start:min(end, start + own_frames)])
        if start > 0 and len(near):
            own[start:start + near[-1] + 1] = True
        near = np.flatnonzero(other[max(start, end - own_frames):end])
        if end < len(loud) and len(near):
            own[max(start, end - own_frames) + near[0]:end] = True
    return loud, own, room


def drop_runs(mask: np.ndarray, shorter_than: int, alone_for: int = 0) -> np.ndarray:
    """`mask` (T,) bool with its runs of True shorter than `shorter_than` and with `alone_for` frames of False on
    a side set to False."""
    starts, ends = true_runs(mask)
    before = starts - np.concatenate([[0], ends[:-1]])
    after = np.concatenate([starts[1:], [len(mask)]]) - ends
    drop = (ends - starts < shorter_than) & ((before >= alone_for) | (after >= alone_for))
    mask = mask.copy()
    for start, end in zip(starts[drop], ends[drop]):
        mask[start:end] = False
    return mask


def true_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends (exclusive) of the runs of True in a 1-D bool array."""
    edges = np.diff(mask.astype(np.int8), prepend=0, append=0)
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


# -------------------------------------------------------------------------------------------------- segmenter

class Segmenter:
    """Push-style segmentation of one recording: `push` blocks of samples, then `finish`; each returns the segments
    that became certain, in order.

    max_segment_s: no segment is longer. split_pause_s: a pause this long ends a segment (math.inf: only where
    max_segment_s needs a cut). min_pause_s: shorter quiet is no pause. pad_s: the pause's silence kept next to
    speech (none after an utterance's own silence). min_segment_s: a pause ends no segment shorter than this.
    margin_db: loud is this far above the pauses' level.

    Positions inside are frame boundaries: boundary b is sample b * shift + offset, the middle of the overlap of
    frames b - 1 and b."""

    def __init__(self, sampling_rate: int, max_segment_s: float = MAX_SEGMENT_S, *,
                 split_pause_s: float = SPLIT_PAUSE_S, min_pause_s: float = MIN_PAUSE_S, pad_s: float = PAD_S,
                 min_segment_s: float = MIN_SEGMENT_S, margin_db: float = MARGIN_DB):
        if not sampling_rate or sampling_rate <= 0:
            raise ValueError(f"sampling_rate must be a positive number of Hz, got {sampling_rate!r}")
        self.sampling_rate = int(sampling_rate)
        self.window = int(sampling_rate * FRAME_MS / 1000)
        self.shift = int(sampling_rate * SHIFT_MS / 1000)
        self.offset = (self.window - self.shift) // 2
        frames = lambda seconds: int(round(seconds * sampling_rate / self.shift))  # noqa: E731
        # a segment's samples span at most one window more than its frames: this keeps them within max_segment_s
        self.max_frames = (int(max_segment_s * sampling_rate) - self.window) // self.shift
        if self.max_frames < 1 or not 0 <= min_segment_s <= max_segment_s or pad_s < 0:
            raise ValueError(f"want 0 <= min_segment_s ({min_segment_s}) <= max_segment_s ({max_segment_s}), "
                             f"max_segment_s longer than a {FRAME_MS:g} ms frame and pad_s ({pad_s}) >= 0")
        self.split_frames = frames(split_pause_s) if math.isfinite(split_pause_s) else math.inf
        self.min_pause_frames = max(1, frames(min_pause_s))
        self.pad_frames = frames(pad_s)
        self.min_segment_frames = frames(min_segment_s)
        self.margin_db = margin_db
        self.floor_pause_frames = frames(FLOOR_PAUSE_S)
        self.own_frames = frames(OWN_SILENCE_S)
        self.min_speech_frames = frames(MIN_SPEECH_S)
        self.burst_quiet_frames = frames(BURST_QUIET_S)
        self.context_frames = frames(CONTEXT_S)
        # past the window: enough to tell whether a pause that starts in it is clear, and where its cut lies
        split = self.split_frames if math.isfinite(self.split_frames) else 0
        self.lookahead_frames = max(2 * self.pad_frames, split, frames(1.0)) + 2 * self.own_frames + SMOOTH_FRAMES

        self.energies = np.empty(0)  # frames [base, base + len(energies))
        self.base = 0
        self.cursor = 0  # no segment starts before this boundary
        self.rest = np.empty(0, np.float32)  # samples from frame base + len(energies) on, not a whole frame yet
        self.samples = 0  # samples pushed so far
        self.finished = False

    @property
    def first_needed_sample(self) -> int:
        """Samples before this one belong to no segment still to come."""
        return self.cursor * self.shift

    def push(self, block: np.ndarray) -> list[Segment]:
        """The next samples of the recording ((N,) or (N, channels), float or int16) -> segments now certain."""
        if self.finished:
            raise RuntimeError("this Segmenter is finished")
        block = to_mono_float32(block)
        self.samples += len(block)
        samples = np.concatenate([self.rest, block]) if len(self.rest) else block
        new = frame_energies(samples, self.window, self.shift)
        self.rest = samples[len(new) * self.shift:].copy()
        keep = max(self.base, self.cursor - self.context_frames)  # older frames are in no context any more
        self.energies = np.concatenate([self.energies[keep - self.base:], new])
        self.base = keep
        return self._decide(final=False)

    def finish(self) -> list[Segment]:
        """The recording ended: its remaining segments."""
        if self.finished:
            raise RuntimeError("this Segmenter is finished")
        self.finished = True
        return self._decide(final=True)

    def _decide(self, final: bool) -> list[Segment]:
        segments = []
        while (step := self._step(final)) is not None:
            if isinstance(step, Segment):
                segments.append(step)
        return segments

    def _step(self, final: bool) -> Segment | bool | None:
        """One decision: a Segment, True when the cursor moved on, None when it needs more audio (or none is left)."""
        available = self.base + len(self.energies)
        horizon = self.cursor + self.max_frames + self.lookahead_frames
        # Decide on frames up to `horizon` only, however the audio came in blocks; to know that the recording ends
        # within them takes its end, or a frame past the horizon.
        if not final and available <= horizon:
            return None
        end_in_reach = available <= horizon
        high = min(available, horizon)
        if self.cursor >= high:
            return None
        context = self.energies[max(self.base, self.cursor - self.context_frames) - self.base:high - self.base]
        levels = pause_levels(context, self.floor_pause_frames, self.margin_db)
        loud, own, room = speech_frames(self.energies[self.cursor - self.base:high - self.base], levels,
                                        self.own_frames, self.min_pause_frames, self.min_speech_frames,
                                        self.burst_quiet_frames)
        onsets = np.flatnonzero(loud | own)
        if len(onsets) == 0:  # silence up to `high`: trim it
            if end_in_reach:
                self.cursor = high
                return None
            self.cursor = max(self.cursor + 1, high - self.pad_frames - self.own_frames - SMOOTH_FRAMES)
            return True
        first = int(onsets[0])
        start = self.cursor + first - (0 if own[first] else self.pad_frames)
        if start > self.cursor:  # leading silence: move on, and look again from there
            self.cursor = start
            return True
        start = self.cursor
        end = self._segment_end(loud, own, room, start, end_in_reach)
        self.cursor = end
        return self._segment(start, end, end_in_reach and end >= available)

    def _segment_end(self, loud: np.ndarray, own: np.ndarray, room: np.ndarray, start: int, end_in_reach: bool
                     ) -> int:
        """Boundary where the segment that starts at `start` ends; `loud`, `own`, `room` are frames from `start` on."""
        limit = start + self.max_frames
        pause_starts, pause_ends = true_runs(~loud)  # relative to start
        lengths = pause_ends - pause_starts
        cuts = start + np.array([self._cut(own, a, b) for a, b in zip(pause_starts, pause_ends)], dtype=np.int64)
        room_frames = np.concatenate([[0], np.cumsum(room)])
        sounds_like_pause = room_frames[pause_ends] - room_frames[pause_starts] >= self.min_pause_frames
        usable = (pause_starts >= self.min_segment_frames) & (cuts <= limit)

        speech = np.flatnonzero(loud | own)
        last = int(speech[-1])
        rest_end = start + min(last + 1 + (0 if own[last] else self.pad_frames), len(loud))
        if end_in_reach:  # speech after the recording's last pause that is too short joins the segment before it
            usable &= (last + 1 - pause_ends >= self.min_segment_frames) | (rest_end - start > self.max_frames)
        clear = np.flatnonzero(usable & (lengths >= self.split_frames) & sounds_like_pause)
        if len(clear):
            return int(cuts[clear[0]])
        if end_in_reach and rest_end - start <= self.max_frames:
            return rest_end
        candidates = np.flatnonzero(usable & (lengths >= self.min_pause_frames))
        if len(candidates) == 0:
            return limit  # no pause at all: cut at the fixed length
        best = candidates[np.lexsort((cuts[candidates], lengths[candidates]))[-1]]  # the longest, then the latest
        return int(cuts[best])

    def _cut(self, own: np.ndarray, start: int, end: int) -> int:
        """Where to end a segment in the pause [start, end): after the own silence of the speech before it, or
        after pad_s; if the next segment's own silence or pad_s leaves no room for that, in proportion."""
        after = int(np.argmin(own[start:end])) if own[start] else 0  # own frames from `start` on
        if own[start] and after == 0:  # own silence all through: no step to cut at
            return start + (end - start) // 2
        before = end - start - int(np.argmin(own[start:end][::-1])) if own[end - 1] else 0
        after, before = after or self.pad_frames, before or self.pad_frames
        if after + before <= end - start:
            return start + after
        return start + round((end - start) * after / (after + before))

    def _segment(self, start: int, end: int, to_the_end: bool) -> Segment:
        first = 0 if start == 0 else start * self.shift + self.offset
        last = self.samples if to_the_end else min(self.samples, end * self.shift + self.offset)
        return Segment.from_samples(first, last, self.sampling_rate)


class _AudioBuffer:
    """Samples of a stream from some position on, as the blocks came (no copy until a segment is taken)."""

    def __init__(self):
        self.blocks: list[np.ndarray] = []
        self.start = 0  # sample index of blocks[0][0]

    def append(self, block: np.ndarray) -> None:
        self.blocks.append(block)

    def take(self, start: int, end: int) -> np.ndarray:
        pieces, position = [], self.start
        for block in self.blocks:
            lo, hi = max(start, position), min(end, position + len(block))
            if lo < hi:
                pieces.append(block[lo - position:hi - position])
            position += len(block)
        if start < self.start or end > position:
            raise RuntimeError(f"samples [{start}, {end}) are no longer buffered ([{self.start}, {position}))")
        self.drop_before(end)
        return np.concatenate(pieces) if pieces else np.empty(0, np.float32)

    def drop_before(self, sample: int) -> None:
        while self.blocks and self.start + len(self.blocks[0]) <= sample:
            self.start += len(self.blocks.pop(0))
