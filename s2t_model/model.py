"""Speech2Text (fairseq S2T) in plain PyTorch.

Module and parameter names follow transformers' `Speech2TextForConditionalGeneration`, so hub checkpoints load without
any key conversion: `model.encoder.conv.conv_layers.0.weight`, `model.decoder.layers.3.encoder_attn.q_proj.bias`, ...

Shapes: B utterances, T feature frames, S encoder frames (T subsampled 4x), L target tokens, D = d_model, H heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Speech2TextConfig


def sinusoids(positions: Tensor, dim: int, padding_idx: int) -> Tensor:
    """fairseq's sinusoidal embedding of integer positions (..., ) -> (..., dim); the padding position is all zeros."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=positions.device).float() * -(math.log(10000) / (half - 1)))
    angles = positions.float().unsqueeze(-1) * freqs  # (..., half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.masked_fill((positions == padding_idx).unsqueeze(-1), 0.0)


def subsampled_lengths(lengths: Tensor, num_layers: int) -> Tensor:
    for _ in range(num_layers):
        lengths = (lengths - 1) // 2 + 1
    return lengths


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(1)


class Conv1dSubsampler(nn.Module):
    """Stride-2 convolutions with GLU; 4x fewer frames with the default two layers."""

    def __init__(self, config: Speech2TextConfig):
        super().__init__()
        n = config.num_conv_layers
        in_channels = config.input_feat_per_channel * config.input_channels
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(
                in_channels if i == 0 else config.conv_channels // 2,
                config.conv_channels if i < n - 1 else config.d_model * 2,
                kernel_size=k,
                stride=2,
                padding=k // 2,
            )
            for i, k in enumerate(config.conv_kernel_sizes)
        )

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, T, 80), lengths (B,) -> (B, S, D), (B,)"""
        x = features.transpose(1, 2)  # (B, 80, T)
        for conv in self.conv_layers:
            # Zero the padded frames before every layer: the last valid frames of a short utterance then see the
            # same zeros as when it runs alone, so its output does not depend on what else is in the batch.
            x = x * length_mask(lengths, x.shape[-1]).unsqueeze(1).to(x.dtype)
            x = F.glu(conv(x), dim=1)
            lengths = (lengths - 1) // 2 + 1
        return x.transpose(1, 2), lengths


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, H, L, D/H)"""
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """queries from x (B, Q, D) over k, v (B, H, K, D/H); mask (B, 1, 1|Q, K) bool, True = attend."""
        q = self.split_heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def attend_few(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """A decoding step's few queries: x (B, Q, D) over k, v (B, H, K, D/H), K possibly a strided view of a cache;
        mask broadcastable to (B, H, Q, K), True = attend.

        Two plain matmuls: for one query a row (or a beam's few), SDPA's CPU kernel costs several times what they do
        (`s2t bench model` prints the step against its floor; docs/decisions/2026-11-30-decoder-step.md).
        """
        q = self.split_heads(self.q_proj(x)) * (k.shape[-1] ** -0.5)  # (B, H, Q, D/H)
        weights = q @ k.transpose(-1, -2)  # (B, H, Q, K)
        if mask is not None:
            weights = weights.masked_fill(~mask, float("-inf"))
        out = weights.softmax(-1) @ v  # (R, H, 1, D/H)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def weights(self, x: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """The attention weights of queries from x (B, Q, D) over keys k (B, H, K, D/H): (B, H, Q, K), rows summing
        to 1 (what word alignment reads from cross-attention, s2t_model/alignment.py)."""
        q = self.split_heads(self.q_proj(x)) * (k.shape[-1] ** -0.5)
        scores = q @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1)


class EncoderLayer(nn.Module):
    def __init__(self, config: Speech2TextConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = Attention(d, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.self_attn_layer_norm(x)
        x = x + F.dropout(self.self_attn.attend(h, *self.self_attn.keys_values(h), mask), self.dropout, self.training)
        return x + feed_forward(self, x)


def feed_forward(layer: nn.Module, x: Tensor) -> Tensor:
    h = F.relu(layer.fc1(layer.final_layer_norm(x)))
    h = F.dropout(h, layer.activation_dropout, layer.training)
    return F.dropout(layer.fc2(h), layer.dropout, layer.training)


class DecoderLayer(nn.Module):
    def __init__(self, config: Speech2TextConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = Attention(d, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(d, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout

    def forward(
        self,
        x: Tensor,
        cross_kv: tuple[Tensor, Tensor],
        cross_mask: Tensor,
        cache: "KVCache | None",
        index: int,
        cross_weights: list[Tensor] | None = None,
    ) -> Tensor:
        """x (B, Q, D) -> (B, Q, D); `index` is this layer's place in the stack (its slot in the cache).
        cross_weights: a list to which the layer appends its cross-attention weights (B, H, Q, S).

        Without a cache, Q is the target sequence and self-attention is causal over it (training, scoring).
        With a cache, Q holds one new token for each of an utterance's beams: each row attends to its own past, and
        all Q rows share the utterance's cross-attention keys and values (computed once, never copied per beam).
        """
        h = self.self_attn_layer_norm(x)
        if cache is None:
            h = self.self_attn.attend(h, *self.self_attn.keys_values(h), causal=True)
        else:
            rows = h.reshape(-1, 1, h.shape[-1])  # (B*Q, 1, D): every beam is its own sequence here
            k, v, mask = cache.write(index, *self.self_attn.keys_values(rows))
            h = self.self_attn.attend_few(rows, k, v, mask).reshape(x.shape)
        x = x + F.dropout(h, self.dropout, self.training)
        cross_attend = self.encoder_attn.attend if cache is None else self.encoder_attn.attend_few
        h = self.encoder_attn_layer_norm(x)
        if cross_weights is not None:
            cross_weights.append(self.encoder_attn.weights(h, cross_kv[0], cross_mask))
        h = cross_attend(h, *cross_kv, cross_mask)
        x = x + F.dropout(h, self.dropout, self.training)
        return x + feed_forward(self, x)


class KVCache:
    """Self-attention keys and values of the tokens decoded so far, every layer in one buffer written in place.

    buffer: (layers, 2, rows, H, capacity, D/H). All rows are at the same step: `length` tokens are cached. Beam
    search reorders rows and finished utterances leave by index into the same buffer (`select`), and the capacity
    doubles when it is full, so a step writes one position instead of copying the whole past, as a cache grown by
    concatenation does every step (docs/decisions/2026-11-30-decoder-step.md).
    """

    def __init__(self, layers: int, rows: int, heads: int, head_dim: int, capacity: int, dtype, device):
        self.buffer = torch.zeros((layers, 2, rows, heads, capacity, head_dim), dtype=dtype, device=device)
        self.rows = rows
        self.length = 0

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, None]:
        """k, v (R, H, 1, D/H) of the newest token -> this layer's keys and values so far, (R, H, length+1, D/H)."""
        if self.length == self.buffer.shape[4]:
            self.buffer = torch.cat([self.buffer, torch.zeros_like(self.buffer)], dim=4)
        past = self.buffer[layer, :, : self.rows]
        past[0, :, :, self.length] = k[:, :, 0]
        past[1, :, :, self.length] = v[:, :, 0]
        return past[0, :, :, : self.length + 1], past[1, :, :, : self.length + 1], None

    def advance(self) -> None:
        """Every layer has written the newest token."""
        self.length += 1

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder) rows: beams that survived a beam-search step, utterances still decoding."""
        kept = self.buffer[:, :, rows, :, : self.length]  # a copy: rows may repeat or swap
        self.buffer[:, :, : rows.numel(), :, : self.length] = kept
        self.rows = rows.numel()


class Encoder(nn.Module):
    def __init__(self, config: Speech2TextConfig):
        super().__init__()
        self.config = config
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.conv = Conv1dSubsampler(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, T, 80), lengths (B,) -> states (B, S, D), mask (B, S) bool"""
        x, lengths = self.conv(features, lengths)
        mask = length_mask(lengths, x.shape[1])
        pad = self.config.pad_token_id
        positions = torch.where(mask, mask.cumsum(1) + pad, pad)  # frames are numbered 2, 3, ... like tokens
        x = self.embed_scale * x + sinusoids(positions, x.shape[-1], pad).to(x.dtype)
        x = F.dropout(x, self.config.dropout, self.training)
        attn_mask = mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask)
        return self.layer_norm(x), mask


class Decoder(nn.Module):
    def __init__(self, config: Speech2TextConfig):
        super().__init__()
        self.config = config
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)

    def cross_keys_values(self, encoder_states: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's cross-attention keys and values, (B, H, S, D/H) each: computed once per utterance, and laid
        out contiguously once, or every step's matmul over them would copy them first."""
        return [tuple(t.contiguous() for t in layer.encoder_attn.keys_values(encoder_states)) for layer in self.layers]

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        cross_kv: list[tuple[Tensor, Tensor]],
        encoder_mask: Tensor,
        cache: KVCache | None = None,
        cross_weights: list[Tensor] | None = None,
    ) -> Tensor:
        """tokens, positions (B, Q) -> hidden states (B, Q, D); see DecoderLayer for what Q is with a cache.
        cross_weights: a list that gets every layer's cross-attention weights (B, H, Q, S), layer by layer."""
        x = self.embed_scale * self.embed_tokens(tokens)
        x = x + sinusoids(positions, x.shape[-1], self.config.pad_token_id).to(x.dtype)
        x = F.dropout(x, self.config.dropout, self.training)
        cross_mask = encoder_mask[:, None, None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, cross_kv[i], cross_mask, cache, i, cross_weights)
        if cache is not None:
            cache.advance()
        return self.layer_norm(x)


class Seq2Seq(nn.Module):
    """Holds the encoder and decoder under the name `model`, as in transformers' state dicts."""

    def __init__(self, config: Speech2TextConfig):
        super().__init__()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)


def shift_right(labels: Tensor, start_id: int, pad_id: int) -> Tensor:
    """Teacher forcing: decoder inputs are the labels delayed by one step, starting with the start token."""
    inputs = labels.roll(1, dims=1)
    inputs[:, 0] = start_id
    return inputs.masked_fill(inputs == -100, pad_id)


def token_positions(tokens: Tensor, pad_id: int, offset: int | Tensor = 0) -> Tensor:
    """Positions of target tokens: real tokens count 2, 3, ... after `offset` earlier ones; pad tokens get pad_id."""
    real = tokens != pad_id
    return torch.where(real, real.cumsum(1) + offset + pad_id, pad_id)


class Speech2TextModule(nn.Module):
    """The network: features -> encoder -> decoder -> vocabulary logits. Speech2Text adds loading and decoding."""

    def __init__(self, config: Speech2TextConfig):
        super().__init__()
        self.config = config
        self.use_cuda_graphs = True  # decode with CUDA graphs on a GPU (s2t_model/cuda_graphs.py); off: eager
        self.model = Seq2Seq(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def encode(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encoder(features.to(self.lm_head.weight.dtype), lengths.to(features.device))

    def forward(
        self,
        features: Tensor,
        lengths: Tensor,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        label_smoothing: float = 0.0,
        encoder_rows: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """features (B, T, 80), lengths (B,), decoder_input_ids (B, L) -> logits (B, L, vocab).

        With labels (B, L) (-100 = ignored), returns (logits, mean cross-entropy loss); decoder inputs default to the
        labels shifted right, as in training. encoder_rows (R,) lets R target rows read utterances of the batch
        (several targets of one utterance, say: transcript and translations), encoding each utterance once.
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        encoder_states, encoder_mask = self.encode(features, lengths)
        if encoder_rows is not None:
            encoder_states, encoder_mask = encoder_states[encoder_rows], encoder_mask[encoder_rows]
        decoder = self.model.decoder
        positions = token_positions(decoder_input_ids, self.config.pad_token_id)
        hidden = decoder(decoder_input_ids, positions, decoder.cross_keys_values(encoder_states), encoder_mask)
        logits = self.lm_head(hidden)
        if labels is None:
            return logits
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, label_smoothing=label_smoothing
        )
        return logits, loss
