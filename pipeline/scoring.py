"""WER on normalised text (jiwer) and BLEU (sacrebleu): the one definition of each that the job's summary, the report
and `s2t evaluate` use.

WER is jiwer's word error rate in percent, over the whole corpus (word edits of all rows / reference words of all
rows), of the texts after `normalise`; rows without a reference (None, or nothing left after normalising) are not
scored. `wer` computes it for lists of texts, `wer_counts` gives a row's share of it (what the summary adds up).
"""

from __future__ import annotations

import re
import unicodedata

_PUNCTUATION = re.compile(r"[^\w\s']|_")


def normalise(text: str) -> str:
    """NFKC, lowercase, then every character but letters, digits, whitespace and the apostrophe becomes a space (so
    punctuation goes and hyphens split words: "Twenty-one." -> "twenty one"), accents kept, whitespace collapsed.

    Close to Whisper's BasicTextNormalizer, which also drops bracketed words and splits at apostrophes."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def wer(references: list[str | None], hypotheses: list[str | None]) -> float | None:
    """Corpus word error rate in percent over normalised text (the module's definition); None when no row is scored."""
    counts = [wer_counts(r, h) for r, h in zip(references, hypotheses)]
    return wer_from_counts(sum(edits for edits, _ in counts), sum(words for _, words in counts))


# Sufficient statistics: per-row counts that, summed over any rows in any order (a Ray Data aggregation), give the
# same corpus WER and BLEU as jiwer and sacrebleu on those rows at once.
BLEU_STATS = 2 + 2 * 4  # hypothesis length, reference length, n-gram matches and totals for n = 1..4


def wer_counts(reference: str | None, hypothesis: str | None) -> tuple[int, int]:
    """(word edits, reference words) of one row over normalised text, jiwer's counts; (0, 0) when the row is not
    scored (no reference or no hypothesis, or a reference that normalises to nothing)."""
    import jiwer

    if reference is None or hypothesis is None:
        return 0, 0
    reference, hypothesis = normalise(reference), normalise(hypothesis)
    if not reference:
        return 0, 0
    if not hypothesis:
        return len(reference.split()), len(reference.split())
    words = jiwer.process_words(reference, hypothesis)
    return words.substitutions + words.deletions + words.insertions, words.hits + words.substitutions + words.deletions


def wer_from_counts(edits: int, words: int) -> float | None:
    return 100 * edits / words if words else None


def bleu_stats(references: list[str], hypotheses: list[str]) -> list[list[int]]:
    """sacrebleu's per-sentence statistics (its tokenizer, its n-gram counts), one list of BLEU_STATS per row.

    Uses sacrebleu's own extraction (a private method: the public API only scores whole corpora) so that the
    sums are exactly what `corpus_score` would have counted."""
    import sacrebleu

    if not hypotheses:
        return []
    return [list(map(int, s)) for s in sacrebleu.BLEU()._extract_corpus_statistics(hypotheses, [references])]


def bleu_from_stats(stats: list[int]) -> tuple[float, str] | None:
    """Corpus BLEU and its signature from summed statistics; None when no row was scored."""
    import sacrebleu

    if not stats or not stats[0] and not stats[1]:
        return None
    metric = sacrebleu.BLEU()
    metric.num_refs = 1  # what corpus_score records for its signature: one reference per row
    return metric._compute_score_from_stats(list(stats)).score, str(metric.get_signature())
