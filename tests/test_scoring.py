"""One WER: `s2t evaluate`, the job's summary and the report score text the same way, and that way is jiwer's on
normalised text (checked against jiwer's own transformations where case and punctuation matter)."""

import jiwer
import pytest

from demo.evaluate import read_audio, read_manifest, score
from pipeline import scoring
from s2t_model import DEMO_CORPUS, DEMO_MODEL, Speech2Text

# jiwer's own normalisation for the cases below (no hyphens or apostrophes, where it and ours differ on purpose).
JIWER_NORMALISED = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


def jiwer_normalised_wer(references: list[str], hypotheses: list[str]) -> float:
    return 100 * jiwer.wer(
        references, hypotheses, reference_transform=JIWER_NORMALISED, hypothesis_transform=JIWER_NORMALISED
    )


def test_wer_ignores_case_and_punctuation_as_jiwer_does_once_told_to():
    references = ["Hello, World!", "Twenty ONE; three.", "  Four   hundred  "]
    hypotheses = ["hello world.", "twenty two three", "four hundred and"]
    expected = jiwer_normalised_wer(references, hypotheses)
    assert expected == pytest.approx(100 * 2 / 7)  # one substitution, one insertion, seven reference words
    assert scoring.wer(references, hypotheses) == pytest.approx(expected)
    assert 100 * jiwer.wer(references, hypotheses) > 50  # raw jiwer: every cased or punctuated word is an error
    # The summary's and the report's per-row counts add up to the same figure.
    counts = [scoring.wer_counts(r, h) for r, h in zip(references, hypotheses)]
    assert scoring.wer_from_counts(*map(sum, zip(*counts))) == pytest.approx(expected)


def test_wer_scores_only_rows_with_a_reference_and_a_hypothesis():
    assert scoring.wer(["one two", None, "...", "three"], ["one", "x", "y", None]) == pytest.approx(50)
    assert scoring.wer(["four"], [""]) == 100  # nothing said: every reference word deleted
    assert scoring.wer([None], ["x"]) is None


def test_s2t_evaluate_scores_wer_as_the_job_does():
    model = Speech2Text.from_pretrained(DEMO_MODEL)
    rows = read_manifest(DEMO_CORPUS)[:8]
    waves = [read_audio(row["audio_filepath"], 16000) for row in rows]
    hypotheses = model.transcribe(waves, sampling_rate=16000, num_beams=1)
    # The same clips with references as a person writes them (capitalised, with punctuation) and one word more, which
    # the model does not say: a WER of neither 0 nor 100.
    written = [dict(row, text=row["text"].capitalize().replace(" ", ", ", 1) + ", please.") for row in rows]
    got = score(model, written, langs=[], num_beams=1)["wer"]
    assert 0 < got < 50
    assert got == pytest.approx(jiwer_normalised_wer([row["text"] for row in written], hypotheses))
    assert got == pytest.approx(scoring.wer([row["text"] for row in written], hypotheses))
    # On the demo corpus itself (lowercase words, no punctuation) normalising changes nothing: docs/demo-model.md's
    # figure from before stays comparable.
    assert score(model, rows, langs=[], num_beams=1)["wer"] == pytest.approx(
        100 * jiwer.wer([row["text"] for row in rows], hypotheses)
    )
