"""Batched greedy and beam search with the semantics of transformers' `generate` for encoder-decoder models.

What makes it fast:
- the encoder runs once, and each decoder layer's cross-attention keys and values are computed once per utterance;
  an utterance's beams are stacked along the query axis against those keys, so they are never copied per beam;
- self-attention keys and values are cached, so each step feeds one token per beam;
- an utterance leaves the active batch as soon as its result is final, so later steps only pay for the rest.

What makes it match transformers:
- the first generated token can be forced (a target-language tag, like `forced_bos_token_id`), row by row, and a
  forced token adds 0 to the score;
- beam search keeps 2 * num_beams candidates a step, a hypothesis ending in </s> (or at max length) is finished only
  when it ranks among the top num_beams candidates, finished scores are sum(logprob) / length ** length_penalty with
  the length counting generated tokens, and `early_stopping` (True, False, "never") stops an utterance as there.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cuda_graphs
from .cuda_graphs import GraphedDecoderState, model_graphs
from .model import KVCache, Speech2TextModule, subsampled_lengths, token_positions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodingOptions:
    """How `Speech2Text.transcribe_features` turns features into transcripts (None: the checkpoint's or the device's
    default). The jobs and the endpoint build one from their configuration; `transcribe` takes its fields as
    keywords."""

    num_beams: int | None = None  # 1: greedy search
    max_new_tokens: int | None = None  # default: the checkpoint's max_length - 1
    length_penalty: float | None = None
    early_stopping: bool | str | None = None  # True, False or "never", as transformers' generate
    max_frames: int | None = None  # padded feature frames per batch (fairseq's max_tokens)
    min_avg_logprob: float | None = None  # transcripts scoring lower per token are flagged low_confidence
    word_timestamps: bool = False  # each transcript's words, timed in its utterance
    logprobs: bool = False  # each token's log-probability


@dataclass
class GenerationOutput:
    # One entry per returned sequence, num_return_sequences per utterance, utterance by utterance.
    ids: list[list[int]]  # generated tokens after the start token, through </s> when it was reached
    scores: list[float]  # mean log-probability per generated token (forced tokens left out)


def encode_in_length_groups(model: Speech2TextModule, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """features (B, T, 80), lengths (B,) -> states (B, S, D), mask (B, S): what `model.encode` gives, for less work.

    On a CPU the encoder is compute-bound at any batch size and a padded frame costs as much as speech (in attention,
    more), so a batch of mixed lengths - a Serve batch of whatever requests came in - is encoded in groups whose
    lengths are within 10 % of their longest. On a GPU a bigger batch is nearly free and each group costs kernel
    launches, so the batch stays whole there.
    """
    if features.device.type != "cpu" or features.shape[0] == 1:
        return model.encode(features, lengths)
    order = lengths.argsort(descending=True).tolist()
    frames = lengths.tolist()
    groups: list[list[int]] = []
    for i in order:
        if groups and frames[i] * 1.1 >= frames[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) == 1:
        return model.encode(features, lengths)
    states, mask = None, None
    for group in groups:
        rows = torch.tensor(group, device=features.device)
        group_states, group_mask = model.encode(features[rows, : frames[group[0]]], lengths[rows])
        if states is None:  # the first group holds the longest row, so it sets S
            states = group_states.new_zeros((features.shape[0], *group_states.shape[1:]))
            mask = group_mask.new_zeros((features.shape[0], group_mask.shape[1]))
        states[rows, : group_states.shape[1]] = group_states
        mask[rows, : group_mask.shape[1]] = group_mask
    return states, mask


class DecoderState:
    """Everything the decoder needs for the utterances still decoding, kept in step when some of them leave."""

    def __init__(
        self, model: Speech2TextModule, features: Tensor, lengths: Tensor, rows_per_utterance: int, max_new_tokens: int
    ):
        self.model = model
        encoder_states, self.encoder_mask = encode_in_length_groups(model, features, lengths)
        self.cross_kv = model.model.decoder.cross_keys_values(encoder_states)  # per layer, (A, H, S, D/H) each
        c = model.config
        self.cache = KVCache(
            c.decoder_layers,
            features.shape[0] * rows_per_utterance,
            c.decoder_attention_heads,
            c.d_model // c.decoder_attention_heads,
            min(max_new_tokens, 64),
            encoder_states.dtype,
            features.device,
        )
        self.rows_per_utterance = rows_per_utterance
        self.steps = 0

    def logits(self, tokens: Tensor) -> Tensor:
        """tokens (A, Q): the newest token of each of the Q rows of every active utterance -> logits (A, Q, V) fp32"""
        pad = self.model.config.pad_token_id
        positions = token_positions(tokens.reshape(-1, 1), pad, offset=self.steps).reshape(tokens.shape)
        hidden = self.model.model.decoder(tokens, positions, self.cross_kv, self.encoder_mask, self.cache)
        self.steps += 1
        return self.model.lm_head(hidden).float()

    def reorder_rows(self, rows: Tensor) -> None:
        """rows (A * Q,): which cached row each row continues from (beam search)."""
        self.cache.select(rows)

    def keep_utterances(self, keep: Tensor) -> None:
        """keep (A',) indices of the active utterances that go on decoding."""
        q = self.rows_per_utterance
        self.encoder_mask = self.encoder_mask[keep]
        self.cross_kv = [(k[keep], v[keep]) for k, v in self.cross_kv]
        self.reorder_rows((keep[:, None] * q + torch.arange(q, device=keep.device)).flatten())


def decoder_state(
    model: Speech2TextModule, features: Tensor, lengths: Tensor, rows_per_utterance: int, max_new_tokens: int
) -> DecoderState | GraphedDecoderState:
    """The decoder's state for a batch: on CUDA graphs where the model uses them, else eager."""
    if uses_cuda_graphs(model, features):
        frames = subsampled_lengths(features.shape[1], model.config.num_conv_layers)  # the encoder's output length
        try:
            graph = cuda_graphs.step_graph(model, features.shape[0], rows_per_utterance, frames, max_new_tokens)
        except RuntimeError as error:  # capture can fail (a kernel that syncs, a driver without graph support)
            log.warning("CUDA graph capture failed, decoding without graphs from now on: %s", error)
            model.use_cuda_graphs = False
        else:
            return GraphedDecoderState(graph, model, features, lengths, rows_per_utterance)
    return DecoderState(model, features, lengths, rows_per_utterance, max_new_tokens)


def uses_cuda_graphs(model: Speech2TextModule, features: Tensor) -> bool:
    return features.device.type == "cuda" and model.use_cuda_graphs


def force_first_token(scores: Tensor, forced: Tensor) -> Tensor:
    """scores (A, Q, V); forced (A,) token id, -1 for none. Forced rows get 0 for their token and -inf elsewhere."""
    is_forced = forced >= 0
    if not bool(is_forced.any()):
        return scores
    forced_scores = torch.full_like(scores, float("-inf"))
    forced_scores.scatter_(-1, forced.clamp(min=0)[:, None, None].expand(-1, scores.shape[1], 1), 0.0)
    return torch.where(is_forced[:, None, None], forced_scores, scores)


@torch.inference_mode()
def greedy_search(
    model: Speech2TextModule, features: Tensor, lengths: Tensor, forced: Tensor, max_new_tokens: int
) -> GenerationOutput:
    config = model.config
    batch, device = features.shape[0], features.device
    state = decoder_state(model, features, lengths, rows_per_utterance=1, max_new_tokens=max_new_tokens)
    active = torch.arange(batch, device=device)  # original index of each active utterance
    tokens = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long, device=device)
    out_tokens = torch.full((batch, max_new_tokens), config.pad_token_id, dtype=torch.long, device=device)
    logprob_sums = torch.zeros(batch, device=device)
    num_generated = torch.zeros(batch, dtype=torch.long, device=device)

    for step in range(max_new_tokens):
        logits = state.logits(tokens)[:, 0]  # (A, V)
        if step == 0:
            logits = force_first_token(logits[:, None], forced[active])[:, 0]
        next_tokens = logits.argmax(-1)  # (A,)
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, next_tokens[:, None])[:, 0]
        if step == 0:
            logprobs = logprobs.masked_fill(forced[active] >= 0, 0.0)
        out_tokens[active, step] = next_tokens
        logprob_sums[active] += logprobs
        num_generated[active] = step + 1
        running = next_tokens != config.eos_token_id
        if not bool(running.all()):
            keep = running.nonzero()[:, 0]
            if keep.numel() == 0:
                break
            active, next_tokens = active[keep], next_tokens[keep]
            state.keep_utterances(keep)
        tokens = next_tokens[:, None]

    num_scored = num_generated - (forced >= 0).long()
    return GenerationOutput(
        ids=[row[:n] for row, n in zip(out_tokens.tolist(), num_generated.tolist())],
        scores=(logprob_sums / num_scored.clamp(min=1)).tolist(),
    )


@torch.inference_mode()
def beam_search(
    model: Speech2TextModule,
    features: Tensor,
    lengths: Tensor,
    forced: Tensor,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = True,
    num_return_sequences: int = 1,
) -> GenerationOutput:
    config = model.config
    batch, device, nb = features.shape[0], features.device, num_beams
    eos, pad = config.eos_token_id, config.pad_token_id
    state = decoder_state(model, features, lengths, rows_per_utterance=nb, max_new_tokens=max_new_tokens)

    active = torch.arange(batch, device=device)
    # Beams still being extended: their tokens (A, nb, t) and summed log-probabilities (A, nb).
    running_tokens = torch.empty((batch, nb, 0), dtype=torch.long, device=device)
    running_scores = torch.full((batch, nb), float("-inf"), device=device)
    running_scores[:, 0] = 0.0  # all beams start identical: only the first may spread, or the top-k repeats itself
    # The best finished hypotheses so far (A, nb): length-normalised score, summed log-prob, tokens, length.
    finished_scores = torch.full((batch, nb), float("-inf"), device=device)
    finished_sums = torch.zeros((batch, nb), device=device)
    finished_tokens = torch.full((batch, nb, max_new_tokens), pad, dtype=torch.long, device=device)
    finished_lengths = torch.zeros((batch, nb), dtype=torch.long, device=device)
    # Results of utterances that left the active batch, by original index.
    results_scores = torch.empty_like(finished_scores)
    results_sums, results_tokens, results_lengths = (
        torch.empty_like(finished_sums),
        torch.empty_like(finished_tokens),
        torch.empty_like(finished_lengths),
    )
    tokens = torch.full((batch, nb), config.decoder_start_token_id, dtype=torch.long, device=device)

    for step in range(max_new_tokens):
        num_active = active.numel()
        logprobs = F.log_softmax(state.logits(tokens), dim=-1)  # (A, nb, V)
        if step == 0:
            logprobs = force_first_token(logprobs, forced[active])
        vocab = logprobs.shape[-1]
        candidates = (running_scores[:, :, None] + logprobs).reshape(num_active, nb * vocab)
        top_scores, top_index = candidates.topk(2 * nb, dim=-1)  # (A, 2nb), best first
        top_beams, top_tokens = top_index // vocab, top_index % vocab
        top_seqs = torch.cat(
            [running_tokens.gather(1, top_beams[..., None].expand(-1, -1, step)), top_tokens[..., None]], -1
        )
        ends = (top_tokens == eos) | (step + 1 == max_new_tokens)

        # Only the top num_beams candidates may finish; merge them with the hypotheses finished before.
        new_finished = ends[:, :nb] & torch.isfinite(top_scores[:, :nb])
        new_scores = (top_scores[:, :nb] / ((step + 1) ** length_penalty)).masked_fill(~new_finished, float("-inf"))
        merged = torch.cat([finished_scores, new_scores], 1).topk(nb, dim=-1)
        pick = merged.indices  # (A, nb) into [old finished | new candidates]
        new_tokens = F.pad(top_seqs[:, :nb], (0, max_new_tokens - step - 1), value=pad)
        finished_scores = merged.values
        finished_sums = torch.cat([finished_sums, top_scores[:, :nb]], 1).gather(1, pick)
        finished_tokens = torch.cat([finished_tokens, new_tokens], 1).gather(
            1, pick[..., None].expand(-1, -1, max_new_tokens)
        )
        finished_lengths = torch.cat([finished_lengths, torch.full_like(finished_lengths, step + 1)], 1).gather(1, pick)

        # The best num_beams candidates that did not end go on.
        go_on = top_scores.masked_fill(ends, float("-inf")).topk(nb, dim=-1).indices  # (A, nb)
        running_scores = top_scores.gather(1, go_on).masked_fill(ends.gather(1, go_on), float("-inf"))
        running_tokens = top_seqs.gather(1, go_on[..., None].expand(-1, -1, step + 1))
        source_beams = top_beams.gather(1, go_on)
        state.reorder_rows((torch.arange(num_active, device=device)[:, None] * nb + source_beams).flatten())
        tokens = running_tokens[:, :, -1]

        done = utterance_done(finished_scores, running_scores, step + 1, max_new_tokens, length_penalty, early_stopping)
        if bool(done.any()):
            leaving = active[done]
            results_scores[leaving], results_sums[leaving] = finished_scores[done], finished_sums[done]
            results_tokens[leaving], results_lengths[leaving] = finished_tokens[done], finished_lengths[done]
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            active, tokens = active[keep], tokens[keep]
            running_tokens, running_scores = running_tokens[keep], running_scores[keep]
            finished_scores, finished_sums = finished_scores[keep], finished_sums[keep]
            finished_tokens, finished_lengths = finished_tokens[keep], finished_lengths[keep]
            state.keep_utterances(keep)

    num_forced = (forced >= 0).long()[:, None]
    mean_logprobs = results_sums / (results_lengths - num_forced).clamp(min=1)
    r = num_return_sequences
    ids, scores = [], []
    for tokens_u, lengths_u, means_u in zip(
        results_tokens[:, :r].tolist(), results_lengths[:, :r].tolist(), mean_logprobs[:, :r].tolist()
    ):
        ids += [seq[:n] for seq, n in zip(tokens_u, lengths_u)]
        scores += means_u
    return GenerationOutput(ids=ids, scores=scores)


def utterance_done(
    finished_scores: Tensor,
    running_scores: Tensor,
    num_generated: int,
    max_new_tokens: int,
    length_penalty: float,
    early_stopping: bool | str,
) -> Tensor:
    """(A,) bool: the utterance's best num_beams hypotheses can no longer change."""
    if num_generated >= max_new_tokens:
        return torch.ones(finished_scores.shape[0], dtype=torch.bool, device=finished_scores.device)
    full = torch.isfinite(finished_scores).all(dim=1)
    if early_stopping is True:
        return full
    # Otherwise stop only when the best running beam, at its best possible length, cannot beat the worst finished one.
    best_length = max_new_tokens if (early_stopping == "never" and length_penalty > 0.0) else num_generated
    best_possible = running_scores[:, 0] / (best_length**length_penalty)
    return full & ~(best_possible > finished_scores.min(dim=1).values)


def generate(
    model: Speech2TextModule,
    features: Tensor,
    lengths: Tensor,
    forced: Tensor,
    max_new_tokens: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = True,
    num_return_sequences: int = 1,
) -> GenerationOutput:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be between 1 and num_beams ({num_beams})")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if features.shape[0] == 0:
        return GenerationOutput(ids=[], scores=[])
    # A graph's buffers are shared by every call that replays it: one call at a time per model.
    with model_graphs(model).lock if uses_cuda_graphs(model, features) else contextlib.nullcontext():
        if num_beams == 1:
            return greedy_search(model, features, lengths, forced, max_new_tokens)
        return beam_search(
            model,
            features,
            lengths,
            forced,
            max_new_tokens,
            num_beams,
            length_penalty,
            early_stopping,
            num_return_sequences,
        )
