"""The bundled demo data (`make demo-assets`): s2t_model.DEMO_CORPUS and DEMO_LONG_FORM are well-formed manifests of
16 kHz mono FLAC within their size budgets, whose targets are num2words' words and whose numbers the demo model never
heard in training."""

import json
import os

import numpy as np
import pytest
import soundfile

import s2t_model
from demo import corpus
from s2t_model import DEMO_CORPUS, DEMO_LONG_FORM, DEMO_MODEL

MB = 1_000_000
FIELDS = {"id", "audio_filepath", "duration", "text", "text_fr", "text_de", "text_es", "numbers"}
TEXTS = ("text", "text_fr", "text_de", "text_es")
# The demo model's training corpus: `s2t corpus spoken-numbers --seed 1 --count 24000` (see the Makefile).
TRAIN_SEED, TRAIN_COUNT = 1, 24_000


def manifest(folder):
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def flac_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, row["audio_filepath"])) for row in manifest(folder))


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def check_audio(folder, row):
    """The row's file is there, under its folder, 16 kHz mono FLAC of the row's duration; returns its samples."""
    path = row["audio_filepath"]
    assert not os.path.isabs(path) and ".." not in path.split("/")
    info = soundfile.info(os.path.join(folder, path))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16000, 1)
    assert row["duration"] == round(info.frames / 16000, 3)
    return soundfile.read(os.path.join(folder, path), dtype="int16")[0]


def check_texts(row):
    """The texts of one utterance are num2words' words for its numbers, as in tests/test_corpus.py."""
    num2words = pytest.importorskip("num2words").num2words
    numbers = row["numbers"]
    assert numbers and all(isinstance(n, int) and 0 <= n <= 999_999 for n in numbers)
    english = " ".join(num2words(n, lang="en") for n in numbers).lower().replace("-", " ").replace(",", "")
    assert row["text"] == " ".join(english.split())
    for lang in corpus.LANGS:
        assert row[f"text_{lang}"] == ", ".join(
            corpus.fix_num2words(num2words(n, lang=lang).lower(), lang) for n in numbers
        )


def training_numbers():
    # The training corpus's numbers come from its seed alone (demo/corpus.py), audio or not.
    return {n for i in range(TRAIN_COUNT) for n in corpus.Utterance.draw(TRAIN_SEED, i).numbers}


def test_paths_are_absolute_and_in_the_package():
    package = os.path.dirname(os.path.abspath(s2t_model.__file__))
    for path, name in [(DEMO_MODEL, "demo-model"), (DEMO_CORPUS, "demo-corpus"), (DEMO_LONG_FORM, "long-form")]:
        assert isinstance(path, str) and os.path.isabs(path) and path == os.path.join(package, "assets", name)
    assert {"DEMO_MODEL", "DEMO_CORPUS", "DEMO_LONG_FORM"} <= set(s2t_model.__all__)


def test_size_budgets():
    assert flac_bytes(DEMO_CORPUS) <= 3 * MB
    for row in manifest(DEMO_LONG_FORM):
        assert os.path.getsize(os.path.join(DEMO_LONG_FORM, row["audio_filepath"])) <= 3.5 * MB
    assert folder_bytes(DEMO_CORPUS) + folder_bytes(DEMO_LONG_FORM) <= 9 * MB


def test_demo_corpus():
    rows = manifest(DEMO_CORPUS)
    assert len(rows) == 50 and len({r["id"] for r in rows}) == 50
    assert sorted(os.listdir(os.path.join(DEMO_CORPUS, "audio"))) == sorted(
        os.path.basename(r["audio_filepath"]) for r in rows
    )
    for row in rows:
        assert set(row) == FIELDS
        audio = check_audio(DEMO_CORPUS, row)
        assert 1.0 < row["duration"] < 20.0 and 0.003 < np.sqrt(np.mean((audio / 32768.0) ** 2))
        check_texts(row)
    numbers = [n for r in rows for n in r["numbers"]]
    assert len({len(str(n)) for n in numbers}) >= 3  # short and long numbers
    assert 3 <= sum(len(r["numbers"]) > 1 for r in rows) <= 10  # a few utterances of several numbers


def test_long_form():
    recordings = manifest(DEMO_LONG_FORM)
    assert len(recordings) == 2
    for rec in recordings:
        assert set(rec) == FIELDS | {"segments"}
        audio = check_audio(DEMO_LONG_FORM, rec)
        assert 60 <= rec["duration"] <= 180
        segments = rec["segments"]
        assert len(segments) >= 10
        bounds = [0] + [k for s in segments for k in (s["start_s"] * 16000, s["end_s"] * 16000)] + [len(audio)]
        assert all(abs(k - round(k)) < 1e-6 for k in bounds)  # sample offsets (decimals of at most 7 digits)
        bounds = [round(k) for k in bounds]
        assert bounds == sorted(bounds)
        for start, end in zip(bounds[0::2], bounds[1::2]):  # the pauses: before, between and after the segments
            assert 0.3 * 16000 - 1 <= end - start <= 2.0 * 16000 + 1
            assert 10 ** (-70 / 20) < np.sqrt(np.mean((audio[start:end] / 32768.0) ** 2)) < 10 ** (-45 / 20)
        for seg, start, end in zip(segments, bounds[1::2], bounds[2::2]):
            assert set(seg) == {"start_s", "end_s", "numbers", "source_id", *TEXTS}
            assert 1.0 < (end - start) / 16000 < 20.0
            assert np.sqrt(np.mean((audio[start:end] / 32768.0) ** 2)) > 0.003  # speech
            check_texts(seg)
        assert rec["text"] == " ".join(s["text"] for s in segments)
        for lang in corpus.LANGS:
            assert rec[f"text_{lang}"] == ", ".join(s[f"text_{lang}"] for s in segments)
        assert rec["numbers"] == [n for s in segments for n in s["numbers"]]
    sources = [s["source_id"] for r in recordings for s in r["segments"]]
    assert len(sources) == len(set(sources))


def test_no_number_of_the_training_corpus():
    bundled = {n for folder in (DEMO_CORPUS, DEMO_LONG_FORM) for r in manifest(folder) for n in r["numbers"]}
    assert len(bundled) > 100 and not bundled & training_numbers()
