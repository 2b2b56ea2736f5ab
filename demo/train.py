"""`s2t train`: train a small Speech2Text on a corpus manifest, with s2t_model's own forward and loss.

One checkpoint does English ASR and speech translation, the way the hub's multilingual checkpoints work: a
translation target starts with its language tag (`<lang:fr>`), forced as the first token at decoding time, while an
English transcript starts with no tag. The tag is never a training target (its label is ignored), so an unforced
decoder starts with English words rather than guessing a language.

The corpus is NeMo JSONL (`audio_filepath`, `text`, and `text_<lang>` for translations). Features are computed once
and kept in memory; batches are length-bucketed under a frame budget and shuffled every epoch.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time

import sentencepiece
import soundfile
import torch

from demo.evaluate import read_manifest, score
from s2t_model import FeatureExtractor, Speech2Text, Speech2TextConfig, Tokenizer
from s2t_model.batching import frame_budget_batches
from s2t_model.model import shift_right
from s2t_model.tokenizer import LANGUAGES

LANG_CODES = "mustc"
START_ID, PAD_ID = (
    Speech2TextConfig.decoder_start_token_id,
    Speech2TextConfig.pad_token_id,
)  # pt fr ru nl ro it es de: transformers' tokenizer knows this list by name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="folder with manifest.jsonl (training set)")
    parser.add_argument("--held-out", help="folder with manifest.jsonl to report WER / BLEU on while training")
    parser.add_argument("--out", required=True, help="folder to save the trained checkpoint to")
    parser.add_argument("--langs", default="fr,de,es", help="translation targets (text_<lang> columns)")
    parser.add_argument("--vocab-size", type=int, default=400)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--encoder-layers", type=int, default=6)
    parser.add_argument("--decoder-layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn-dim", type=int, default=768)
    parser.add_argument("--conv-channels", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-minutes", type=float, default=55.0, help="stop after this much training time")
    parser.add_argument(
        "--batch-frames",
        type=int,
        default=8000,
        help="padded feature frames per batch (each utterance has 1 + len(langs) targets)",
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--spec-augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between held-out evaluations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--save-dtype",
        default="float16",
        choices=["float16", "float32"],
        help="dtype of the saved weights (float16 halves the checkpoint; loading casts back)",
    )
    parser.add_argument("--seed", type=int, default=0)


def compute_features(rows: list[dict], extractor: FeatureExtractor, device: str) -> list[torch.Tensor]:
    """(T, 80) float16 features of every utterance, in memory: computed once, read every epoch."""
    features = []
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        waves = [soundfile.read(row["audio_filepath"], dtype="float32")[0] for row in chunk]
        batch, lengths = extractor(
            waves, sampling_rate=soundfile.info(chunk[0]["audio_filepath"]).samplerate, device=device
        )
        features += [f[:n].half().cpu() for f, n in zip(batch, lengths.tolist())]
    return features


def train_tokenizer(rows: list[dict], langs: list[str], vocab_size: int, folder: str) -> Tokenizer:
    """A sentencepiece model over all targets, fairseq ids (<s> <pad> </s> <unk> = 0..3), language tags as pieces."""
    text_path = os.path.join(folder, "targets.txt")
    with open(text_path, "w") as f:
        for row in rows:
            f.write(row["text"] + "\n")
            for lang in langs:
                f.write(row[f"text_{lang}"] + "\n")
    prefix = os.path.join(folder, "sentencepiece.bpe")
    sentencepiece.SentencePieceTrainer.train(
        input=text_path,
        model_prefix=prefix,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
        user_defined_symbols=[f"<lang:{lang}>" for lang in LANGUAGES[LANG_CODES]],
    )
    processor = sentencepiece.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    return Tokenizer(prefix + ".model", vocab, lang_codes=LANG_CODES)


def targets(rows: list[dict], tokenizer: Tokenizer, langs: list[str]) -> list[list[list[int]]]:
    """Per utterance: the ids of its English transcript (no language tag) and of each translation (tagged)."""

    def untagged(text: str) -> list[int]:
        # A tokenizer with languages prefixes every text with one (its default tgt_lang): not the transcript.
        ids = tokenizer.encode(text)
        return ids[1:] if tokenizer.langs else ids

    return [
        [untagged(row["text"])] + [tokenizer.encode(row[f"text_{lang}"], tgt_lang=lang) for lang in langs]
        for row in rows
    ]


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Two frequency masks (up to 15 bins) and two time masks (up to 10% of each utterance), set to 0 (the mean)."""
    batch, frames, bins = features.shape
    features = features.clone()
    for b in range(batch):
        for _ in range(2):
            width = int(torch.randint(0, 16, (1,), generator=generator))
            start = int(torch.randint(0, bins - width + 1, (1,), generator=generator))
            features[b, :, start : start + width] = 0
            max_width = max(1, int(lengths[b]) // 10)
            width = int(torch.randint(0, max_width + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, int(lengths[b]) - width), (1,), generator=generator))
            features[b, start : start + width, :] = 0
    return features


def collate(batch: list[int], features: list[torch.Tensor], all_targets: list[list[list[int]]], tokenizer: Tokenizer):
    """Utterances -> padded features (U, T, 80), lengths (U,), and for every target of every utterance: decoder
    inputs (R, L), labels (R, L) (padding and language tags ignored: -100) and the utterance it reads (R,)."""
    utterances = [features[i] for i in batch]
    lengths = torch.tensor([len(f) for f in utterances])
    padded = torch.zeros(len(batch), int(lengths.max()), utterances[0].shape[-1])
    for row, f in enumerate(utterances):
        padded[row, : len(f)] = f.float()
    rows = [(u, ids) for u, i in enumerate(batch) for ids in all_targets[i]]
    labels = torch.full((len(rows), max(len(ids) for _, ids in rows)), -100, dtype=torch.long)
    for row, (_, ids) in enumerate(rows):
        labels[row, : len(ids)] = torch.tensor(ids)
    encoder_rows = torch.tensor([u for u, _ in rows])
    # Decoder inputs keep the language tag (it conditions the translation); the loss ignores it.
    decoder_input_ids = shift_right(labels, START_ID, PAD_ID)
    tags = torch.tensor(sorted(tokenizer.lang_code_to_id.values()))
    return padded, lengths, decoder_input_ids, labels.masked_fill(torch.isin(labels, tags), -100), encoder_rows


def init_embeddings(model: Speech2Text) -> None:
    """fairseq's token embedding init, N(0, d^-1/2): with the head tied to it, logits start near 0, not at +-d."""
    embed = model.model.decoder.embed_tokens
    with torch.no_grad():
        embed.weight.normal_(0, model.config.d_model**-0.5)
        embed.weight[model.config.pad_token_id] = 0


def learning_rate(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then inverse square-root decay (fairseq's schedule for S2T)."""
    return peak * min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))


def main(args) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    langs = [lang for lang in args.langs.split(",") if lang]
    rows = read_manifest(args.corpus)
    extractor = FeatureExtractor()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(rows, langs, args.vocab_size, tmp)
        os.makedirs(args.out, exist_ok=True)
        tokenizer.save_pretrained(args.out)  # copies the spm model out of the temporary folder
    tokenizer = Tokenizer.from_pretrained(args.out)
    started = time.time()
    features = compute_features(rows, extractor, args.device)
    print(
        f"{len(rows)} utterances, {sum(len(f) for f in features) / 100 / 3600:.2f} h, "
        f"features in {time.time() - started:.0f} s"
    )
    held_out = read_manifest(args.held_out)[:200] if args.held_out else []  # greedy on 200: quick, indicative

    config = Speech2TextConfig(
        vocab_size=len(tokenizer),
        d_model=args.d_model,
        encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers,
        encoder_attention_heads=args.heads,
        decoder_attention_heads=args.heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        conv_channels=args.conv_channels,
        dropout=0.1,
        max_source_positions=3000,
        max_target_positions=256,
        max_length=200,
    )
    model = Speech2Text(config, extractor, tokenizer)
    init_embeddings(model)
    model.to(args.device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocabulary {len(tokenizer)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    all_targets = targets(rows, tokenizer, langs)
    generator = torch.Generator().manual_seed(args.seed)
    step, train_started = 0, time.time()
    model.train()
    for epoch in range(args.epochs):
        # Bucket by length with a little noise so that batches differ from epoch to epoch.
        noisy = [len(f) + random.uniform(0, 20) for f in features]
        batches = frame_budget_batches(noisy, args.batch_frames)
        random.shuffle(batches)
        total, count = 0.0, 0
        for batch in batches:
            padded, lengths, decoder_input_ids, labels, encoder_rows = collate(batch, features, all_targets, tokenizer)
            if args.spec_augment:
                padded = spec_augment(padded, lengths, generator)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args.lr, args.warmup_steps)
            _, loss = model(
                padded.to(args.device),
                lengths.to(args.device),
                decoder_input_ids.to(args.device),
                labels=labels.to(args.device),
                label_smoothing=args.label_smoothing,
                encoder_rows=encoder_rows.to(args.device),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total, count, step = total + loss.item(), count + 1, step + 1
            if step % args.log_every == 0:
                print(
                    f"epoch {epoch} step {step} loss {total / count:.3f} "
                    f"lr {learning_rate(step, args.lr, args.warmup_steps):.2e} "
                    f"{(time.time() - train_started) / 60:.1f} min",
                    flush=True,
                )
            if held_out and step % args.eval_every == 0:
                model.eval()
                print(
                    f"  held-out (greedy): {score(model, held_out, langs, num_beams=1, max_new_tokens=60)}", flush=True
                )
                model.train()
            if time.time() - train_started > args.max_minutes * 60:
                break
        else:
            continue
        break
    model.eval()
    model.save_pretrained(args.out, dtype=getattr(torch, args.save_dtype))
    print(f"saved {args.out} after {step} steps, {(time.time() - train_started) / 60:.1f} min")
    if held_out:
        print(f"held-out (greedy): {score(model, held_out, langs, num_beams=1, max_new_tokens=60)}")
