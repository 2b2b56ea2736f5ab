"""s2t_model.features against the references: kaldi-native-fbank (fbank) and transformers'
Speech2TextFeatureExtractor (fbank + utterance CMVN)."""

import json

import kaldi_native_fbank as knf
import numpy as np
import pytest
import soxr
import torch
from transformers import Speech2TextFeatureExtractor

from s2t_model.features import FeatureExtractor, fbank, num_frames, utterance_cmvn

SR = 16000
DURATIONS = (0.03, 0.5, 3.0, 15.0)  # seconds: one frame up to a long utterance, so padding is exercised


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """Amplitude-modulated tones + mains hum + noise, with a stretch of digital silence in the middle.

    The noise floor (about 10 dB below the tones) matters: in a frame whose spectrum has a valley
    ~20 nats below its peak (the lowest mel bins cover one FFT bin each), float32 rounding of the FFT
    moves the log by ~1e-3 in knf and in ours alike, in different directions.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    x = np.zeros(n)
    for f0, amplitude in ((140.0, 0.2), (420.0, 0.12), (1300.0, 0.08), (3100.0, 0.04)):
        envelope = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 4) * t)
        x += amplitude * envelope * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
    x += 0.02 * np.sin(2 * np.pi * 50.0 * t) + 0.1 * rng.standard_normal(n)
    x[n // 3 : n // 2] = 0.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def utterances() -> list[np.ndarray]:
    return [speechlike(seconds, seed) for seed, seconds in enumerate(DURATIONS)]


def knf_options() -> knf.FbankOptions:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.mel_opts.num_bins = 80
    return opts


def knf_fbank(samples: np.ndarray) -> np.ndarray:
    f = knf.OnlineFbank(knf_options())
    f.accept_waveform(SR, (samples * 32768).tolist())
    f.input_finished()
    return np.array([f.get_frame(i) for i in range(f.num_frames_ready)], dtype=np.float32).reshape(-1, 80)


def padded(waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [len(w) for w in waves]
    batch = torch.zeros(len(waves), max(lengths))
    for row, w in zip(batch, waves):
        row[: len(w)] = torch.from_numpy(w)
    return batch, torch.tensor(lengths)


def test_knf_defaults_are_the_reference_options():
    opts = knf_options()
    frame, mel = opts.frame_opts, opts.mel_opts
    assert (frame.samp_freq, frame.frame_length_ms, frame.frame_shift_ms) == (16000, 25, 10)
    assert frame.snip_edges and frame.remove_dc_offset and frame.round_to_power_of_two
    assert frame.window_type == "povey"
    assert frame.preemph_coeff == pytest.approx(0.97)
    assert mel.low_freq == 20 and mel.high_freq == 0  # 0 means Nyquist
    assert not mel.htk_mode and not mel.is_librosa
    assert opts.use_power and opts.use_log_fbank and not opts.use_energy
    assert opts.eps == pytest.approx(np.finfo(np.float32).eps)


@pytest.mark.parametrize("n", [399, 400, 559, 560, 16000, 16001])
def test_num_frames_matches_knf(n):
    assert num_frames(n) == len(knf_fbank(np.zeros(n, np.float32) + 0.1))


def test_fbank_matches_kaldi_native_fbank_in_a_padded_batch(utterances):
    features, frame_counts = fbank(*padded(utterances))
    assert features.dtype == torch.float32
    assert features.shape == (len(utterances), num_frames(max(map(len, utterances))), 80)
    for i, wave in enumerate(utterances):
        reference = knf_fbank(wave)
        assert frame_counts[i] == len(reference)
        np.testing.assert_allclose(features[i, : len(reference)].numpy(), reference, rtol=0, atol=1e-3)
        assert torch.all(features[i, len(reference) :] == 0)


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")
def test_extractor_matches_transformers_after_cmvn(utterances):
    reference = Speech2TextFeatureExtractor()(
        utterances, sampling_rate=SR, padding=True, return_attention_mask=True, return_tensors="np"
    )
    ref_features, ref_mask = reference["input_features"], reference["attention_mask"]

    features, lengths = FeatureExtractor()(utterances, sampling_rate=SR)
    assert features.shape == ref_features.shape
    assert lengths.dtype == torch.int64
    np.testing.assert_array_equal(lengths.numpy(), ref_mask.sum(-1))
    for i, n in enumerate(lengths.tolist()):
        assert torch.all(features[i, n:] == 0)
        if n == 1:
            # transformers divides 0 by a zero std (NaN); the floored variance gives 0 here, as fairseq
            assert np.isnan(ref_features[i, 0]).all() and torch.all(features[i, 0] == 0)
            continue
        np.testing.assert_allclose(features[i, :n].numpy(), ref_features[i, :n], rtol=0, atol=1e-3)


@pytest.mark.parametrize("means, variances", [(True, True), (True, False), (False, True), (False, False)])
def test_utterance_cmvn_matches_transformers(means, variances):
    rng = np.random.default_rng(7)
    lengths = [5, 40, 23]
    x = (rng.standard_normal((3, 40, 80)) * 3 + 12).astype(np.float32)
    ours = utterance_cmvn(torch.from_numpy(x), torch.tensor(lengths), means, variances)
    for i, n in enumerate(lengths):
        expected = Speech2TextFeatureExtractor.utterance_cmvn(x[i].copy(), n, means, variances)
        np.testing.assert_allclose(ours[i].numpy(), expected, rtol=0, atol=1e-4)


def test_features_do_not_depend_on_the_batch(utterances):
    extract = FeatureExtractor()
    batch, lengths = extract(utterances, sampling_rate=SR)
    for i, wave in enumerate(utterances):
        alone, n = extract(wave, sampling_rate=SR)
        assert n.tolist() == [lengths[i]]
        torch.testing.assert_close(batch[i, : n[0]], alone[0], rtol=0, atol=1e-5)


def test_silence_and_constant_signals_stay_finite():
    extract = FeatureExtractor()
    waves = [np.zeros(SR, np.float32), np.full(SR, 0.3, np.float32), np.full(SR, -1.0, np.float32)]
    features, _ = extract(waves, sampling_rate=SR)
    assert torch.isfinite(features).all()
    raw, _ = fbank(*padded(waves))
    assert torch.isfinite(raw).all()


def test_shorter_than_one_window_is_refused():
    extract = FeatureExtractor()
    with pytest.raises(ValueError, match=r"input 1 .*399 samples.*shorter than one 25 ms analysis window"):
        extract([np.zeros(SR, np.float32), np.zeros(399, np.float32)], sampling_rate=SR)
    features, lengths = extract(np.zeros(400, np.float32), sampling_rate=SR)
    assert features.shape == (1, 1, 80) and lengths.tolist() == [1]


def test_int16_is_scaled_like_float(utterances):
    pcm = np.clip(np.round(utterances[2] * 32768), -32768, 32767).astype(np.int16)
    extract = FeatureExtractor()
    from_int, _ = extract(pcm, sampling_rate=SR)
    from_float, _ = extract(pcm.astype(np.float32) / 32768, sampling_rate=SR)
    assert torch.equal(from_int, from_float)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_rates_are_resampled(rate):
    wave = speechlike(1.3, seed=11)  # only used as a signal; its nominal rate is `rate`
    extract = FeatureExtractor()
    features, lengths = extract(wave, sampling_rate=rate)
    resampled = soxr.resample(wave, rate, SR)
    expected, expected_lengths = extract(resampled, sampling_rate=SR)
    assert lengths.tolist() == [num_frames(len(resampled))] == expected_lengths.tolist()
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)


def test_torch_and_float64_input_equal_float32_input(utterances):
    extract = FeatureExtractor()
    expected, _ = extract(utterances[:2], sampling_rate=SR)
    from_torch, _ = extract([torch.from_numpy(u) for u in utterances[:2]], sampling_rate=SR)
    from_float64, _ = extract([u.astype(np.float64) for u in utterances[:2]], sampling_rate=SR)
    assert torch.equal(from_torch, expected) and torch.equal(from_float64, expected)


def test_multichannel_input_is_refused():
    extract = FeatureExtractor()
    with pytest.raises(ValueError, match="1-D"):
        extract(np.zeros((2, SR), np.float32), sampling_rate=SR)
    with pytest.raises(ValueError, match="1-D"):
        extract([np.zeros(SR, np.float32), np.zeros((SR, 2), np.float32)], sampling_rate=SR)


def test_save_pretrained_loads_in_transformers(tmp_path):
    ours = FeatureExtractor(normalize_vars=False, padding_value=0.5)
    ours.save_pretrained(tmp_path)
    theirs = Speech2TextFeatureExtractor.from_pretrained(tmp_path)
    for key, value in ours.to_dict().items():
        if key not in ("feature_extractor_type", "processor_class"):
            assert getattr(theirs, key) == value, key
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["feature_extractor_type"] == "Speech2TextFeatureExtractor"


def test_from_pretrained_reads_a_transformers_folder(tmp_path):
    Speech2TextFeatureExtractor(do_ceptral_normalize=False, normalize_means=False).save_pretrained(tmp_path)
    ours = FeatureExtractor.from_pretrained(tmp_path)
    assert ours.do_ceptral_normalize is False and ours.normalize_means is False
    assert (ours.num_mel_bins, ours.sampling_rate, ours.feature_size) == (80, 16000, 80)
    assert FeatureExtractor.from_pretrained(tmp_path / "missing") == FeatureExtractor()


def test_config_dict_round_trip_and_refusals():
    config = FeatureExtractor(normalize_means=False).to_dict()
    assert FeatureExtractor.from_dict(config) == FeatureExtractor(normalize_means=False)
    with pytest.raises(ValueError, match="dither"):
        FeatureExtractor.from_dict({**config, "dither": 1.0})
    with pytest.raises(ValueError, match="sampling_rate"):
        FeatureExtractor()(np.zeros(SR, np.float32), sampling_rate=0)
    with pytest.raises(ValueError, match="int16"):
        FeatureExtractor()(np.zeros(SR, np.int32), sampling_rate=SR)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(utterances):
    extract = FeatureExtractor()
    cpu, cpu_lengths = extract(utterances, sampling_rate=SR)
    gpu, gpu_lengths = extract(utterances, sampling_rate=SR, device="cuda")
    assert gpu.is_cuda and gpu.dtype == torch.float32
    assert torch.equal(gpu_lengths.cpu(), cpu_lengths)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)
