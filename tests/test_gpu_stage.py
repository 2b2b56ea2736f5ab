"""The device feature path (CPU actors decode, the generation actor detects speech and computes features on its
device), run here with device "cpu": the same ids, texts and speech seconds as the CPU feature path on the same rows
(speech, non-speech, a missing file, a 48 kHz stereo file written by libsndfile), the PCM hand-off exact, the
detector's device path the package's own probabilities, and the job end to end on Ray scored against the demo
corpus' texts. CUDA: the detector on the GPU against the CPU (skipped without one)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import soxr
import torch
from helpers import demo_rows, non_speech

from pipeline import scoring
from pipeline.gpu_stage import PCM, PCM_TYPE, DecodeAudio, GenerateFromAudio, pcm_column, pcm_rows
from pipeline.stages import ComputeFeatures, FeatureOptions, GenerateText, GenerationOptions
from pipeline.transcribe import TranscribeConfig, feature_stage, generation_batch_size, run
from s2t_model import DEMO_MODEL, DecodingOptions, FeatureExtractor
from s2t_model.vad import SileroVAD, shared_vad

CLIPS = 5


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """A batch as the stages get it: demo clips (one as 48 kHz stereo FLAC), two non-speech files, a missing file
    and a long recording's segment already found silent (speech_s 0)."""
    folder = tmp_path_factory.mktemp("audio")
    clips = demo_rows(CLIPS)
    paths = [c["audio_filepath"] for c in clips]
    audio, rate = soundfile.read(paths[1], dtype="float32")
    stereo = soxr.resample(audio, rate, 48000)
    soundfile.write(folder / "stereo48k.flac", np.stack([stereo, 0.5 * stereo], axis=1), 48000)
    paths[1] = str(folder / "stereo48k.flac")
    for name in ("pink--20dB", "tone-440"):
        soundfile.write(folder / f"{name}.flac", non_speech(3.0)[name], 16000)
        paths.append(str(folder / f"{name}.flac"))
    paths += [str(folder / "missing.flac"), clips[0]["audio_filepath"]]
    n = len(paths)
    speech = [None] * (n - 1) + [0.0]
    table = pa.table(
        {
            "id": [f"row-{i}" for i in range(n)],
            "audio": paths,
            "offset_s": [0.0] * n,
            "duration_s": pa.array([None] * n, pa.float64()),
            "error": pa.array([None] * n, pa.string()),
            "speech_s": pa.array(speech, pa.float64()),
            "tgt_lang": pa.array([None] * n, pa.string()),
        }
    )
    return table, [c["text"] for c in clips]


def stage_options():
    features = FeatureOptions(feature_config=FeatureExtractor().to_dict(), min_duration_s=0.1, max_duration_s=60.0)
    generation = GenerationOptions(
        model_uri=DEMO_MODEL, model_label="demo", device="cpu", decoding=DecodingOptions(num_beams=2, max_new_tokens=60)
    )
    return features, generation


def with_ids(stage) -> list:
    """Record the ids each generation call gives (the table holds texts, not ids)."""
    ids = []
    transcribe = stage.model.transcribe_features

    def recording(*args, **kwargs):
        results = transcribe(*args, **kwargs)
        ids.extend(r.ids for r in results)
        return results

    stage.model.transcribe_features = recording
    return ids


def test_the_device_path_gives_the_cpu_feature_paths_ids_texts_and_speech(rows):
    table, references = rows
    features, generation = stage_options()
    cpu_stage = GenerateText(generation)
    cpu_ids = with_ids(cpu_stage)
    cpu = cpu_stage(ComputeFeatures(features)(table)).to_pylist()
    device_stage = GenerateFromAudio(generation)
    device_ids = with_ids(device_stage)
    decoded = DecodeAudio(features)(table)
    assert decoded.schema.field(PCM).type == PCM_TYPE and "features" not in decoded.column_names
    device = device_stage(decoded).to_pylist()
    assert PCM not in device[0]
    assert device_ids == cpu_ids and sum(map(bool, cpu_ids)) == CLIPS  # only the clips with speech were decoded
    for a, b in zip(cpu, device):
        assert {k: a[k] for k in ("id", "text", "num_tokens", "error", "speech_s", "duration_s")} == {
            k: b[k] for k in ("id", "text", "num_tokens", "error", "speech_s", "duration_s")
        }
        assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=1e-6) if a["avg_logprob"] else True
    assert [r["text"] for r in device[CLIPS:]] == ["", "", None, ""]
    assert device[-2]["error"].startswith("missing") and device[-1]["speech_s"] == 0.0
    assert scoring.wer(references, [r["text"] for r in device[:CLIPS]]) <= 10.0


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_pcm_travels_exactly_in_arrow_chunks_with_nulls(dtype):
    rng = np.random.default_rng(0)
    waves = [rng.uniform(-1, 1, n).astype(np.float32) for n in (1600, 0, 4000)]
    waves[0] = np.round(waves[0] * 32768).clip(-32768, 32767) / 32768  # what a 16-bit source decodes to
    waves[2] = np.round(waves[2] * 32768).clip(-32768, 32767) / 32768
    column = pcm_column([waves[0], None, waves[1], waves[2]], dtype)
    chunked = pa.chunked_array([column.slice(0, 3), pa.concat_arrays([column.slice(3), column.slice(0, 1)])])
    got = pcm_rows(chunked, "cpu")
    assert got[1] is None and len(got) == 5
    for wave, row in zip([waves[0], None, waves[1], waves[2], waves[0]], got):
        if wave is not None:
            assert row.dtype == torch.float32
            np.testing.assert_array_equal(row.numpy(), wave.astype(np.float32))


def test_the_detectors_device_path_is_the_packages_own_model():
    """Rows as tensors (the device path: windows cut from one padded tensor on the device) give silero-vad's own
    JIT model's probabilities, as host rows do."""
    from silero_vad import load_silero_vad

    threads = torch.get_num_threads()
    jit = load_silero_vad()
    torch.set_num_threads(threads)
    waves = [soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in demo_rows(2)]
    waves += [non_speech(1.0)["pink--20dB"], waves[0][:300], waves[1][:1024]]
    got = SileroVAD.load().speech_probs([torch.from_numpy(w) for w in waves])
    for wave, probs in zip(waves, got):
        jit.reset_states()
        padded = np.zeros(-(-len(wave) // 512) * 512, np.float32)
        padded[: len(wave)] = wave
        expected = [jit(torch.from_numpy(w), 16000).item() for w in padded.reshape(-1, 512)]
        np.testing.assert_allclose(probs, expected, atol=2e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_detector_on_cuda_gives_the_cpus_regions():
    waves = [soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in demo_rows(20)]
    waves += list(non_speech().values())
    cpu, cuda = shared_vad("cpu"), shared_vad("cuda")
    assert cuda is shared_vad(torch.device("cuda")) and cuda.device.type == "cuda"
    for a, b in zip(cpu.speech_probs(waves), cuda.speech_probs([torch.from_numpy(w).cuda() for w in waves])):
        np.testing.assert_allclose(a, b, atol=2e-4)
    assert cpu.speech_regions(waves) == cuda.speech_regions(waves)


def test_auto_picks_the_device_path_and_gpu_sized_batches_with_gpus():
    cpu = TranscribeConfig(manifest="m", output="o", model="x")
    gpu = TranscribeConfig(manifest="m", output="o", model="x", num_gpus=1)
    assert (feature_stage(cpu), generation_batch_size(cpu)) == ("fused", 64)
    assert (feature_stage(gpu), generation_batch_size(gpu)) == ("device", 768)


def test_the_job_on_the_device_path_end_to_end(ray_session, tmp_path):
    import json

    clips = demo_rows(6)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(
                {"id": c["id"], "audio_filepath": c["audio_filepath"], "duration": c["duration"], "text": c["text"]}
            )
            + "\n"
            for c in clips
        )
    )
    summary = run(
        TranscribeConfig(
            manifest=str(manifest),
            output=str(tmp_path / "out"),
            model=DEMO_MODEL,
            feature_stage="device",
            device="cpu",
            num_beams=2,
            batch_size=4,
            feature_batch_size=2,
            feature_actors=1,
        )
    )
    out = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").rglob("*.parquet"))]).to_pylist()
    assert summary["rows_ok"] == len(clips) and sorted(r["id"] for r in out) == sorted(c["id"] for c in clips)
    assert PCM not in out[0] and all(r["speech_s"] > 0.5 for r in out)
    texts = {r["id"]: r["text"] for r in out}
    assert scoring.wer([c["text"] for c in clips], [texts[c["id"]] for c in clips]) <= 10.0


def test_bench_feed_is_registered_and_times_real_speech():
    from bench import feed
    from jobs import cli
    from s2t_model.vad import speech_seconds

    args = cli.build_parser().parse_args(["bench", "feed", "--rtfx", "14000", "--ray"])
    assert args.run is feed.main and args.rtfx == 14000 and args.ray
    waves = feed.utterances(3, 10.0)
    assert [len(w) for w in waves] == [160000] * 3 and not np.array_equal(waves[0], waves[1])
    assert all(speech_seconds(r) > 6 for r in shared_vad().speech_regions(waves))
