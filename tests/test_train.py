"""`s2t train` on a tiny corpus: the loss falls, and the checkpoint it saves loads in transformers with the same ids."""

import json

import numpy as np
import pytest
import soundfile
import torch

from jobs import cli
from s2t_model import Speech2Text

transformers = pytest.importorskip("transformers")

WORDS = {"one": ("un", "eins", "uno"), "two": ("deux", "zwei", "dos"), "three": ("trois", "drei", "tres")}
TONES = {"one": 300.0, "two": 600.0, "three": 1200.0}


@pytest.fixture(scope="module")
def tone_corpus(tmp_path_factory):
    """Each 'word' is a tone of its own pitch: learnable in a few dozen steps by a tiny model."""
    folder = tmp_path_factory.mktemp("tones")
    (folder / "audio").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        words = list(rng.choice(list(WORDS), size=rng.integers(1, 4)))
        audio = np.concatenate(
            [np.concatenate([np.sin(2 * np.pi * TONES[w] * np.arange(4000) / 16000), np.zeros(1600)]) for w in words]
        ) * 0.3 + 0.01 * rng.standard_normal(5600 * len(words))
        path = f"audio/{i:03d}.flac"
        soundfile.write(folder / path, audio.astype(np.float32), 16000)
        rows.append(
            {
                "id": str(i),
                "audio_filepath": path,
                "duration": len(audio) / 16000,
                "text": " ".join(words),
                **{f"text_{lang}": " ".join(WORDS[w][k] for w in words) for k, lang in enumerate(["fr", "de", "es"])},
            }
        )
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_train_lowers_the_loss_and_saves_a_checkpoint_transformers_loads(tone_corpus, tmp_path, capsys):
    out = tmp_path / "model"
    cli.main(
        [
            "train",
            "--corpus",
            str(tone_corpus),
            "--out",
            str(out),
            "--epochs",
            "40",
            "--vocab-size",
            "40",
            "--d-model",
            "32",
            "--encoder-layers",
            "1",
            "--decoder-layers",
            "1",
            "--heads",
            "2",
            "--ffn-dim",
            "64",
            "--conv-channels",
            "32",
            "--batch-frames",
            "600",
            "--warmup-steps",
            "20",
            "--lr",
            "3e-3",
            "--device",
            "cpu",
            "--log-every",
            "20",
            "--no-spec-augment",
        ]
    )
    losses = [
        float(line.split(" loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines() if " loss " in line
    ]
    assert len(losses) >= 3 and losses[-1] < 0.6 * losses[0], losses

    ours = Speech2Text.from_pretrained(str(out))
    reference = transformers.Speech2TextForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = transformers.Speech2TextTokenizer.from_pretrained(str(out))
    rows = [json.loads(line) for line in (tone_corpus / "manifest.jsonl").read_text().splitlines()][:4]
    waves = [soundfile.read(tone_corpus / r["audio_filepath"], dtype="float32")[0] for r in rows]
    features, lengths = ours.feature_extractor(waves, 16000)
    for lang in (None, "de"):
        ids = ours.generate(features, lengths, num_beams=2, max_new_tokens=12, tgt_lang=lang).ids
        for i, n in enumerate(lengths.tolist()):
            extra = {} if lang is None else {"forced_bos_token_id": tokenizer.lang_code_to_id[lang]}
            expected = reference.generate(
                features[i : i + 1, :n],
                attention_mask=torch.ones(1, n, dtype=torch.long),
                num_beams=2,
                max_new_tokens=12,
                do_sample=False,
                **extra,
            )[0, 1:].tolist()
            assert ids[i] == (expected[: expected.index(2) + 1] if 2 in expected else expected)
