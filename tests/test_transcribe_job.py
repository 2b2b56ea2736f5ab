"""The transcription job end to end on a local Ray with the bundled model: every manifest format, mixed audio,
bad input, and a resume after the driver is killed. References are the demo corpus' own texts."""

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import soxr
from helpers import SMALL_RUN, demo_rows

from pipeline import scoring
from pipeline.manifest import read_manifest
from pipeline.rows import ManifestError
from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_MODEL

CLIPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first demo clips as files of several formats, rates and channel counts, under <root>/audio."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    rows = demo_rows(CLIPS)
    # Rates at or above the model's 16 kHz: narrow-band audio (8 kHz) loses what the demo model listens to.
    conversions = [
        ("wav", 44100, 2),
        ("ogg", 32000, 1),
        ("mp3", 22050, 1),
        ("flac", 16000, 1),
        ("wav", 16000, 3),
        ("flac", 48000, 2),
    ]
    for row, (kind, rate, channels) in zip(rows, conversions):
        audio, source_rate = soundfile.read(row["audio_filepath"], dtype="float32")
        audio = soxr.resample(audio, source_rate, rate) if rate != source_rate else audio
        audio = np.stack([audio * (1.0 - 0.2 * c) for c in range(channels)], axis=1)
        name = f"{row['id']}.{kind}"
        soundfile.write(root / "audio" / name, audio, rate)
        row["file"] = name
    return root, rows


def output_rows(folder) -> list[dict]:
    files = sorted(str(p) for p in folder.rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pylist() if files else []


def job(manifest, output, **options) -> tuple[dict, list[dict]]:
    summary = run(TranscribeConfig(manifest=str(manifest), output=str(output), model=DEMO_MODEL, **options))
    return summary, output_rows(output)


def assert_transcribed(rows: list[dict], expected_ids: list[str], references: dict[str, str]) -> None:
    assert sorted(row["id"] for row in rows) == sorted(expected_ids)  # one row per input row, none twice
    assert [row for row in rows if row["error"]] == []
    hypotheses = {row["id"]: row["text"] for row in rows}
    ids = sorted(references)
    assert scoring.wer([references[i] for i in ids], [hypotheses[i] for i in ids]) <= 10.0
    for row in rows:
        assert row["num_tokens"] > 1 and row["avg_logprob"] < 0 and row["model"].startswith(DEMO_MODEL + "@sha256:")


def test_nemo_jsonl_with_relative_paths_and_offsets(ray_session, corpus, tmp_path):
    root, rows = corpus
    # Two utterances inside one longer file, read by offset and duration.
    first, rate = soundfile.read(rows[0]["audio_filepath"], dtype="float32")
    second, _ = soundfile.read(rows[1]["audio_filepath"], dtype="float32")
    soundfile.write(root / "audio" / "joined.flac", np.concatenate([first, np.zeros(rate), second]), rate)
    lines = [
        {"id": r["id"], "audio_filepath": f"audio/{r['file']}", "duration": r["duration"], "text": r["text"]}
        for r in rows
    ]
    lines += [
        {
            "id": "joined-a",
            "audio_filepath": "audio/joined.flac",
            "offset": 0.0,
            "duration": len(first) / rate,
            "text": rows[0]["text"],
        },
        {
            "id": "joined-b",
            "audio_filepath": "audio/joined.flac",
            "offset": (len(first) + rate) / rate,
            "duration": len(second) / rate,
            "text": rows[1]["text"],
        },
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary, out = job(manifest, tmp_path / "out")
    references = {line["id"]: line["text"] for line in lines}
    assert_transcribed(out, list(references), references)
    assert {row["id"]: row["offset_s"] for row in out}["joined-b"] == pytest.approx((len(first) + rate) / rate)
    assert summary["rows_in"] == summary["rows_ok"] == len(lines) and summary["wer"] <= 10.0
    assert json.loads((tmp_path / "out" / "_s2t" / "summary.json").read_text())["rows_ok"] == len(lines)


def stored_zip(path, files: list) -> list[str]:
    """An uncompressed zip of `files`; returns fairseq's `archive.zip:offset:length` for each member."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for f in files:
            archive.write(f, arcname=os.path.basename(f))
    entries = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            raw.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", raw.read(4))
            offset = info.header_offset + 30 + name_length + extra_length
            entries.append(f"{os.path.basename(path)}:{offset}:{info.file_size}")
    return entries


def test_fairseq_tsv_with_zip_archive(ray_session, corpus, tmp_path):
    root, rows = corpus
    entries = stored_zip(tmp_path / "audio.zip", [root / "audio" / r["file"] for r in rows])
    with open(tmp_path / "test.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        writer.writerow(["id", "audio", "n_frames", "tgt_text", "speaker"])
        for r, entry in zip(rows, entries):
            writer.writerow([r["id"], entry, int(r["duration"] * 16000), r["text"], "spk1"])
    summary, out = job(tmp_path / "test.tsv", tmp_path / "out")
    assert_transcribed(out, [r["id"] for r in rows], {r["id"]: r["text"] for r in rows})
    assert {row["speaker"] for row in out} == {"spk1"}  # other manifest columns pass through
    assert all(row["reference"] for row in out)


def test_csv_and_parquet_manifests(ray_session, corpus, tmp_path):
    root, rows = corpus
    references = {r["id"]: r["text"] for r in rows}
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "audio_filepath", "text", "text_fr"])
        for r in rows:
            writer.writerow([r["id"], f"{root}/audio/{r['file']}", r["text"], r["text_fr"]])
    _, out = job(tmp_path / "manifest.csv", tmp_path / "out-csv")
    assert_transcribed(out, list(references), references)
    assert {row["id"]: row["text_fr"] for row in out} == {r["id"]: r["text_fr"] for r in rows}

    table = pa.table({"audio": [str(root / "audio" / r["file"]) for r in rows], "tgt_text": [r["text"] for r in rows]})
    pq.write_table(table, tmp_path / "manifest.parquet")
    derived = read_manifest(str(tmp_path / "manifest.parquet")).column("id").to_pylist()
    _, out = job(tmp_path / "manifest.parquet", tmp_path / "out-parquet")
    assert_transcribed(out, derived, dict(zip(derived, [r["text"] for r in rows])))


def test_glob_of_audio_files(ray_session, corpus, tmp_path):
    root, rows = corpus
    _, out = job(f"{root}/audio/spoken-*.*", tmp_path / "out")
    by_file = {os.path.basename(row["audio"]): row for row in out}
    assert sorted(by_file) == sorted(r["file"] for r in rows)
    references = {by_file[r["file"]]["id"]: r["text"] for r in rows}
    assert_transcribed(out, list(references), references)
    # Ids derived from the path are stable: the same glob gives the same ids again.
    assert sorted(references) == sorted(read_manifest(f"{root}/audio/spoken-*.*").column("id").to_pylist())


def test_translation_forced_per_job(ray_session, corpus, tmp_path):
    root, rows = corpus
    lines = [
        {"id": r["id"], "audio_filepath": f"{root}/audio/{r['file']}", "text": r["text"], "text_fr": r["text_fr"]}
        for r in rows
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary, out = job(tmp_path / "m.jsonl", tmp_path / "out", tgt_lang="fr")
    assert {row["tgt_lang"] for row in out} == {"fr"} and not any(row["error"] for row in out)
    assert summary["bleu"]["fr"] >= 50 and summary["wer"] is None


@pytest.mark.parametrize("feature_stage", ["fused", "separate"])  # CPU-only jobs fuse by default; GPU jobs do not
def test_bad_input_rows_carry_their_reason(ray_session, corpus, tmp_path, feature_stage):
    root, rows = corpus
    bad = tmp_path / "bad"
    bad_audio_files(bad, rows)
    good = [{"id": r["id"], "audio_filepath": f"{root}/audio/{r['file']}", "text": r["text"]} for r in rows[:3]]
    lines = [json.dumps(line) for line in good] + [
        json.dumps({"id": "missing", "audio_filepath": str(bad / "nowhere.flac"), "text": "x"}),
        json.dumps({"id": "zero", "audio_filepath": str(bad / "zero.wav"), "text": "x"}),
        json.dumps({"id": "truncated", "audio_filepath": str(bad / "truncated.flac"), "text": "x"}),
        json.dumps({"id": "text", "audio_filepath": str(bad / "text.wav"), "text": "x"}),
        json.dumps({"id": "tiny", "audio_filepath": str(bad / "tiny.wav"), "text": "x"}),
        json.dumps({"id": "nan", "audio_filepath": str(bad / "nan.wav"), "text": "x"}),
        json.dumps({"id": "long", "audio_filepath": str(bad / "long.flac"), "text": "x"}),
        '{"id": "broken", "audio_filepath": ',
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    summary, out = job(manifest, tmp_path / "out", max_duration_s=30.0, feature_stage=feature_stage)
    assert len(out) == len(lines) == summary["rows_in"] == summary["rows_out"]
    reasons = {row["id"]: (row["error"] or "").split(":")[0] for row in out}
    assert reasons.pop("manifest.jsonl:11") == "bad_manifest_line"
    # libsndfile either loses sync in the cut-off block (corrupt) or returns fewer samples than promised (truncated).
    assert reasons.pop("truncated") in ("corrupt", "truncated")
    assert reasons == {
        "missing": "missing",
        "zero": "empty",
        "text": "unreadable",
        "tiny": "too_short",
        "nan": "corrupt",
        "long": "too_long",
        **{g["id"]: "" for g in good},
    }
    errors = {row["id"]: row["error"] for row in out}
    assert str(bad / "nowhere.flac") in errors["missing"] and "30.0 s" in errors["long"]
    assert "non-finite samples" in errors["nan"]
    assert all(row["text"] is None for row in out if row["error"])
    assert_transcribed(
        [row for row in out if not row["error"]], [g["id"] for g in good], {g["id"]: g["text"] for g in good}
    )
    assert sum(summary["errors_by_reason"].values()) == 8 and summary["errors_by_reason"]["missing"] == 1


def bad_audio_files(bad, rows: list[dict]) -> dict[str, str]:
    """Audio files each broken in its own way, in the folder `bad`: id -> the reason its row's error must give."""
    bad.mkdir()
    (bad / "zero.wav").write_bytes(b"")
    (bad / "text.wav").write_text("this is not audio\n" * 20)
    flac = open(rows[3]["audio_filepath"], "rb").read()
    (bad / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    soundfile.write(bad / "tiny.wav", np.zeros(160, np.float32), 16000)  # 10 ms
    soundfile.write(bad / "nan.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    long = np.concatenate([soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in demo_rows(20)])
    soundfile.write(bad / "long.flac", long, 16000)
    assert len(long) / 16000 > 30
    return {
        "zero": "empty",
        "text": "unreadable",
        "truncated": "corrupt|truncated",
        "tiny": "too_short",
        "nan": "corrupt",
        "long": "too_long",
    }


def test_bad_audio_in_a_webdataset_shard_carries_its_reason(ray_session, corpus, tmp_path):
    """The same broken files as tar members, beside good samples in the same shard: every sample one row."""
    root, rows = corpus
    expected = bad_audio_files(tmp_path / "bad", rows)
    samples = [(r["id"], r["audio_filepath"], r["text"]) for r in rows[:3]]
    samples += [
        (name, str(path), "x") for path in sorted((tmp_path / "bad").iterdir()) for name in [path.name.split(".")[0]]
    ]
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for key, path, text in samples:
            for name, data in [
                (f"{key}.{path.rsplit('.', 1)[1]}", open(path, "rb").read()),
                (f"{key}.json", json.dumps({"id": key, "text": text}).encode()),
            ]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    summary, out = job(tmp_path / "shard-000000.tar", tmp_path / "out", max_duration_s=30.0)
    assert len(out) == len(samples) == summary["rows_in"] == summary["rows_out"]
    reasons = {row["id"]: (row["error"] or "").split(":")[0] for row in out}
    for key, reason in expected.items():
        assert reasons.pop(key) in reason.split("|"), key
    assert reasons == {r["id"]: "" for r in rows[:3]}
    texts = {row["id"]: row["text"] for row in out if not row["error"]}
    # Three short clips, 37 words: one clip half-transcribed is already 13 % WER; the layout WER test is test_shards.
    assert scoring.wer([r["text"] for r in rows[:3]], [texts[r["id"]] for r in rows[:3]]) <= 20.0
    assert sum(summary["errors_by_reason"].values()) == len(expected)


def test_manifest_without_audio_column_fails_before_any_work(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"wav": "a.flac", "text": "one"}) + "\n")
    with pytest.raises(ManifestError, match="audio_filepath, audio, path, file"):
        run(TranscribeConfig(manifest=str(tmp_path / "m.jsonl"), output=str(tmp_path / "out"), model=DEMO_MODEL))
    assert not (tmp_path / "out").exists()


def test_rerun_after_the_driver_is_killed_writes_only_what_is_missing(ray_session, tmp_path):
    rows = demo_rows(30)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.transcribe", str(manifest), str(output), "--model", DEMO_MODEL, *SMALL_RUN],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list(output.glob("*.parquet"))) < 2 and driver.poll() is None:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    written = 0
    for f in output.glob("*.parquet"):
        try:
            written += pq.read_metadata(f).num_rows
        except (pa.ArrowInvalid, OSError):
            pass  # cut short by the kill; the rerun removes it and redoes its rows
    assert 0 < written < len(rows), "the driver must be killed mid-job for this test to mean anything"

    summary, out = job(manifest, output, num_beams=1)
    assert sorted(row["id"] for row in out) == sorted(r["id"] for r in rows)
    assert summary["rows_missing"] == summary["rows_duplicated"] == 0
    assert summary["rows_this_run"] < len(rows)
    assert not any(row["error"] for row in out)
