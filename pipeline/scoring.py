"""WER on normalised text (jiwer) and BLEU (sacrebleu), for the summaries of the jobs."""

from __future__ import annotations

import re
import unicodedata

_PUNCTUATION = re.compile(r"[^\w\s']|_")


def normalise(text: str) -> str:
    """Lowercase, punctuation and hyphens to spaces, accents kept, whitespace collapsed (Whisper's basic normaliser)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def wer(references: list[str], hypotheses: list[str]) -> float | None:
    """Word error rate in percent over normalised text; None when there is nothing to score."""
    import jiwer

    pairs = [(normalise(r), normalise(h)) for r, h in zip(references, hypotheses) if r is not None and h is not None]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return None
    return 100 * jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])


def bleu(references: list[str], hypotheses: list[str]) -> tuple[float, str] | None:
    """sacrebleu corpus BLEU and its signature; None when there is nothing to score."""
    import sacrebleu

    pairs = [(r, h) for r, h in zip(references, hypotheses) if r is not None and h is not None]
    if not pairs:
        return None
    metric = sacrebleu.BLEU()
    score = metric.corpus_score([h for _, h in pairs], [[r for r, _ in pairs]])
    return score.score, str(metric.get_signature())
