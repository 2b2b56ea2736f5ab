"""`s2t corpus spoken-numbers`: deterministic for a seed whatever the workers, a well-formed manifest whose targets are
num2words' words, and held-out sets that leave out the numbers of another corpus."""

import json
import shutil

import numpy as np
import pytest
import soundfile

from demo import corpus
from jobs import cli

num2words = pytest.importorskip("num2words").num2words

SEED, COUNT = 0, 6  # seed 0's first six: one utterance of two numbers, and 601424, which num2words gets wrong in de/es
FIELDS = {"id", "audio_filepath", "duration", "text", "text_fr", "text_de", "text_es", "numbers"}

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed: apt-get install espeak-ng (`make test` does it as root where apt is)",
)


def make_corpus(folder, count=COUNT, seed=SEED, workers=1, *extra):
    cli.main(
        [
            "corpus",
            "spoken-numbers",
            "--out",
            str(folder),
            "--count",
            str(count),
            "--seed",
            str(seed),
            "--workers",
            str(workers),
            *extra,
        ]
    )
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one-worker")
    return folder, make_corpus(folder)


# ------------------------------------------------------------------------------------------------ no espeak-ng


def test_num2words_mistakes_are_put_right():
    # Where num2words 0.5.14 is wrong (a thousands part ending in one); what it already gets right stays as it is.
    assert corpus.number_words(101000, "de") == "einhunderteintausend"
    assert corpus.number_words(601424, "de") == "sechshunderteintausendvierhundertvierundzwanzig"
    assert corpus.number_words(21000, "es") == "veintiún mil"
    assert corpus.number_words(31000, "es") == "treinta y un mil"
    assert corpus.number_words(101000, "es") == "ciento un mil"
    assert corpus.number_words(21021, "es") == "veintiún mil veintiuno"
    for n, lang, words in [
        (1000, "de", "eintausend"),
        (1001, "de", "eintausendeins"),
        (21000, "de", "einundzwanzigtausend"),
        (1001, "es", "mil uno"),
        (21, "es", "veintiuno"),
        (21000, "fr", "vingt et un mille"),
        (80000, "fr", "quatre-vingt mille"),
        (1100, "en", "one thousand one hundred"),
        (405612, "en", "four hundred and five thousand six hundred and twelve"),
    ]:
        assert corpus.number_words(n, lang) == words


def test_numbers_are_spread_over_sizes_and_some_utterances_say_several():
    drawn = [corpus.Utterance.draw(7, i) for i in range(3000)]
    numbers = [n for u in drawn for n in u.numbers]
    digits = np.bincount([len(str(n)) for n in numbers], minlength=7)[1:]
    assert all(abs(d / len(numbers) - 1 / 6) < 0.03 for d in digits), digits
    assert min(numbers) >= 0 and max(numbers) <= 999_999
    several = np.mean([len(u.numbers) > 1 for u in drawn])
    assert 0.17 < several < 0.23 and {len(u.numbers) for u in drawn} == {1, 2, 3}
    assert corpus.Utterance.draw(7, 5) == drawn[5] and corpus.Utterance.draw(8, 5) != drawn[5]


def test_exclusion_by_rejection_sampling():
    exclude = frozenset(range(0, 1000)) | frozenset(range(100_000, 500_000))
    numbers = [n for i in range(500) for n in corpus.Utterance.draw(1, i, exclude).numbers]
    assert not exclude & set(numbers) and {len(str(n)) for n in numbers} == {4, 5, 6}


def test_read_numbers_from_a_manifest_a_folder_or_a_list(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"numbers": [1, 20]}\n\n{"numbers": [300]}\n')
    (tmp_path / "numbers.txt").write_text("4\n50, 600\n")
    assert corpus.read_numbers(str(tmp_path)) == corpus.read_numbers(str(tmp_path / "manifest.jsonl")) == {1, 20, 300}
    assert corpus.read_numbers(str(tmp_path / "numbers.txt")) == {4, 50, 600}


# ---------------------------------------------------------------------------------------------- with espeak-ng


@needs_espeak
def test_espeak_ng_is_deterministic():
    utt = corpus.Utterance.draw(SEED, 1)
    first, rate = corpus.synthesize(utt.espeak_args())
    second, _ = corpus.synthesize(utt.espeak_args())
    assert rate == 22050 and len(first) > rate and np.array_equal(first, second)


@needs_espeak
def test_same_seed_same_files_whatever_the_workers_and_another_seed_differs(one_worker, tmp_path):
    folder, rows = one_worker
    other = make_corpus(tmp_path / "two", workers=2)
    assert other == rows
    for row in rows:
        assert (folder / row["audio_filepath"]).read_bytes() == (tmp_path / "two" / row["audio_filepath"]).read_bytes()
    reseeded = make_corpus(tmp_path / "seed", count=2, seed=SEED + 1)
    for a, b in zip(rows, reseeded):
        x, y = (soundfile.read(f / r["audio_filepath"])[0] for f, r in [(folder, a), (tmp_path / "seed", b)])
        assert len(x) != len(y) or not np.allclose(x, y)
        assert a["id"] != b["id"]


@needs_espeak
def test_manifest_rows_audio_and_targets(one_worker):
    folder, rows = one_worker
    assert [r["id"] for r in rows] == [f"spoken-numbers-{SEED}-{i:06d}" for i in range(COUNT)]
    assert any(len(r["numbers"]) > 1 for r in rows)  # the case of several numbers is covered
    for row in rows:
        assert set(row) == FIELDS
        info = soundfile.info(folder / row["audio_filepath"])
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16000, 1)
        assert row["duration"] == round(info.frames / 16000, 3) and 1.0 < row["duration"] < 20.0
        audio, _ = soundfile.read(folder / row["audio_filepath"])
        assert 0.003 < np.sqrt(np.mean(audio**2)) and np.max(np.abs(audio)) < 1.0

        numbers = row["numbers"]
        assert all(isinstance(n, int) and 0 <= n <= 999_999 for n in numbers)
        english = " ".join(num2words(n, lang="en") for n in numbers).lower().replace("-", " ").replace(",", "")
        assert row["text"] == " ".join(english.split())
        assert row["text"].replace(" ", "").isalpha() and row["text"].islower()
        for lang in corpus.LANGS:
            reference = [num2words(n, lang=lang).lower() for n in numbers]
            # num2words' own words, but where test_num2words_mistakes_are_put_right puts them right
            assert row[f"text_{lang}"] == ", ".join(corpus.fix_num2words(w, lang) for w in reference)
    affected = [r for r in rows if r["text_de"] != ", ".join(num2words(n, lang="de").lower() for n in r["numbers"])]
    assert [r["numbers"] for r in affected] == [[601424]]


@needs_espeak
def test_exclude_numbers_of_another_corpus(one_worker, tmp_path):
    folder, rows = one_worker
    seen = {n for r in rows for n in r["numbers"]}
    # The same seed would say the very same numbers; excluding them, it says none of them.
    held_out = make_corpus(tmp_path / "held-out", COUNT, SEED, 2, "--exclude-numbers", str(folder / "manifest.jsonl"))
    assert len(held_out) == COUNT and not seen & {n for r in held_out for n in r["numbers"]}


# ------------------------------------------------------------------------------------------- subset, long form


def test_subset_selection_keeps_order_and_quota_within_the_budget():
    sizes, counts = [100, 300, 50, 400, 80, 60], [1, 1, 1, 2, 1, 3]
    assert corpus.select(sizes, counts, 3, 10**9, multi=1) == [0, 1, 3]  # the first ones when all fit
    # The largest cap per number that fits 300 bytes is 100: rows 0 and 2 of one number, row 5 (20 a number).
    assert corpus.select(sizes, counts, 3, 300, multi=1) == [0, 2, 5]
    assert corpus.select(sizes, counts, 2, 10**9) == [0, 1]
    for count, budget, multi in [(3, 100, 1), (3, 10**9, 4), (6, 10**9, 1)]:
        with pytest.raises(ValueError):
            corpus.select(sizes, counts, count, budget, multi)


@needs_espeak
def test_subset_copies_the_chosen_utterances(one_worker, tmp_path):
    folder, rows = one_worker
    sizes = {r["id"]: (folder / r["audio_filepath"]).stat().st_size for r in rows}
    first = [r for r in rows if len(r["numbers"]) == 1][:2] + [r for r in rows if len(r["numbers"]) > 1][:1]
    chosen = []
    for budget in [sum(sizes.values()), 0.8 * sum(sizes[r["id"]] for r in first)]:
        out = tmp_path / f"subset-{budget:.0f}"
        cli.main(
            [
                "corpus",
                "subset",
                "--from",
                str(folder),
                "--out",
                str(out),
                "--count",
                "3",
                "--multi",
                "1",
                "--max-mb",
                f"{budget / 1e6:.6f}",
            ]
        )
        kept = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert len(kept) == 3 and sum(len(r["numbers"]) > 1 for r in kept) == 1
        assert [r for r in rows if r in kept] == kept  # rows unchanged, in the corpus' order
        assert sum(sizes[r["id"]] for r in kept) <= budget
        for row in kept:
            assert (out / row["audio_filepath"]).read_bytes() == (folder / row["audio_filepath"]).read_bytes()
        chosen.append(kept)
    assert chosen[0] == sorted(first, key=rows.index) and chosen[1] != chosen[0]  # all fit: the first ones


def make_long_form(corpus_folder, folder, seed=5, count=2, min_seconds=5, max_seconds=14):
    cli.main(
        [
            "corpus",
            "long-form",
            "--from",
            str(corpus_folder),
            "--out",
            str(folder),
            "--count",
            str(count),
            "--min-seconds",
            str(min_seconds),
            "--max-seconds",
            str(max_seconds),
            "--seed",
            str(seed),
        ]
    )
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def long_form(one_worker, tmp_path_factory):
    folder = tmp_path_factory.mktemp("long-form")
    return folder, make_long_form(one_worker[0], folder)


@needs_espeak
def test_long_form_segments_are_the_source_utterances_exactly(one_worker, long_form):
    source_folder, source_rows = one_worker
    source = {r["id"]: r for r in source_rows}
    folder, recordings = long_form
    assert [r["id"] for r in recordings] == ["long-form-5-000", "long-form-5-001"]
    used = [s["source_id"] for r in recordings for s in r["segments"]]
    assert len(used) == len(set(used)) and all(r["segments"] for r in recordings)  # no utterance twice
    for rec in recordings:
        assert set(rec) == {
            "id",
            "audio_filepath",
            "duration",
            "text",
            "text_fr",
            "text_de",
            "text_es",
            "numbers",
            "segments",
        }
        info = soundfile.info(folder / rec["audio_filepath"])
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16000, 1)
        assert rec["duration"] == round(info.frames / 16000, 3) and 5 <= rec["duration"] <= 14
        audio, _ = soundfile.read(folder / rec["audio_filepath"], dtype="int16")
        segments = rec["segments"]
        bounds = [0] + [k for s in segments for k in (s["start_s"] * 16000, s["end_s"] * 16000)] + [len(audio)]
        assert all(abs(k - round(k)) < 1e-6 for k in bounds)  # sample offsets (decimals of at most 7 digits)
        bounds = [round(k) for k in bounds]
        speech = 0
        for seg, start, end in zip(segments, bounds[1::2], bounds[2::2]):
            row = source[seg["source_id"]]
            original, _ = soundfile.read(source_folder / row["audio_filepath"], dtype="int16")
            assert np.array_equal(audio[start:end], original)
            assert abs((end - start) / 16000 - row["duration"]) <= 0.0005
            assert {k: seg[k] for k in ("text", "text_fr", "text_de", "text_es", "numbers")} == {
                k: row[k] for k in ("text", "text_fr", "text_de", "text_es", "numbers")
            }
            speech += end - start
        pauses = [audio[a:b] for a, b in zip(bounds[0::2], bounds[1::2])]  # before, between and after the segments
        assert len(pauses) == len(segments) + 1 and speech + sum(map(len, pauses)) == len(audio)
        for gap in pauses:
            assert 0.3 * 16000 - 1 <= len(gap) <= 2.0 * 16000 + 1
            rms = np.sqrt(np.mean((gap / 32768.0) ** 2))
            assert 10 ** (-70 / 20) < rms < 10 ** (-45 / 20)  # low-level noise, not digital silence
        assert rec["text"] == " ".join(s["text"] for s in segments)
        for lang in corpus.LANGS:
            assert rec[f"text_{lang}"] == ", ".join(s[f"text_{lang}"] for s in segments)
        assert rec["numbers"] == [n for s in segments for n in s["numbers"]]


@needs_espeak
def test_long_form_is_deterministic_for_a_seed(one_worker, long_form, tmp_path):
    folder, recordings = long_form
    assert make_long_form(one_worker[0], tmp_path / "again") == recordings
    for rec in recordings:
        assert (tmp_path / "again" / rec["audio_filepath"]).read_bytes() == (
            folder / rec["audio_filepath"]
        ).read_bytes()
    other = make_long_form(one_worker[0], tmp_path / "other", seed=6, count=1)
    assert other[0]["segments"] != recordings[0]["segments"]
    with pytest.raises(ValueError, match="too few utterances"):  # six utterances do not make a minute
        make_long_form(one_worker[0], tmp_path / "too-long", min_seconds=60, max_seconds=90)
