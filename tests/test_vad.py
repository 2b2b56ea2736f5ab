"""Speech detection and digital silence: Silero VAD batched as the package's own model, no words from non-speech
(model, job), digital-silence padding harmless. References: silero-vad's JIT model, the demo corpus' texts (jiwer)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from helpers import demo_rows, non_speech

from pipeline import scoring
from s2t_model import DEMO_MODEL, Speech2Text
from s2t_model.speech2text import MIN_AVG_LOGPROB
from s2t_model.vad import SileroVAD, detector_input, shared_vad, speech_features, speech_seconds


@pytest.fixture(scope="module")
def clips():
    rows = demo_rows()
    return rows, [soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in rows]


@pytest.fixture(scope="module")
def model():
    return Speech2Text.from_pretrained(DEMO_MODEL)


def package_probs(jit, wave: np.ndarray) -> np.ndarray:
    """silero-vad's own model called as `get_speech_timestamps` calls it: one zero-padded window at a time."""
    jit.reset_states()
    padded = np.zeros(-(-len(wave) // 512) * 512, np.float32)
    padded[: len(wave)] = wave
    return np.array([jit(torch.from_numpy(window), 16000).item() for window in padded.reshape(-1, 512)])


def test_batched_probabilities_are_the_packages_own(clips):
    from silero_vad import load_silero_vad

    threads = torch.get_num_threads()
    jit = load_silero_vad()
    torch.set_num_threads(threads)
    # Rows of different lengths in one call: speech, noise, a row shorter than a window, one of exactly one window.
    waves = clips[1][:3] + [non_speech(1.0)["pink--20dB"], clips[1][0][:300], clips[1][1][:512]]
    ours = SileroVAD.load().speech_probs(waves)
    for wave, got in zip(waves, ours):
        np.testing.assert_allclose(got, package_probs(jit, wave), atol=2e-4)


def test_non_speech_has_no_speech_and_every_demo_clip_has(clips):
    generated = non_speech()
    found = {
        name: speech_seconds(r) for name, r in zip(generated, shared_vad().speech_regions(list(generated.values())))
    }
    assert found == dict.fromkeys(generated, 0)
    rows, waves = clips
    speech = [speech_seconds(r) for r in shared_vad().speech_regions(waves)]
    assert all(0.5 < s <= r["duration"] + 1e-3 for r, s in zip(rows, speech)), speech


def test_no_speech_no_words_and_the_model_does_not_run(model, clips, monkeypatch):
    generated = list(non_speech().values())
    waves = generated + clips[1][:2]
    features, speech = speech_features(model.feature_extractor, waves, 16000, vad=shared_vad())
    calls = []
    generate = model.generate
    monkeypatch.setattr(
        model, "generate", lambda features, *a, **k: calls.append(len(features)) or generate(features, *a, **k)
    )
    results = model.transcribe_features(features)
    assert [r.text for r in results[: len(generated)]] == [""] * len(generated)
    assert all(not r.speech and r.avg_logprob is None for r in results[: len(generated)])
    assert [r.text for r in results[-2:]] == [r["text"] for r in clips[0][:2]]
    assert sum(calls) == 2  # only the two clips went through the model
    # Without detection the same model invents words for most of them (the reason for all this).
    invented = model.transcribe_features(model.features(generated, 16000), min_avg_logprob=MIN_AVG_LOGPROB)
    assert sum(bool(r.text) for r in invented) >= len(generated) // 2
    # ... which the confidence guard flags, while the clips pass it.
    assert all(r.low_confidence for r in invented if r.text) and not any(r.low_confidence for r in results)


def test_digital_silence_padding_costs_at_most_one_point_of_wer(model, clips):
    rows, waves = clips
    references = [r["text"] for r in rows]
    zeros = np.zeros(int(0.3 * 16000), np.float32)
    alone = scoring.wer(references, model.transcribe(waves, 16000))
    padded = scoring.wer(references, model.transcribe([np.concatenate([zeros, w, zeros]) for w in waves], 16000))
    inside = scoring.wer(
        references,
        model.transcribe([np.concatenate([w[: len(w) // 2], zeros, w[len(w) // 2 :]]) for w in waves], 16000),
    )
    assert padded <= alone + 1.0 and inside <= alone + 1.0, (alone, padded, inside)


def test_job_gives_non_speech_rows_empty_text_and_speech_seconds(ray_session, clips, tmp_path):
    from pipeline.transcribe import TranscribeConfig, run

    entries = []
    for name, audio in non_speech(3.0).items():
        soundfile.write(tmp_path / f"{name}.wav", audio, 16000, subtype="FLOAT")
        entries.append({"audio_filepath": str(tmp_path / f"{name}.wav"), "id": name})
    # A long recording without speech (longer than --max-segment-s: the split stage finds no segment in it).
    soundfile.write(tmp_path / "long-noise.wav", np.resize(non_speech(3.0)["pink--40dB"], 25 * 16000), 16000)
    entries.append({"audio_filepath": str(tmp_path / "long-noise.wav"), "id": "long-noise"})
    speech_rows = clips[0][:2]
    entries += [{"audio_filepath": r["audio_filepath"], "id": r["id"], "text": r["text"]} for r in speech_rows]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    summary = run(TranscribeConfig(manifest=str(manifest), output=str(tmp_path / "out"), model=DEMO_MODEL))
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert summary["rows_ok"] == len(entries) and len(rows) == len(entries)
    for name in [*non_speech(3.0), "long-noise"]:
        assert (rows[name]["text"], rows[name]["error"], rows[name]["speech_s"]) == ("", None, 0.0)
    for r in speech_rows:
        assert rows[r["id"]]["text"] == r["text"] and 0 < rows[r["id"]]["speech_s"] <= r["duration"] + 1e-3
        assert rows[r["id"]]["low_confidence"] is False


def test_quiet_speech_is_heard_and_quiet_non_speech_is_not(clips):
    """The demo clips at a peak of -35/-45/-55 dBFS (far microphones, low gain) all have speech; the non-speech set
    at its own levels and 30 dB quieter has none: the detector's input gain is capped."""
    rows, waves = clips
    for level in (-35, -45, -55):
        quiet = [w / np.abs(w).max() * 10 ** (level / 20) for w in waves]
        speech = [speech_seconds(r) for r in shared_vad().speech_regions([detector_input(w) for w in quiet])]
        assert all(s > 0.5 for s in speech), (level, sum(s > 0.5 for s in speech))
    generated = non_speech()
    for scale in (1.0, 10 ** (-30 / 20)):
        waves = [detector_input(w * scale) for w in generated.values()]
        assert [speech_seconds(r) for r in shared_vad().speech_regions(waves)] == [0] * len(generated), scale
