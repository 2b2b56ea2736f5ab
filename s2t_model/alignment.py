"""Word timestamps and token log-probabilities from one teacher-forced decoder pass over the final tokens.

Speech2Text has no timestamp tokens, but the cross-attention of a trained encoder-decoder is close to monotonic: each
output token attends mostly to the encoder frames where it is said. As openai-whisper's `word_timestamps` does, the
weights of a few chosen heads are normalized per frame, smoothed along time, averaged over the heads and aligned by
dynamic time warping (DTW) into one monotonic path from the first token to the last frame; a token's time is the first
frame the path gives it. Words are the tokenizer's sentencepiece pieces grouped at "▁" (a piece starting one starts a
word); a word ends where the next word (or </s>) begins.

The pass runs after decoding, over whatever ids the decoding chose (greedy, beam search, CUDA graphs or not): one
encoder and one decoder forward of the batch. The same logits give each token's log-probability.

Which heads: `config.extra["alignment_heads"]` (a list of [layer, head], as `config.json` may carry it), else every
head of the decoder's second half (whisper's default for a model without measured heads). `rank_heads` measures each
head against utterances whose word times are known, for choosing them for another checkpoint (`s2t bench words`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .features import FRAME_SHIFT_MS
from .model import Speech2TextModule, subsampled_lengths, token_positions

# Encoder frames (40 ms each with 10 ms features) of the median filter along time; a config's
# `alignment_filter_width` overrides it. Measured with `s2t bench words --filter-width`.
MEDIAN_FILTER_WIDTH = 3


@dataclass(frozen=True)
class Word:
    start_s: float  # from the start of the utterance (a segment's own audio)
    end_s: float
    word: str


@dataclass
class Alignment:
    """One utterance's teacher-forced pass: ids' log-probabilities and the chosen heads' cross-attention."""

    logprobs: list[float]  # one per id
    weights: np.ndarray  # (heads, tokens, frames): the chosen heads over the utterance's own encoder frames


def frame_seconds(model: Speech2TextModule) -> float:
    """Seconds of audio per encoder frame: the feature hop times the subsampling (40 ms for 10 ms features)."""
    return FRAME_SHIFT_MS / 1000 * 2**model.config.num_conv_layers


def alignment_heads(model: Speech2TextModule) -> list[tuple[int, int]]:
    """(layer, head) pairs whose cross-attention word times are read from: the config's measured ones, else every
    head of the decoder's second half."""
    c = model.config
    chosen = c.extra.get("alignment_heads")
    if chosen:
        return [(int(layer), int(head)) for layer, head in chosen]
    return [
        (layer, head)
        for layer in range(c.decoder_layers // 2, c.decoder_layers)
        for head in range(c.decoder_attention_heads)
    ]


@torch.no_grad()
def teacher_forced(
    model: Speech2TextModule,
    features: Tensor,
    lengths: Tensor,
    ids: Sequence[Sequence[int]],
    heads: Sequence[tuple[int, int]] | None = None,
) -> list[Alignment]:
    """features (B, T, 80), lengths (B,), ids: each row's generated tokens (what `generate` returns, forced token
    and </s> included) -> one `Alignment` per row. heads: default `alignment_heads(model)`; [] for log-probs only."""
    c = model.config
    heads = alignment_heads(model) if heads is None else list(heads)
    B, L = len(ids), max(1, max(len(row) for row in ids))  # utterances, longest target
    inputs = torch.full((B, L), c.pad_token_id, dtype=torch.long)
    labels = torch.full((B, L), c.pad_token_id, dtype=torch.long)
    for b, row in enumerate(ids):
        row = list(row)
        inputs[b, : len(row)] = torch.tensor([c.decoder_start_token_id] + row[:-1], dtype=torch.long)
        labels[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    device = model.lm_head.weight.device
    inputs, labels = inputs.to(device), labels.to(device)
    states, mask = model.encode(features.to(device), lengths.to(device))
    decoder = model.model.decoder
    weights: list[Tensor] = []
    hidden = decoder(
        inputs, token_positions(inputs, c.pad_token_id), decoder.cross_keys_values(states), mask, cross_weights=weights
    )
    logprobs = F.log_softmax(model.lm_head(hidden).float(), dim=-1).gather(-1, labels[..., None])[..., 0]
    frames = subsampled_lengths(lengths.to(device), c.num_conv_layers).tolist()
    chosen = (
        torch.stack([weights[layer][:, head] for layer, head in heads], dim=1).float().cpu()
        if heads
        else torch.zeros((B, 0, L, states.shape[1]))
    )  # (B, heads, L, S)
    logprobs = logprobs.cpu()
    return [
        Alignment(logprobs[b, : len(row)].tolist(), chosen[b, :, : len(row), : frames[b]].numpy())
        for b, row in enumerate(ids)
    ]


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cost (N, M) -> the monotonic path of least total cost from (0, 0) to (N-1, M-1), as (rows, columns).

    Steps: next row and column, next row (same frame), or next column (same token). A row of the table is computed
    at once: with a = the best of the two steps from the row above, best[j] = min(a[j], cost[j] + best[j-1]), which
    is the running minimum of a - cumsum(cost) plus cumsum(cost).
    """
    N, M = cost.shape
    best = np.full((N + 1, M + 1), np.inf)
    best[0, 0] = 0.0
    left = np.zeros((N + 1, M + 1), dtype=bool)  # the best step into (i, j) came from (i, j-1)
    diagonal = np.zeros((N + 1, M + 1), dtype=bool)  # else from (i-1, j-1) when set, from (i-1, j) when not
    for i in range(1, N + 1):
        c = cost[i - 1]
        diag, up = best[i - 1, :-1], best[i - 1, 1:]
        a = c + np.minimum(diag, up)  # (M,): entering (i, j) from the row above
        csum = np.cumsum(c)
        row = csum + np.minimum.accumulate(a - csum)
        best[i, 1:] = row
        from_left = np.concatenate([[np.inf], row[:-1]]) + c
        left[i, 1:] = from_left < a
        diagonal[i, 1:] = diag <= up
    rows, cols = [], []
    i, j = N, M
    while i > 0 and j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        if left[i, j]:
            j -= 1
        elif diagonal[i, j]:
            i, j = i - 1, j - 1
        else:
            i -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over `width` neighbours along the last axis, edges reflected."""
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.median(windows, axis=-1)


def monotonic_peaks(score: np.ndarray) -> np.ndarray:
    """score (N, M) -> frames f_0 <= f_1 <= ... <= f_{N-1} maximizing sum(score[k, f_k]): each token's peak, in order.

    best[k, j] = score[k, j] + max(best[k-1, :j+1]), a running maximum per row; then back from the best last frame.
    """
    N, M = score.shape
    best = np.empty((N, M))
    best[0] = score[0]
    for k in range(1, N):
        best[k] = score[k] + np.maximum.accumulate(best[k - 1])
    frames = np.empty(N, dtype=np.int64)
    frames[-1] = int(best[-1].argmax())
    for k in range(N - 2, -1, -1):
        frames[k] = int(best[k, : frames[k + 1] + 1].argmax())
    return frames


def token_frames(
    weights: np.ndarray, rows: Sequence[int], filter_width: int = MEDIAN_FILTER_WIDTH, method: str = "peak"
) -> np.ndarray:
    """weights (heads, tokens, frames) -> the frame at which each of `rows` (token indices, in order) is said.

    The heads' weights are normalized over the tokens at each frame (a frame every token attends to - silence, an
    attention sink - is no evidence for any one of them), smoothed along time and averaged over the heads. Then:
    - "peak": the frames of the tokens' highest weights, kept in order (`monotonic_peaks`). The demo model's heads
      attend in a spike at a word's onset, not across the word, so the peak is where the word starts;
    - "dtw": whisper's reading, the first frame of each token on the DTW path through the whole matrix (which
      suits heads that attend across a word; see `s2t bench words` for both on a checkpoint).
    """
    w = weights[:, list(rows)]  # (heads, R, S)
    if w.shape[1] == 0 or w.shape[2] == 0:
        return np.zeros(w.shape[1], dtype=np.int64)
    std = w.std(axis=1, keepdims=True)
    w = (w - w.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
    matrix = median_filter(w, filter_width).mean(axis=0)  # (R, S)
    if method == "peak":
        return monotonic_peaks(matrix)
    path_rows, path_cols = dtw(-matrix)
    firsts = np.zeros(len(rows), dtype=np.int64)
    entered = np.concatenate([[True], np.diff(path_rows) > 0])
    firsts[path_rows[entered]] = path_cols[entered]
    return firsts


def words(
    pieces: Sequence[str],
    content: Sequence[int],
    weights: np.ndarray,
    frame_s: float,
    ends_with_eos: bool,
    frames: int,
    filter_width: int = MEDIAN_FILTER_WIDTH,
    method: str = "peak",
) -> list[Word]:
    """pieces: sentencepiece pieces of the `content` token rows (ids that are text, not tags or </s>); the row after
    the last one is </s> when `ends_with_eos`. -> the words with their start and end times in the utterance."""
    if not content:
        return []
    rows = list(content) + ([content[-1] + 1] if ends_with_eos else [])
    firsts = token_frames(weights, rows, filter_width, method)
    starts = [k for k, piece in enumerate(pieces) if piece.startswith("▁") or k == 0]
    out = []
    for n, k in enumerate(starts):
        stop = starts[n + 1] if n + 1 < len(starts) else len(pieces)
        text = "".join(pieces[k:stop]).replace("▁", " ").strip()
        if not text:
            continue
        end_frame = firsts[stop] if stop < len(firsts) else frames
        start_frame = firsts[k]
        out.append(
            Word(
                round(float(start_frame * frame_s), 3), round(float(max(end_frame, start_frame + 1) * frame_s), 3), text
            )
        )
    return out


def filter_width(model: Speech2TextModule) -> int:
    return int(model.config.extra.get("alignment_filter_width", MEDIAN_FILTER_WIDTH))


def method(model: Speech2TextModule) -> str:
    """ "peak" (default) or "dtw" (`token_frames`), as the config's `alignment_method` says."""
    return str(model.config.extra.get("alignment_method", "peak"))


def rank_heads(
    model: Speech2TextModule,
    examples: Sequence[tuple[Tensor, list[int], list[float]]],
    filter_width: int = MEDIAN_FILTER_WIDTH,
) -> list[tuple[tuple[int, int], float]]:
    """Each decoder cross-attention head's median |word start error| in seconds, best first, over examples of
    (features (T, 80), reference ids as `generate` would give them, true start time of each word).

    Choosing heads for another checkpoint: build utterances whose word times are known (`s2t bench words` synthesizes
    them), rank, and keep the few best as `alignment_heads` in its config.json; then measure the chosen set on other
    utterances (`s2t bench words --heads ...`).
    """
    c = model.config
    every = [(layer, head) for layer in range(c.decoder_layers) for head in range(c.decoder_attention_heads)]
    errors: dict[tuple[int, int], list[float]] = {h: [] for h in every}
    for features, ids, true_starts in examples:
        [alignment] = teacher_forced(model, features[None], torch.tensor([len(features)]), [ids], heads=every)
        pieces, content = text_pieces(model, ids)
        frames = alignment.weights.shape[-1]
        for n, head in enumerate(every):
            found = words(
                pieces,
                content,
                alignment.weights[n : n + 1],
                frame_seconds(model),
                ids[-1] == c.eos_token_id,
                frames,
                filter_width,
                method(model),
            )
            if len(found) == len(true_starts):
                errors[head] += [abs(w.start_s - t) for w, t in zip(found, true_starts)]
    ranked = [(head, float(np.median(e)) if e else float("inf")) for head, e in errors.items()]
    return sorted(ranked, key=lambda pair: pair[1])


def text_pieces(model: Speech2TextModule, ids: Sequence[int]) -> tuple[list[str], list[int]]:
    """The pieces of the ids that are text, and their indices in ids (tags, </s> and other special tokens left out)."""
    tokenizer = model.tokenizer
    special = tokenizer.special_ids | set(tokenizer.lang_code_to_id.values())
    content = [k for k, i in enumerate(ids) if int(i) not in special]
    return [tokenizer.id_to_token(int(ids[k])) for k in content], content
