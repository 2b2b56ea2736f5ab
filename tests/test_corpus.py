"""`s2t corpus spoken-numbers`: deterministic for a seed whatever the workers, a well-formed manifest whose targets are
num2words' words, and held-out sets that leave out the numbers of another corpus."""

import json
import shutil

import numpy as np
import pytest
import soundfile

from jobs import cli, corpus

num2words = pytest.importorskip("num2words").num2words

SEED, COUNT = 0, 6  # seed 0's first six: one utterance of two numbers, and 601424, which num2words gets wrong in de/es
FIELDS = {"id", "audio_filepath", "duration", "text", "text_fr", "text_de", "text_es", "numbers"}

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed: apt-get install espeak-ng (`make test` does it as root where apt is)",
)


def make_corpus(folder, count=COUNT, seed=SEED, workers=1, *extra):
    cli.main(["corpus", "spoken-numbers", "--out", str(folder), "--count", str(count), "--seed", str(seed),
              "--workers", str(workers), *extra])
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
    for n, lang, words in [(1000, "de", "eintausend"), (1001, "de", "eintausendeins"), (21000, "de",
                           "einundzwanzigtausend"), (1001, "es", "mil uno"), (21, "es", "veintiuno"),
                           (21000, "fr", "vingt et un mille"), (80000, "fr", "quatre-vingt mille"),
                           (1100, "en", "one thousand one hundred"), (405612, "en",
                           "four hundred and five thousand six hundred and twelve")]:
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
        assert 0.003 < np.sqrt(np.mean(audio ** 2)) and np.max(np.abs(audio)) < 1.0

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
