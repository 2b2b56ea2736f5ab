"""Speech detection with Silero VAD (the `silero-vad` package's model and its own timestamp rules), batched over rows.

Silero VAD v6 looks at 512-sample windows (32 ms at 16 kHz) each with the 64 samples before it: a small convolutional
encoder per window, then one LSTM cell carried from window to window. The package runs it one window per call
(`get_speech_timestamps`: 15 audio-s/s on one core here) or several streams per call (the JIT model with a (B, 512)
input: 412 audio-s/s at 64 streams, 660 at 1,024). Only the LSTM is sequential, so this module runs the encoder on
every window of every row in one batched call and the LSTM as `torch.nn.LSTM` over the rows' windows, with the
weights of the JIT model the wheel ships (no download, no ONNX runtime). Its probabilities match the JIT
model's to 2e-4 (the bound tests/test_vad.py holds); speech regions come from the package's own
`get_speech_timestamps_from_probs`.
`s2t bench vad` measures the three forms.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np
import soxr
import torch
from torch import nn

from .batching import default_max_frames
from .features import FeatureExtractor

SAMPLE_RATE = 16000
WINDOW = 512  # samples a probability covers at 16 kHz
CONTEXT = 64  # samples of the previous window each one sees
STFT_SIZE, STFT_HOP = 256, 128  # the model's front end: |STFT| with a periodic Hann window, 4 frames per window
ENCODER_BATCH = 8192  # windows per encoder call: bounds its memory (~40 MB) whatever the batch holds
# The detector's input level (`detector_input`): trial on the demo clips and the non-speech set, docs/audio-formats.md.
DETECTOR_PEAK_DBFS = -12.0
DETECTOR_MAX_GAIN_DB = 30.0
ROBUST_PEAK_QUANTILE = 0.999


@dataclasses.dataclass(frozen=True)
class VadOptions:
    """`get_speech_timestamps` options (the package's defaults, but for `speech_pad_ms`: see its comment)."""

    threshold: float = 0.5
    min_speech_duration_ms: int = 250
    min_silence_duration_ms: int = 100
    # faster-whisper raised its pad from 30 to 400 ms: a short pad clips word onsets (its PR #179).
    speech_pad_ms: int = 200


@dataclasses.dataclass(frozen=True)
class SpeechRegion:
    start_s: float
    end_s: float


class SileroVAD(nn.Module):
    """Silero VAD v6 (16 kHz) as a plain torch module: `speech_probs` for many rows at once, `speech_regions`."""

    def __init__(self):
        super().__init__()
        self.register_buffer("stft_window", torch.hann_window(STFT_SIZE), persistent=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.final_conv = nn.Conv1d(128, 1, kernel_size=1)

    @classmethod
    def load(cls) -> "SileroVAD":
        """The model `load_silero_vad()` gives (the JIT file the wheel ships; nothing is downloaded), as plain torch.

        Its weights, not the wheel's silero_vad_16k.safetensors: those are another version (probabilities off by 0.8).
        """
        threads = torch.get_num_threads()
        from silero_vad import load_silero_vad  # its import calls torch.set_num_threads(1) for the whole process

        jit = load_silero_vad()._model.state_dict()
        torch.set_num_threads(threads)
        check_stft_basis(jit["stft.forward_basis_buffer"])
        names = {"decoder.decoder.2.weight": "final_conv.weight", "decoder.decoder.2.bias": "final_conv.bias"}
        for i in range(4):
            names.update({f"encoder.{i}.reparam_conv.{k}": f"conv{i + 1}.{k}" for k in ("weight", "bias")})
        for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):  # its LSTMCell is our one-layer LSTM
            names[f"decoder.rnn.{k}"] = f"lstm.{k}_l0"
        model = cls()
        model.load_state_dict({ours: jit[theirs] for theirs, ours in names.items()})
        return model.eval().requires_grad_(False)

    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        """(N, CONTEXT + WINDOW) samples -> (N, 128): each window on its own (the package's per-call front end)."""
        x = nn.functional.pad(windows.unsqueeze(1), (0, CONTEXT), mode="reflect").squeeze(1)
        # The package runs its STFT as a convolution with a (258, 256) basis: 2/3 of the model's work on one core.
        # That basis is a Hann-windowed DFT (checked at load), so an FFT gives the same magnitudes for ~1/20 of it.
        frames = x.unfold(-1, STFT_SIZE, STFT_HOP) * self.stft_window  # (N, 4, 256)
        x = torch.fft.rfft(frames).abs().transpose(1, 2)  # (N, 129, 4)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = conv(x).relu()
        return x.squeeze(-1)

    @property
    def device(self) -> torch.device:
        return self.stft_window.device

    @torch.inference_mode()
    def speech_probs(self, waveforms: Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
        """16 kHz float waveforms -> each one's speech probability per 512-sample window (the last zero-padded).

        Rows may be numpy arrays or tensors on any device; the work runs on the model's device: the windows are cut
        there, and the probabilities come back to the host in one copy per call (the regions' rules run there)."""
        counts = [-(-len(w) // WINDOW) for w in waveforms]
        if not waveforms or max(counts) == 0:
            return [np.zeros(0, np.float32) for _ in waveforms]
        windows = self.windows(waveforms, counts)  # (sum counts, 576)
        encoded = self.encode_all(windows)
        # One LSTM call over every row: padded to the longest, packed so that no row steps through another's padding.
        rows = nn.utils.rnn.pad_sequence(encoded.split(counts), batch_first=True)  # (B, T_max, 128)
        packed = nn.utils.rnn.pack_padded_sequence(rows, torch.tensor(counts), batch_first=True, enforce_sorted=False)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True)
        probs = self.decode(hidden).float().cpu().numpy()  # (B, T_max): the one copy back
        return [p[:n] for p, n in zip(probs, counts)]

    def encode_all(self, windows: torch.Tensor) -> torch.Tensor:
        # A GPU takes many more windows per call before its memory matters (~5 KB a window in flight).
        size = ENCODER_BATCH if self.device.type == "cpu" else 8 * ENCODER_BATCH
        return torch.cat([self.encode(part) for part in windows.split(size)])

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """LSTM outputs (B, T, 128) -> speech probabilities (B, T)."""
        return self.final_conv(hidden.relu().transpose(1, 2)).sigmoid().squeeze(1)

    def windows(self, waveforms: Sequence[np.ndarray | torch.Tensor], counts: list[int]) -> torch.Tensor:
        """(sum counts, CONTEXT + WINDOW) on the model's device: each row's `count` windows, each with the CONTEXT
        samples before it (zeros before the first, zeros past the row's end)."""
        B, T = len(waveforms), max(counts)  # rows, windows of the longest
        padded = torch.zeros(B, CONTEXT + T * WINDOW, dtype=torch.float32, device=self.device)
        for row, wave in zip(padded, on_device(waveforms, self.device)):
            row[CONTEXT : CONTEXT + len(wave)] = wave
        windows = padded.unfold(1, CONTEXT + WINDOW, WINDOW)  # (B, T, 576), a view
        if all(n == T for n in counts):
            return windows.reshape(B * T, CONTEXT + WINDOW)
        valid = torch.arange(T) < torch.tensor(counts)[:, None]  # (B, T) on the host: no sync to build it
        return windows[valid.to(self.device)]

    def speech_regions(
        self, waveforms: Sequence[np.ndarray], options: VadOptions = VadOptions()
    ) -> list[list[SpeechRegion]]:
        """16 kHz waveforms -> each one's speech regions, by the package's own rules on our probabilities."""
        return [regions_from_probs(p, len(w), options) for p, w in zip(self.speech_probs(waveforms), waveforms)]


class ProbabilityStream:
    """One recording's speech probabilities from consecutive 16 kHz blocks of any size, the same as `speech_probs`
    of the whole: the LSTM state, the last window's context and a part-window carry over from block to block."""

    def __init__(self, vad: SileroVAD):
        self.vad = vad
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending = np.zeros(CONTEXT, np.float32)  # context of the next window, then samples not yet in one
        self.probs: list[np.ndarray] = []
        self.num_samples = 0

    @torch.inference_mode()
    def push(self, samples: np.ndarray, last: bool = False) -> None:
        self.num_samples += len(samples)
        data = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        count = (len(data) - CONTEXT) // WINDOW
        if last and (len(data) - CONTEXT) % WINDOW:  # the package zero-pads the last window
            count += 1
            data = np.concatenate([data, np.zeros(CONTEXT + count * WINDOW - len(data), np.float32)])
        if count == 0:
            self.pending = data
            return
        windows = torch.from_numpy(data[: CONTEXT + count * WINDOW]).unfold(0, CONTEXT + WINDOW, WINDOW)
        hidden, self.state = self.vad.lstm(self.vad.encode_all(windows).unsqueeze(0), self.state)
        self.probs.append(self.vad.decode(hidden)[0].numpy())
        self.pending = data[count * WINDOW :].copy()  # the last window's CONTEXT samples and what followed

    def finish(self) -> np.ndarray:
        self.push(np.zeros(0, np.float32), last=True)
        return np.concatenate(self.probs) if self.probs else np.zeros(0, np.float32)


def check_stft_basis(basis: torch.Tensor) -> None:
    """The package's STFT basis (258, 1, 256) must be the Hann-windowed DFT `encode` computes with an FFT."""
    n = torch.arange(STFT_SIZE, dtype=torch.float64)
    angle = 2 * torch.pi * torch.arange(STFT_SIZE // 2 + 1, dtype=torch.float64)[:, None] * n / STFT_SIZE
    window = torch.hann_window(STFT_SIZE, dtype=torch.float64)
    expected = torch.cat([window * torch.cos(angle), -window * torch.sin(angle)]).float()
    if basis.shape != (2 * (STFT_SIZE // 2 + 1), 1, STFT_SIZE) or (basis[:, 0] - expected).abs().max() > 1e-4:
        raise ValueError("this silero-vad version's front end is not the Hann-windowed STFT s2t_model.vad computes")


def regions_from_probs(
    probs: np.ndarray, num_samples: int, options: VadOptions = VadOptions(), max_speech_duration_s: float = float("inf")
) -> list[SpeechRegion]:
    """Probabilities of a recording of `num_samples` at 16 kHz -> its speech regions, by the package's own rules
    (a region longer than max_speech_duration_s, pads included, is cut in its longest pause)."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    stamps = get_speech_timestamps_from_probs(
        probs.tolist(),
        sampling_rate=SAMPLE_RATE,
        audio_length_samples=num_samples,
        max_speech_duration_s=max_speech_duration_s,
        **dataclasses.asdict(options),
    )
    return [SpeechRegion(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]


def speech_seconds(regions: Sequence[SpeechRegion]) -> float:
    return sum(r.end_s - r.start_s for r in regions)


def detector_input(wave: np.ndarray) -> np.ndarray:
    """A waveform at the level the detector hears speech at: Silero's speech probability falls with the input's
    level (quiet recordings lost rows: docs/audio-formats.md), so its input is scaled to a robust peak (a high
    percentile of |x|, deaf to a few clicks) of DETECTOR_PEAK_DBFS, never by more than DETECTOR_MAX_GAIN_DB (room
    noise is not made into speech), never above full scale, never quieter. The model's features are not touched."""
    wave = wave.float() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float32)
    if not len(wave):
        return wave
    k = int(len(wave) * ROBUST_PEAK_QUANTILE)  # (k + 1)-th smallest |x|
    if isinstance(wave, torch.Tensor):  # a row already on the detector's device stays there
        magnitude = wave.abs()
        peak, robust = float(magnitude.max()), float(torch.kthvalue(magnitude, k + 1).values)
    else:
        magnitude = np.abs(wave)
        peak, robust = float(magnitude.max()), float(np.partition(magnitude, k)[k])
    if robust <= 0 or not math.isfinite(peak):
        return wave
    gain = min(10 ** (DETECTOR_PEAK_DBFS / 20) / robust, 10 ** (DETECTOR_MAX_GAIN_DB / 20), 1.0 / peak)
    return wave * gain if gain > 1.0 else wave


def shared_vad(device: torch.device | str = "cpu") -> SileroVAD:
    """One model per process and device (an actor, a replica), loaded on first use, never per batch or request."""
    return _vad_on(torch.device(device))


@functools.lru_cache(maxsize=None)
def _vad_on(device: torch.device) -> SileroVAD:
    return SileroVAD.load().to(device)


def on_device(waveforms: Sequence[np.ndarray | torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Rows as float32 tensors on `device`: tensors already there stay as they are; host rows go over in one copy
    (joined first, so that a GPU gets one transfer, not one per row)."""
    if all(isinstance(w, torch.Tensor) and w.device == device for w in waveforms):
        return [w.float() for w in waveforms]
    host = [
        w.detach().cpu().float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32)
        for w in waveforms
    ]
    flat = torch.from_numpy(np.concatenate(host) if host else np.zeros(0, np.float32)).to(device)
    return list(flat.split([len(w) for w in host]))


def speech_features(
    extractor: FeatureExtractor,
    waveforms: Sequence[np.ndarray | torch.Tensor],
    sampling_rate: int,
    max_frames: int | None = None,
    vad: SileroVAD | None = None,
    device: torch.device | str | None = None,
) -> tuple[list[torch.Tensor | None], list[float | None]]:
    """Waveforms -> each one's features (T_i, 80), None where `vad` finds no speech (no model needs to run on it),
    and its seconds of speech (None without `vad`). The one step from audio to features of the job and of Serve.
    Rows already on `device` (tensors) stay there: detection runs on `vad`'s device, features on `device`.
    max_frames: padded frames per feature batch (default: the device's)."""
    max_frames = max_frames or default_max_frames(device or "cpu")
    if vad is None:
        return extractor.each(waveforms, sampling_rate, max_frames, device=device), [None] * len(waveforms)
    at_16k = (
        waveforms
        if sampling_rate == SAMPLE_RATE
        else [
            soxr.resample(
                w.float().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32),
                sampling_rate,
                SAMPLE_RATE,
            )
            for w in waveforms
        ]
    )
    speech = [speech_seconds(regions) for regions in vad.speech_regions([detector_input(w) for w in at_16k])]
    heard = [i for i, seconds in enumerate(speech) if seconds > 0]
    features: list[torch.Tensor | None] = [None] * len(waveforms)
    for i, row in zip(heard, extractor.each([waveforms[i] for i in heard], sampling_rate, max_frames, device=device)):
        features[i] = row
    return features, speech
