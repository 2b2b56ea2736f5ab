"""`s2t evaluate`: WER of the English transcripts and BLEU of each translation, on a corpus with references.

Transcripts go through the public path (`Speech2Text.transcribe`: features, batching, generation, decoding).
WER is the job summary's (`pipeline.scoring.wer`: jiwer over normalised text); BLEU is sacrebleu's corpus BLEU,
printed with its signature.
"""

from __future__ import annotations

import argparse
import json
import os

import soundfile
import soxr

from pipeline import scoring
from s2t_model import Speech2Text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or fsspec URL")
    parser.add_argument("--corpus", required=True, help="folder with manifest.jsonl (text, text_<lang>)")
    parser.add_argument("--langs", default="fr,de,es", help="translation targets to score ('' for ASR only)")
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--limit", type=int, help="score only the first N utterances")
    parser.add_argument("--device", default="cpu")


def read_manifest(folder: str) -> list[dict]:
    """NeMo JSONL rows with audio paths resolved against the corpus folder."""
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        row["audio_filepath"] = os.path.join(folder, row["audio_filepath"])
    return rows


def read_audio(path: str, sampling_rate: int):
    audio, rate = soundfile.read(path, dtype="float32")
    return audio if rate == sampling_rate else soxr.resample(audio, rate, sampling_rate)


def score(
    model: Speech2Text, rows: list[dict], langs: list[str], num_beams: int = 5, max_new_tokens: int | None = None
) -> dict[str, float]:
    """{"wer": %, "bleu_<lang>": BLEU, "bleu_signature": sacrebleu's} of the model on `rows`."""
    import sacrebleu

    rate = model.feature_extractor.sampling_rate
    waves = [read_audio(row["audio_filepath"], rate) for row in rows]
    results = {}
    for lang in [None, *langs]:
        hypotheses = model.transcribe(
            waves, sampling_rate=rate, num_beams=num_beams, tgt_lang=lang, max_new_tokens=max_new_tokens
        )
        if lang is None:
            results["wer"] = scoring.wer([row["text"] for row in rows], hypotheses)
        else:
            references = [[row[f"text_{lang}"] for row in rows]]
            bleu = sacrebleu.BLEU()
            results[f"bleu_{lang}"] = bleu.corpus_score(hypotheses, references).score
            results["bleu_signature"] = str(bleu.get_signature())
    return results


def main(args) -> None:
    model = Speech2Text.from_pretrained(args.model, device=args.device)
    rows = read_manifest(args.corpus)[: args.limit]
    langs = [lang for lang in args.langs.split(",") if lang]
    results = score(model, rows, langs, args.num_beams)
    print(f"{args.model} on {args.corpus}: {len(rows)} utterances, beam {args.num_beams}")
    print(f"  English WER {results['wer']:.2f} %")
    for lang in langs:
        print(f"  BLEU en->{lang} {results[f'bleu_{lang}']:.1f}")
    if langs:
        print(f"  BLEU signature: {results['bleu_signature']}")
