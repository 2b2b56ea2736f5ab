"""The decoder step as a CUDA graph: one replay instead of a kernel launch for each small operation of the step.

On a GPU a Speech2Text decoder step is bound by launching kernels, not by arithmetic: its operations are many and
each is small, so the GPU mostly waits for the next launch. A CUDA graph replays the whole step - embedding, every
layer, the output head - as one launch (RTFx with and without graphs: docs/benchmarks.md, `bash bench/gpu.sh`). A
graph runs over static shapes and addresses, so:
- the step reads and writes fixed buffers: tokens (U, Q), the cross-attention keys and values (layers, 2, U, H, S, D/H)
  with their mask, a KV cache of fixed capacity T written at the position held by a device tensor;
- shapes are bucketed (U utterance slots: a power of two; S encoder frames and T: multiples of 64), and graphs are
  kept per bucket beside the model, so a batch of a known shape costs no capture;
- an utterance keeps its slot until the batch ends: leaving costs nothing, and its slot computes unused rows.
`GraphedDecoderState` has `DecoderState`'s interface, so greedy and beam search run unchanged on either.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from .model import Speech2TextModule, token_positions

MAX_GRAPHS = 8  # per model; a graph holds its buffers (beam 5 x 64 utterances x T 256, s2t-small fp16: ~0.5 GB)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def slots_for(utterances: int) -> int:
    return 1 << max(utterances - 1, 0).bit_length()


class StaticKVCache:
    """`KVCache`'s interface over a fixed capacity: the newest token goes to position `step` (a device tensor the graph
    reads), and attention covers the whole buffer with a mask of the positions written so far."""

    def __init__(self, layers: int, rows: int, heads: int, head_dim: int, capacity: int, dtype, device):
        self.buffer = torch.zeros((layers, 2, rows, heads, capacity, head_dim), dtype=dtype, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.arange(capacity, device=device)

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """k, v (R, H, 1, D/H) -> this layer's whole buffers (R, H, T, D/H) and the mask (T,) of written positions."""
        keys, values = self.buffer[layer, 0], self.buffer[layer, 1]
        keys.index_copy_(2, self.step, k)
        values.index_copy_(2, self.step, v)
        return keys, values, self.positions <= self.step

    def advance(self) -> None:
        pass  # the step tensor is set before each replay


class DecoderStepGraph:
    """One decoder step over static buffers, captured once for (U slots, Q rows each, S frames, T capacity)."""

    def __init__(self, model: Speech2TextModule, slots: int, rows_per_slot: int, frames: int, capacity: int):
        c = model.config
        weight = model.lm_head.weight
        heads, head_dim = c.decoder_attention_heads, c.d_model // c.decoder_attention_heads
        self.model = model
        self.tokens = torch.full(
            (slots, rows_per_slot), c.decoder_start_token_id, dtype=torch.long, device=weight.device
        )
        self.cross_kv = torch.zeros(
            (c.decoder_layers, 2, slots, heads, frames, head_dim), dtype=weight.dtype, device=weight.device
        )
        self.cross_mask = torch.zeros((slots, frames), dtype=torch.bool, device=weight.device)
        self.cross_mask[:, 0] = True  # an empty slot attends to one zero frame, not to nothing (NaN)
        self.cache = StaticKVCache(
            c.decoder_layers, slots * rows_per_slot, heads, head_dim, capacity, weight.dtype, weight.device
        )
        self.graph = None
        if weight.device.type != "cuda":  # the same static buffers, stepped eagerly: how CPU tests check this path
            self.logits = self.run_step()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, cuBLAS handles, autotuning
            for _ in range(2):
                self.run_step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.run_step()  # (U, Q, V) in the model's dtype

    def replay(self) -> None:
        """One step from the buffers as they are now: the graph's replay, or the step itself without a GPU."""
        if self.graph is None:
            self.logits = self.run_step()
        else:
            self.graph.replay()

    @torch.inference_mode()
    def run_step(self) -> Tensor:
        pad = self.model.config.pad_token_id
        positions = token_positions(self.tokens.reshape(-1, 1), pad, offset=self.cache.step).reshape(self.tokens.shape)
        cross_kv = [(layer[0], layer[1]) for layer in self.cross_kv]
        decoder = self.model.model.decoder
        hidden = decoder(self.tokens, positions, cross_kv, self.cross_mask, self.cache)
        return self.model.lm_head(hidden)

    def load(self, cross_kv: list[tuple[Tensor, Tensor]], encoder_mask: Tensor) -> None:
        """A batch's cross-attention keys and values (A, H, S, D/H) per layer, and its mask (A, S), into the buffers."""
        utterances, frames = encoder_mask.shape
        for layer, (k, v) in enumerate(cross_kv):
            self.cross_kv[layer, 0, :utterances, :, :frames] = k
            self.cross_kv[layer, 1, :utterances, :, :frames] = v
        self.cross_mask[:utterances] = False
        self.cross_mask[:utterances, :frames] = encoder_mask


class ModelGraphs:
    """A model's graphs by bucket, and the lock that lets one generate call at a time replay them (a replay writes
    the graph's shared buffers). Kept beside the model, not on it, so the model still pickles and deep-copies."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_bucket: OrderedDict[tuple, DecoderStepGraph] = OrderedDict()


_graphs: "weakref.WeakKeyDictionary[Speech2TextModule, ModelGraphs]" = weakref.WeakKeyDictionary()
_graphs_lock = threading.Lock()


def model_graphs(model: Speech2TextModule) -> ModelGraphs:
    with _graphs_lock:
        if model not in _graphs:
            _graphs[model] = ModelGraphs()
        return _graphs[model]


def step_graph(
    model: Speech2TextModule, utterances: int, rows_per_utterance: int, frames: int, max_new_tokens: int
) -> DecoderStepGraph:
    """The model's graph for this batch's bucket, captured on first use; the least recently used one goes past 8."""
    graphs = model_graphs(model).by_bucket
    key = (slots_for(utterances), rows_per_utterance, round_up(frames, 64), round_up(max_new_tokens, 64))
    if key in graphs:
        graphs.move_to_end(key)
    else:
        if len(graphs) >= MAX_GRAPHS:
            graphs.popitem(last=False)
        graphs[key] = DecoderStepGraph(model, *key)
    return graphs[key]


class GraphedDecoderState:
    """`DecoderState` on a CUDA graph: utterances keep their slot in the graph's buffers until the batch ends."""

    def __init__(
        self,
        graph: DecoderStepGraph,
        model: Speech2TextModule,
        features: Tensor,
        lengths: Tensor,
        rows_per_utterance: int,
    ):
        encoder_states, encoder_mask = model.encode(features, lengths)
        self.graph = graph
        self.graph.load(model.model.decoder.cross_keys_values(encoder_states), encoder_mask)
        self.rows_per_utterance = rows_per_utterance
        self.slots = torch.arange(features.shape[0], device=features.device)  # slot of each active utterance
        self.steps = 0

    def logits(self, tokens: Tensor) -> Tensor:
        """tokens (A, Q) -> logits (A, Q, V) fp32, as DecoderState.logits."""
        self.graph.tokens[self.slots] = tokens
        self.graph.cache.step.fill_(self.steps)
        self.graph.replay()
        self.steps += 1
        return self.graph.logits[self.slots].float()

    def reorder_rows(self, rows: Tensor) -> None:
        q = self.rows_per_utterance
        sources = self.slots[rows // q] * q + rows % q
        targets = (self.slots[:, None] * q + torch.arange(q, device=rows.device)).flatten()
        written = self.graph.cache.buffer[:, :, :, :, : self.steps]
        written[:, :, targets] = written[:, :, sources]

    def keep_utterances(self, keep: Tensor) -> None:
        self.slots = self.slots[keep]
