"""Audio as people keep it, through the job and through Serve (the official openai client): m4a, mp4 with a video
track, mov, mkv, webm and ogg Opus, mp3 without a Xing header (VBR) and with cover art (CBR), AMR, WMA, made with
PyAV's own encoders; each transcribed within 1 WER point of the same clips as FLAC (AMR against 8 kHz FLAC), each
row as long as the clip. A slice of an m4a; quiet speech (-35/-45/-55 dBFS peak) keeps its words with the VAD on."""

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import soxr
from helpers import demo_rows, formats_people_keep

from pipeline import scoring
from pipeline.audio import AudioError, PyAVAudio, decode_audio
from s2t_model import DEMO_MODEL

CLIPS = 50  # all: a lossy codec flips a word of the tiny demo model here and there, one word is 0.2 points
QUIET_DBFS = (-35, -45, -55)


def flac_bytes(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="FLAC")
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{(format, clip index): path}: every format of the first CLIPS demo clips, the FLAC they are compared with
    ("flac": the whole corpus; "flac 8 kHz" for AMR), and the whole corpus at each quiet level."""
    folder = tmp_path_factory.mktemp("formats")
    rows = demo_rows()
    clips = [soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in rows]
    with ThreadPoolExecutor(2) as pool:  # the encoders release the GIL
        encoded = list(pool.map(formats_people_keep, clips[:CLIPS]))
    paths = {}
    for i, row in enumerate(rows):
        made = {"flac": ("flac", open(row["audio_filepath"], "rb").read())}
        if i < CLIPS:
            made.update({name: (ext, data) for name, (ext, data, _) in encoded[i].items()})
            made["flac 8 kHz"] = ("flac", flac_bytes(soxr.resample(clips[i], 16000, 8000), 8000))
        for name, (ext, data) in made.items():
            paths[name, i] = folder / f"{name.split(' ')[0]}-{len(paths)}.{ext}"
            paths[name, i].write_bytes(data)
    for level in QUIET_DBFS:
        for i, clip in enumerate(clips):
            # Float samples: 16 bits at -55 dBFS leave the peak ~60 steps, a loss of its own to the model whatever
            # the detector does.
            paths[f"quiet at {level} dBFS", i] = folder / f"quiet{level}-{i}.wav"
            soundfile.write(
                paths[f"quiet at {level} dBFS", i],
                clip / np.abs(clip).max() * 10 ** (level / 20),
                16000,
                subtype="FLOAT",
            )
    # Three clips in one m4a: the manifest's slice is the middle one.
    paths["m4a slice", 1] = folder / "three.m4a"
    paths["m4a slice", 1].write_bytes(formats_people_keep(np.concatenate(clips[:3]))["m4a"][1])
    return rows, clips, paths


def reference_of(name: str) -> str:
    return "flac 8 kHz" if name == "amr-nb" else "flac"


def within_reach(name: str, wer: float, flac: float) -> bool:
    """Within 1 WER point of the FLAC; AMR-NB, a phone codec at 12.2 kbit/s whose loss costs the demo model 2-4
    points against 8 kHz PCM (its decoded samples line up with the source's to the sample), only within 10 %."""
    return wer <= 10.0 if name == "amr-nb" else wer <= flac + 1.0


@pytest.mark.slow  # ~750 rows in one job: all 50 clips in each format (1 word is 0.2 points), and at 3 levels
def test_every_format_through_the_job_is_transcribed_as_flac_is(ray_session, files, tmp_path):
    from pipeline.transcribe import TranscribeConfig, run

    rows, clips, paths = files
    lines = []
    for (name, i), path in paths.items():
        line = {"id": f"{name}/{i}", "audio_filepath": str(path), "text": rows[i]["text"]}
        if name == "m4a slice":
            line.update(offset=round(len(clips[0]) / 16000, 6), duration=round(len(clips[1]) / 16000, 6))
        elif i % 2:  # half with the manifest's duration (as NeMo manifests have it), half without (a glob's rows)
            line["duration"] = round(len(clips[i]) / 16000, 3)
        lines.append(json.dumps(line) + "\n")
    (tmp_path / "m.jsonl").write_text("".join(lines))
    summary = run(
        TranscribeConfig(
            manifest=str(tmp_path / "m.jsonl"), output=str(tmp_path / "out"), model=DEMO_MODEL, num_beams=1
        )
    )
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert summary["rows_error"] == 0 and len(out) == len(paths), {i: r["error"] for i, r in out.items() if r["error"]}
    wer = {}
    for name in {name for name, _ in paths}:
        ids = sorted(i for n, i in paths if n == name)
        wer[name] = scoring.wer([rows[i]["text"] for i in ids], [out[f"{name}/{i}"]["text"] for i in ids])
        for i in ids:  # decoded to the end: as long as the clip (codecs pad by a frame or two)
            if name != "m4a slice":
                assert abs(out[f"{name}/{i}"]["duration_s"] - len(clips[i]) / 16000) < 0.1, (name, i)
    print("WER by format:", json.dumps(wer, indent=1))
    first = range(CLIPS)
    flac_first = {
        ref: scoring.wer([rows[i]["text"] for i in first], [out[f"{ref}/{i}"]["text"] for i in first])
        for ref in ("flac", "flac 8 kHz")
    }
    for name in formats_people_keep(clips[0][:1600]):
        assert within_reach(name, wer[name], flac_first[reference_of(name)]), (name, wer, flac_first)
    # The slice: the middle clip's words, its own length.
    assert out["m4a slice/1"]["text"] == out["flac/1"]["text"]
    assert out["m4a slice/1"]["duration_s"] == pytest.approx(len(clips[1]) / 16000, abs=1e-3)
    # Quiet speech keeps its words with the VAD on (the detector hears it; no row is emptied).
    for level in QUIET_DBFS:
        name = f"quiet at {level} dBFS"
        assert all(out[f"{name}/{i}"]["speech_s"] > 0.5 for i in range(len(rows))), name
        assert wer[name] <= wer["flac"] + 1.0, (name, wer[name], wer["flac"])


def test_an_m4a_slice_is_sample_exact_and_lengths_are_what_was_decoded():
    clips = [soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in demo_rows(3)]
    data = formats_people_keep(np.concatenate(clips))["m4a"][1]
    start_s, duration_s = len(clips[0]) / 16000, len(clips[1]) / 16000
    with PyAVAudio(io.BytesIO(data), "three.m4a") as source:  # at the file's own rate (44.1 kHz): no resampling
        whole = source.read()
        piece = source.read(start_s, duration_s)
        start, frames = round(start_s * source.rate), round(duration_s * source.rate)
    assert len(piece) == frames

    def rms_difference(lag: int) -> float:
        return float(np.sqrt(np.mean((piece - whole[start + lag : start + lag + frames]) ** 2)))

    # The same samples, not bit for bit: AAC's noise substitution draws on the decoder's random state, which the
    # seek starts afresh (~1e-4 rms here); one sample off is ten times as far.
    assert rms_difference(0) < 1e-3 and rms_difference(0) * 5 < min(rms_difference(-1), rms_difference(1))
    assert len(decode_audio(io.BytesIO(data), "three.m4a", 16000, offset_s=start_s, duration_s=duration_s)) == len(
        clips[1]
    )
    one = formats_people_keep(clips[0])
    # The headerless mp3s: libsndfile's length is a guess from the first frame (or counts the cover art as audio).
    for name in ("mp3 VBR, no Xing header", "mp3 CBR, cover art, no Info header"):
        assert abs(len(decode_audio(io.BytesIO(one[name][1]), name, 16000)) - len(clips[0])) < 0.1 * 16000
    with pytest.raises(AudioError, match="^truncated: .* asks for 9.00 s"):
        decode_audio(io.BytesIO(one["m4a"][1]), "a.m4a", 16000, duration_s=9.0)
