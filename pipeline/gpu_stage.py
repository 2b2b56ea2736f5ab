"""The device feature path (the default with GPUs): CPU actors only read and decode, and each generation actor
detects speech, computes fbank + CMVN and generates on its own device, in one place.

    DecodeAudio (CPU actors): rows -> `pcm`, each row's samples at the model's rate (16 kHz), float32
    GenerateFromAudio (the generation pool): `pcm` -> speech detection, features and text on its device

Why: on CPU feature actors the detector and the features cost several times what decoding does, so a GPU decoding
at tens of thousands of audio-seconds a second needs several times the cores to be fed (`s2t bench feed` measures
both designs; its figures: docs/gpu.md).
On a GPU both are a few kernels per batch.

What travels is float32 PCM, chosen by measurement (`s2t bench feed`, its hand-offs table; docs/gpu.md): int16 halves
the bytes through the object store and the copy to the device, but the decoder gives float32 and rounding it to int16
costs the CPU actors more than the bytes it saves there (the conversion is a pass over the samples; a put or a copy of
the bytes is a memcpy), and more than the GPU actor's copy of the extra bytes costs it. float32 is also exact for every
source, so the device path's ids equal the CPU path's (int16 re-quantises resampled and 24-bit audio). Encoded bytes
would travel lighter still, but decoding them is the CPU work the GPU actor's one core cannot do at a GPU's rate.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch

from s2t_model.vad import shared_vad, speech_features

from .stages import ComputeFeatures, FeatureOptions, GenerateText, GenerationOptions, set_column

PCM = "pcm"
PCM_TYPE = pa.large_list(pa.float32())  # large: a batch's samples may pass 2**31


def pcm_column(waves: list[np.ndarray | None], dtype=np.float32) -> pa.Array:
    """Rows' float32 samples in [-1, 1) (None: no audio) -> one Arrow list column, built from one concatenation of
    the samples (not row by row); dtype float32, or int16 (x 32768, rounded, clipped: `s2t bench feed` compares)."""
    lengths = np.array([0 if w is None else len(w) for w in waves], np.int64)
    offsets = np.zeros(len(waves) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    present = [w for w in waves if w is not None]
    values = np.concatenate(present, dtype=np.float32) if present else np.zeros(0, np.float32)  # a new array
    if dtype == np.int16:
        values *= 32768.0
        values = np.clip(np.rint(values, out=values), -32768, 32767, out=values).astype(np.int16)
    mask = pa.array([w is None for w in waves])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


def pcm_rows(column: pa.ChunkedArray | pa.Array, device: torch.device | str) -> list[torch.Tensor | None]:
    """The `pcm` column -> each row's float32 samples in [-1, 1) on `device` (views of one tensor a chunk), None
    where null. The host's work: one copy of the samples per chunk (Arrow's buffers are read in place; a GPU gets one
    transfer a chunk) and the offsets; the conversion to float runs on the device.

    No pinned staging buffer: a copy from pageable memory costs the host one memcpy of the bytes (the driver's
    staging copy), which a pinned buffer would cost too (our copy into it); what pinning adds, a copy that overlaps
    the GPU's work, has nothing to overlap here: the actor's previous batch is done when the next one arrives."""
    device = torch.device(device)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    rows: list[torch.Tensor | None] = []
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        values = chunk.flatten().to_numpy(zero_copy_only=False)  # the chunk's slice of the buffer, no copy
        offsets = chunk.offsets.to_numpy()
        lengths = np.diff(offsets).tolist()
        with warnings.catch_warnings():  # Arrow's buffers are read-only; nothing writes to these samples
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            samples = torch.from_numpy(values).to(device)
        samples = samples.float().div_(32768.0) if not samples.is_floating_point() else samples.float()
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        rows.extend(row if ok else None for row, ok in zip(samples.split(lengths), valid))
    return rows


class DecodeAudio(ComputeFeatures):
    """Read and decode each row's audio slice into `pcm` (the model's rate, float32); null for errors and for a long
    recording's segments already found silent. Reads as `ComputeFeatures` does; computes no features."""

    reads = ("audio", "offset_s", "duration_s", "error")
    writes = (PCM, "speech_s", "duration_s", "error")

    def __init__(self, options: FeatureOptions):
        super().__init__(replace(options, vad="off"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch, waves, _ = self.read(batch)
        return set_column(batch, PCM, pcm_column([waves.get(i) for i in range(batch.num_rows)]), PCM_TYPE)


class GenerateFromAudio(GenerateText):
    """`pcm` -> text on the actor's device: speech detection (Silero, one model per device), fbank + CMVN and
    generation, the rows' samples copied to the device once. A row without speech gets the text "" and `speech_s`
    0, as on the CPU feature path; rows with an error pass through."""

    reads = (PCM, "error", "speech_s", "tgt_lang")
    writes = ("speech_s", "text", "tgt_lang", "num_tokens", "avg_logprob", "low_confidence", "error", "model")

    def __init__(self, options: GenerationOptions, vad: str = "silero"):
        super().__init__(options)
        self.vad = shared_vad(self.model.device) if vad == "silero" else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        extractor = self.model.feature_extractor
        waves = pcm_rows(batch.column(PCM), self.model.device)
        speech = batch.column("speech_s").to_pylist()
        good = [i for i, wave in enumerate(waves) if wave is not None]
        computed, seconds = speech_features(
            extractor, [waves[i] for i in good], extractor.sampling_rate, None, self.vad, device=self.model.device
        )
        features: list[torch.Tensor | None] = [None] * len(waves)
        for i, row, row_speech in zip(good, computed, seconds):
            features[i], speech[i] = row, row_speech
        batch = set_column(batch.drop_columns([PCM]), "speech_s", speech, pa.float64())
        return self.generate(batch, features)
