"""Log-mel filterbank features for Speech2Text, Kaldi-compatible, batched in PyTorch.

Reproduces transformers' ``Speech2TextFeatureExtractor`` (itself Kaldi ``compute-fbank-feats`` with
dither 0 followed by utterance-level CMVN), but on a whole padded batch at once and on any device:
frames are strided views of the waveform, one batched ``rfft`` and a banded matmul with the mel matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Sequence

import numpy as np
import soxr
import torch

from .batching import frame_budget_batches

SAMPLE_RATE = 16000
N_MELS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps  # 1.1920929e-07, Kaldi's log floor
CMVN_VAR_FLOOR = 1e-10  # as fairseq: silence must not turn into NaN/inf
MEL_BANDS = 4  # the mel matmul is done in this many blocks, see _analysis
CONFIG_NAME = "preprocessor_config.json"


def frame_sizes(sampling_rate: int = SAMPLE_RATE) -> tuple[int, int, int]:
    """(window, shift, fft) in samples: 400, 160, 512 at 16 kHz, as Kaldi derives them."""
    window = int(sampling_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sampling_rate * FRAME_SHIFT_MS / 1000)
    n_fft = 1 << (window - 1).bit_length()  # Kaldi's round_to_power_of_two
    return window, shift, n_fft


def num_frames(num_samples: int, sampling_rate: int = SAMPLE_RATE) -> int:
    """Frames Kaldi makes with snip_edges: 1 + (N - window) // shift, 0 below one window."""
    window, shift, _ = frame_sizes(sampling_rate)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def mel_scale(freq: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + freq / 700.0)


def povey_window(size: int) -> np.ndarray:
    """Kaldi's default window: a symmetric Hann raised to 0.85 (exactly 0 at both ends)."""
    n = np.arange(size)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1))) ** 0.85


def mel_filters(sampling_rate: int, n_fft: int, num_mel_bins: int) -> np.ndarray:
    """Kaldi mel filterbank, (n_fft // 2 + 1, num_mel_bins): triangles equally spaced in mel from 20 Hz
    to Nyquist, evaluated in mel space at each FFT bin. Kaldi leaves the Nyquist bin out, so its row
    is zero and the matrix takes rfft's full output."""
    mel_low, mel_high = mel_scale(np.float64(LOW_FREQ)), mel_scale(np.float64(sampling_rate / 2))
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    left = mel_low + delta * np.arange(num_mel_bins)  # (M,)
    center, right = left + delta, left + 2 * delta
    bin_mel = mel_scale(np.arange(n_fft // 2) * sampling_rate / n_fft)[:, None]  # (F - 1, 1)
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    filters = np.zeros((n_fft // 2 + 1, num_mel_bins))
    filters[:-1] = np.clip(np.minimum(rising, falling), 0.0, None)
    return filters


MelBand = tuple[slice, slice, torch.Tensor]  # FFT bins, mel bins, the filters' block of weights


@functools.lru_cache(maxsize=None)
def _analysis(device: torch.device, sampling_rate: int, num_mel_bins: int) -> tuple[torch.Tensor, list[MelBand]]:
    """Window (n_fft,) scaled by 2**15 and the mel matrix cut into bands, float32 on `device`, built once."""
    window_size, _, n_fft = frame_sizes(sampling_rate)
    window = np.zeros(n_fft)  # zero past the window: rfft's padding comes from it
    window[:window_size] = povey_window(window_size) * 32768.0
    window = torch.tensor(window, dtype=torch.float32, device=device)

    # The mel matrix is ~95% zeros: each filter spans a few bins, wider with frequency. Four bands of
    # 20 filters times only the FFT bins they touch halve the matmul's work compared to the dense one.
    filters = mel_filters(sampling_rate, n_fft, num_mel_bins)
    bands = []
    for mels in np.array_split(np.arange(num_mel_bins), min(MEL_BANDS, num_mel_bins)):
        used = np.flatnonzero(filters[:, mels].any(axis=1))
        bins, mels = slice(used[0], used[-1] + 1), slice(mels[0], mels[-1] + 1)
        bands.append((bins, mels, torch.tensor(filters[bins, mels], dtype=torch.float32, device=device)))
    return window, bands


def fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor,
    num_mel_bins: int = N_MELS,
    sampling_rate: int = SAMPLE_RATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaldi log-mel filterbank of a padded batch.

    waveforms: (B, N) float in [-1, 1), right-padded; lengths: (B,) valid samples per row.
    Returns features (B, T, num_mel_bins) float32 with T = frames of N samples, and frame counts (B,).
    Frames past an utterance's own count are 0, so padding never leaks into its features.
    """
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
    window_size, shift, n_fft = frame_sizes(sampling_rate)
    window, mel_bands = _analysis(waveforms.device, sampling_rate, num_mel_bins)
    lengths = lengths.to(waveforms.device)
    frame_counts = (torch.div(lengths - window_size, shift, rounding_mode="floor") + 1).clamp(min=0)

    batch, n_samples = waveforms.shape
    if n_samples < window_size:
        return waveforms.new_zeros(batch, 0, num_mel_bins, dtype=torch.float32), frame_counts

    # Kaldi works on 16-bit sample values (the log floor is absolute), so the window carries the 2**15
    # scale: scaling by a power of two is exact, and this saves a pass over the waveform.
    wave = waveforms.float()  # (B, N)
    frames = wave.unfold(-1, window_size, shift)  # (B, T, W), a strided view: no copy
    dc = frames.mean(-1, keepdim=True)  # (B, T, 1)

    # Per frame Kaldi does x -= mean, then x[i] -= 0.97 x[i-1]. Pre-emphasising the whole waveform
    # once gives the same x[i] for i >= 1 without another frame-sized copy, and the mean then folds
    # in as (1 - 0.97) * mean. Kaldi's x[0] -= 0.97 x[0] needs no care: the povey window is 0 there.
    # The waveform gets n_fft - W samples of tail room so that frames can be cut n_fft long: the
    # window is zero past W, which gives rfft its zero padding without a separate fill.
    emphasised = wave.new_empty(batch, n_samples + n_fft - window_size)  # (B, N + n_fft - W)
    emphasised[:, 0] = wave[:, 0]
    torch.add(wave[:, 1:], wave[:, :-1], alpha=-PREEMPHASIS, out=emphasised[:, 1:n_samples])
    emphasised[:, n_samples:] = 0.0
    x = emphasised.unfold(-1, n_fft, shift) - (1 - PREEMPHASIS) * dc  # (B, T, n_fft)
    x *= window

    spectrum = torch.fft.rfft(x)  # (B, T, F) complex
    power = spectrum.real.square().addcmul_(spectrum.imag, spectrum.imag)  # (B, T, F)
    features = power.new_empty(batch, power.shape[1], num_mel_bins)  # (B, T, M)
    for bins, mels, weights in mel_bands:
        torch.matmul(power[..., bins], weights, out=features[..., mels])
    features.clamp_(min=LOG_FLOOR).log_()

    valid = torch.arange(features.shape[1], device=features.device) < frame_counts[:, None]  # (B, T)
    return features.mul_(valid[..., None]), frame_counts  # log-mels are finite: * 0 clears padding


def utterance_cmvn(
    features: torch.Tensor,
    num_frames: torch.Tensor,
    normalize_means: bool = True,
    normalize_vars: bool = True,
    padding_value: float = 0.0,
    skip_digital_silence: bool = False,
) -> torch.Tensor:
    """Per-utterance mean/variance normalisation over each utterance's valid frames only.

    features: (B, T, D); num_frames: (B,). Population std as transformers, variance floored so a
    silent utterance stays finite. Padded frames are set to `padding_value`.
    skip_digital_silence: frames of exact zeros (every bin at the log floor) are left out of the statistics and
    take the utterance's quietest level; audio without such frames gets transformers' CMVN to the bit either way.
    """
    valid = torch.arange(features.shape[1], device=features.device) < num_frames.to(features.device)[:, None]
    # Why skip: the log-mel of exact zeros sits ~20 below any recorded quiet, and CMVN over such frames squeezes every
    # speech frame. Why not Kaldi-style dither of the zero runs: one 16-bit step of noise is still far below a
    # recording's background, so those frames squeeze the speech too, if less (the WERs: docs/speech-detection.md).
    silent = (features <= math.log(LOG_FLOOR) + 1e-3).all(-1) & valid  # (B, T)
    silent &= skip_digital_silence
    counted = valid & ~silent
    counted = torch.where(counted.any(1, keepdim=True), counted, valid)  # all silent: as before (all zeros out)
    features = torch.where(valid[..., None], features.float(), 0.0)  # the caller's padded frames may hold anything
    x = _cmvn(features, counted[..., None], normalize_means, normalize_vars)
    silent &= ~counted
    if silent.any():
        # They take the utterance's quietest normalised level in each bin, as if its own background went on.
        quietest = torch.where(counted[..., None], x, math.inf).amin(1, keepdim=True)  # (B, 1, D)
        x = torch.where(silent[..., None], quietest, x)
    return torch.where(valid[..., None], x, padding_value)


def _cmvn(features: torch.Tensor, counted: torch.Tensor, normalize_means: bool, normalize_vars: bool) -> torch.Tensor:
    """Mean/variance normalisation of (B, T, D) with statistics over the `counted` frames (B, T, 1) only."""
    count = counted.sum(1, keepdim=True).float().clamp(min=1)  # (B, 1, 1)
    mean = torch.where(counted, features, 0.0).sum(1, keepdim=True) / count  # (B, 1, D)
    x = features - mean if normalize_means else features.clone()
    if normalize_vars:
        # two passes (centre, then square) because log-mels sit far from 0: E[x^2] - E[x]^2 cancels
        centred = torch.where(counted, features - mean, 0.0)
        var = torch.linalg.vecdot(centred, centred, dim=1).unsqueeze(1) / count  # (B, 1, D)
        x = x.mul_(var.clamp_(min=CMVN_VAR_FLOOR).rsqrt_())
    return x


@dataclasses.dataclass
class FeatureExtractor:
    """Speech2Text preprocessor: waveforms in, normalised (B, T, 80) log-mel features out.

    Fields mirror transformers' ``Speech2TextFeatureExtractor`` preprocessor_config.json.
    """

    feature_size: int = N_MELS
    sampling_rate: int = SAMPLE_RATE
    num_mel_bins: int = N_MELS
    padding_value: float = 0.0
    do_ceptral_normalize: bool = True  # (sic) the name transformers and the Hub configs use
    normalize_means: bool = True
    normalize_vars: bool = True
    return_attention_mask: bool = True
    padding_side: str = "right"
    feature_extractor_type: str = "Speech2TextFeatureExtractor"
    processor_class: str = "Speech2TextProcessor"

    def __post_init__(self):
        if self.feature_size != self.num_mel_bins:
            raise ValueError(f"feature_size ({self.feature_size}) must equal num_mel_bins ({self.num_mel_bins})")
        if self.padding_side != "right":
            raise ValueError(f"only right padding is supported, got padding_side={self.padding_side!r}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> FeatureExtractor:
        # Dither would make features random; every published S2T config has none.
        if float(config.get("dither", 0.0)) != 0.0:
            raise ValueError(f"dither={config['dither']} is not supported (features are deterministic)")
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in known})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> FeatureExtractor:
        """Read preprocessor_config.json from a local folder; defaults when the folder has none."""
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return {"dither": 0.0, **dataclasses.asdict(self)}

    def save_pretrained(self, folder: str | os.PathLike) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    def __call__(
        self,
        waveforms: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
        sampling_rate: int,
        device: torch.device | str | None = None,
        skip_digital_silence: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms: one 1-D array or a list of them (float, or int16 PCM) at `sampling_rate`.

        Returns features (B, T, num_mel_bins) float32 on `device` (T = frames of the longest input)
        and frame counts (B,) int64. By default exactly transformers' features; skip_digital_silence: see
        `utterance_cmvn` (what `each`, the path of the jobs and Serve, does).
        """
        if isinstance(waveforms, (np.ndarray, torch.Tensor)) and waveforms.ndim == 1:
            waveforms = [waveforms]
        elif isinstance(waveforms, (np.ndarray, torch.Tensor)):
            shape = tuple(waveforms.shape)
            raise ValueError(f"expected 1-D (mono) audio or a list of it, got an array of shape {shape}")
        if len(waveforms) == 0:
            raise ValueError("expected at least one waveform, got an empty list")
        if not sampling_rate or sampling_rate <= 0:
            raise ValueError(f"sampling_rate must be a positive number of Hz, got {sampling_rate!r}")

        audio = [self._prepare(wave, sampling_rate, index) for index, wave in enumerate(waveforms)]
        if all(isinstance(wave, torch.Tensor) for wave in audio):  # rows already on a device: padded there
            device = torch.device(device or audio[0].device)
            batch = torch.nn.utils.rnn.pad_sequence([wave.to(device) for wave in audio], batch_first=True)
            lengths = torch.tensor([len(wave) for wave in audio])
        else:
            batch, lengths = pad([wave.cpu().numpy() if isinstance(wave, torch.Tensor) else wave for wave in audio])
            device = torch.device(device or "cpu")
        batch, lengths = batch.to(device), lengths.to(device)

        features, frame_counts = fbank(batch, lengths, self.num_mel_bins, self.sampling_rate)
        if self.do_ceptral_normalize:
            features = utterance_cmvn(
                features,
                frame_counts,
                self.normalize_means,
                self.normalize_vars,
                self.padding_value,
                skip_digital_silence,
            )
        elif self.padding_value != 0.0:
            padded = torch.arange(features.shape[1], device=device) >= frame_counts[:, None]
            features = features.masked_fill(padded[..., None], self.padding_value)
        return features, frame_counts

    def each(
        self,
        waveforms: Sequence[np.ndarray],
        sampling_rate: int,
        max_frames: int = 24000,
        device: torch.device | str | None = None,
    ) -> list[torch.Tensor]:
        """Waveforms (1-D arrays) -> features (T_i, num_mel_bins) each, unpadded, in the order given.

        Computed in length-sorted batches of at most `max_frames` padded frames: one call pads every waveform to the
        longest, and padding is work too. Digital silence (runs of exact zeros) does not count in CMVN.
        """
        scale = self.sampling_rate / sampling_rate
        frames = [num_frames(int(len(w) * scale), self.sampling_rate) for w in waveforms]
        features: list[torch.Tensor] = [None] * len(waveforms)  # type: ignore[list-item]
        for batch in frame_budget_batches(frames, max_frames):
            padded, lengths = self(
                [waveforms[i] for i in batch], sampling_rate, device=device, skip_digital_silence=True
            )
            for i, row, length in zip(batch, padded, lengths.tolist()):
                features[i] = row[:length]
        return features

    def _prepare(self, wave: np.ndarray | torch.Tensor, sampling_rate: int, index: int) -> np.ndarray | torch.Tensor:
        """One input -> 1-D float32 numpy at the extractor's rate, checked to hold one window; a float tensor at
        the extractor's rate stays a tensor where it is (a GPU's rows are not copied to the host and back)."""
        window_size, _, _ = frame_sizes(self.sampling_rate)
        if isinstance(wave, torch.Tensor) and wave.is_floating_point() and sampling_rate == self.sampling_rate:
            if wave.dim() != 1:
                raise ValueError(f"input {index}: expected 1-D (mono) audio, got shape {tuple(wave.shape)}")
            if len(wave) < window_size:
                raise ValueError(
                    f"input {index} has {len(wave)} samples, shorter than one {FRAME_LENGTH_MS:g} ms "
                    f"analysis window ({window_size} samples at {self.sampling_rate} Hz)"
                )
            return wave.detach().float()
        if isinstance(wave, torch.Tensor):
            wave = wave.detach().cpu()
            wave = (wave.float() if wave.is_floating_point() else wave).numpy()  # numpy has no bf16
        wave = np.asarray(wave)
        if wave.ndim != 1:
            raise ValueError(f"input {index}: expected 1-D (mono) audio, got shape {wave.shape}")
        given = len(wave)
        wave = to_float32(wave, index)
        if sampling_rate != self.sampling_rate:
            wave = soxr.resample(wave, sampling_rate, self.sampling_rate)

        if len(wave) < window_size:  # Kaldi makes no frame of it, and CMVN of nothing is undefined
            raise ValueError(
                f"input {index} has {given} samples "
                f"({1000 * given / sampling_rate:.1f} ms at {sampling_rate} Hz), "
                f"shorter than one {FRAME_LENGTH_MS:g} ms analysis window ({window_size} samples at "
                f"{self.sampling_rate} Hz)"
            )
        return wave


def to_float32(wave: np.ndarray, index: int = 0) -> np.ndarray:
    """int16 PCM -> [-1, 1) by /32768; floats -> float32. Other integer types are ambiguous: refused."""
    if wave.dtype == np.int16:
        return wave.astype(np.float32) / 32768.0
    if not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"input {index}: expected float or int16 samples, got dtype {wave.dtype}")
    return wave.astype(np.float32, copy=False)


def pad(waveforms: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of 1-D float32 arrays -> right-zero-padded (B, N_max) float32 tensor and lengths (B,) int64."""
    lengths = np.array([len(wave) for wave in waveforms], dtype=np.int64)
    batch = np.zeros((len(waveforms), lengths.max()), dtype=np.float32)
    for row, wave in zip(batch, waveforms):
        row[: len(wave)] = wave
    return torch.from_numpy(batch), torch.from_numpy(lengths)
