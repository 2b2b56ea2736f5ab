"""The bundled demo model on the bundled demo clips: it really transcribes and translates, as transformers does."""

import json
import os

import jiwer
import pytest
import sacrebleu
import soundfile
import torch

from s2t_model import DEMO_CORPUS, DEMO_MODEL, Speech2Text

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def demo():
    model = Speech2Text.from_pretrained(DEMO_MODEL)
    with open(os.path.join(DEMO_CORPUS, "manifest.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    waves = [soundfile.read(os.path.join(DEMO_CORPUS, row["audio_filepath"]), dtype="float32")[0] for row in rows]
    return model, rows, waves


def test_demo_model_transcribes_the_demo_clips(demo):
    model, rows, waves = demo
    texts = model.transcribe(waves, sampling_rate=16000, num_beams=5)
    wer = jiwer.wer([row["text"] for row in rows], texts)
    assert wer <= 0.10, f"WER {wer:.3f}: {list(zip([r['text'] for r in rows], texts))[:5]}"


@pytest.mark.parametrize("lang", ["fr", "es"])
def test_demo_model_translates_with_the_target_language_forced(demo, lang):
    model, rows, waves = demo
    texts = model.transcribe(waves, sampling_rate=16000, num_beams=5, tgt_lang=lang)
    bleu = sacrebleu.corpus_bleu(texts, [[row[f"text_{lang}"] for row in rows]]).score
    assert bleu >= 50, f"BLEU {bleu:.1f}: {texts[:3]}"


def test_transformers_loads_the_demo_model_and_generates_the_same_ids(demo):
    model, rows, waves = demo
    reference = transformers.Speech2TextForConditionalGeneration.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tokenizer = transformers.Speech2TextTokenizer.from_pretrained(DEMO_MODEL)
    langs = [None, "fr", "de", "es"] * 3
    features, lengths = model.feature_extractor(waves[: len(langs)], sampling_rate=16000)
    ours = model.generate(features, lengths, num_beams=5, tgt_lang=langs).ids
    for i, (n, lang) in enumerate(zip(lengths.tolist(), langs)):
        forced = {} if lang is None else {"forced_bos_token_id": tokenizer.lang_code_to_id[lang]}
        expected = reference.generate(
            features[i : i + 1, :n],
            attention_mask=torch.ones(1, n, dtype=torch.long),
            num_beams=5,
            max_length=model.config.max_length,
            early_stopping=True,
            do_sample=False,
            **forced,
        )[0, 1:].tolist()
        assert ours[i] == (expected[: expected.index(2) + 1] if 2 in expected else expected), (i, lang)
