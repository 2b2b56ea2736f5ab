"""`s2t bench model`: our features and generation side by side with their peers, same inputs, same process.

Peers: kaldi-native-fbank and transformers' Speech2TextFeatureExtractor for features; transformers'
Speech2TextForConditionalGeneration for generation, at facebook/s2t-small-librispeech-asr's dimensions with random
weights (no checkpoint can be downloaded here). Both models load the very same folder. Peers are test-only
dependencies, imported here only.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from torch import Tensor

from s2t_model import FeatureExtractor, Speech2Text, Speech2TextConfig

# facebook/s2t-small-librispeech-asr's dimensions.
S2T_SMALL = dict(
    vocab_size=10000,
    d_model=256,
    encoder_layers=12,
    decoder_layers=6,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=2048,
    decoder_ffn_dim=2048,
    conv_channels=1024,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each utterance")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the best one counts")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-features", action="store_true")
    parser.add_argument("--step-batch", type=int, default=8, help="utterances in the decoder-step measurement")


def best_times(fns: list, repeats: int, device: str) -> list[float]:
    """Best wall time of each function; runs alternate (a, b, c, a, b, c, ...) so background load hits all alike."""

    def timed(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns:
        fn()  # warm-up: lazy initialisation, caches, CUDA kernels
    times = [[timed(fn) for fn in fns] for _ in range(repeats)]
    return [min(column) for column in zip(*times)]


def synthetic_speech(count: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    """Harmonic 'voiced' stretches with noise and pauses: realistic enough for features, shaped like speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    waves = []
    for _ in range(count):
        f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
        envelope = (np.sin(2 * np.pi * rng.uniform(1, 4) * t) > -0.3).astype(np.float64)
        waves.append((0.1 * voiced * envelope + 0.01 * rng.standard_normal(n)).astype(np.float32))
    return waves


def print_table(title: str, rows: list[tuple[str, float, str, float]], unit: str) -> None:
    """rows: (name, seconds, note, throughput), ours first; "ours is" = how many times faster ours ran."""
    print(f"\n{title}")
    print(f"  {'implementation':<42} {'seconds':>9} {unit:>12} {'ours is':>8}  note")
    ours = rows[0][1]
    for name, seconds, note, throughput in rows:
        print(f"  {name:<42} {seconds:9.4f} {throughput:12.1f} {seconds / ours:7.2f}x  {note}")


def bench_features(args) -> None:
    import kaldi_native_fbank as knf
    from transformers import Speech2TextFeatureExtractor

    waves = synthetic_speech(args.utterances, args.seconds)
    audio_seconds = args.utterances * args.seconds
    ours = FeatureExtractor()
    peer = Speech2TextFeatureExtractor()

    def run_ours():
        return ours(waves, sampling_rate=16000, device=args.device)

    def run_knf():
        options = knf.FbankOptions()
        options.frame_opts.dither = 0
        options.mel_opts.num_bins = 80
        for wave in waves:
            fbank = knf.OnlineFbank(options)
            fbank.accept_waveform(16000, wave * 32768)
            fbank.input_finished()
            np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])

    def run_transformers():
        return peer(waves, sampling_rate=16000, padding=True, return_tensors="np")

    sides = [
        (f"s2t_model fbank+CMVN ({args.device})", run_ours, "batched, torch"),
        ("kaldi-native-fbank (fbank only)", run_knf, "C++, one utterance at a time, no CMVN"),
        ("transformers Speech2TextFeatureExtractor", run_transformers, "numpy"),
    ]
    seconds = best_times([fn for _, fn, _ in sides], args.repeats, args.device)
    rows = [(name, t, note, audio_seconds / t) for (name, _, note), t in zip(sides, seconds)]
    print_table(f"Features: {args.utterances} utterances x {args.seconds:g} s", rows, "audio s / s")


def random_checkpoint(folder: str, tokenizer_from: str | None = None) -> None:
    """s2t-small dimensions with random weights whose hypotheses end at varied lengths, like real ones (20-60 tokens).

    The head is untied (as in the MuST-C checkpoints): tied to the embeddings, a random model's start token </s>
    tends to predict </s> again at once, and there would be nothing to time. tokenizer_from: a checkpoint whose
    tokenizer the model takes (and its vocabulary size), so that the job and Serve can time it on text; e.g.
    `python -c 'from bench.model import random_checkpoint as r; from s2t_model import DEMO_MODEL;
    r("/tmp/small", DEMO_MODEL)'`
    """
    torch.manual_seed(0)
    dimensions = dict(S2T_SMALL)
    tokenizer = None
    if tokenizer_from is not None:
        tokenizer = Speech2Text.from_pretrained(tokenizer_from).tokenizer
        dimensions["vocab_size"] = len(tokenizer)
    model = Speech2Text(Speech2TextConfig(**dimensions, tie_word_embeddings=False), tokenizer=tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 1 / p.shape[1] ** 0.5)
            elif "layer_norm.weight" not in name:
                p.normal_(0, 0.1)
        final_bias = model.model.decoder.layer_norm.bias
        model.lm_head.weight[model.config.eos_token_id] += final_bias / final_bias.norm()
    model.save_pretrained(folder)


def decoder_weights_read_per_step(model: Speech2Text) -> list[Tensor]:
    """The weight matrices one decoder step multiplies by: every decoder layer's projections except the
    cross-attention keys and values (computed once per utterance), and the output head."""
    names = ("self_attn.", "encoder_attn.q_proj", "encoder_attn.out_proj", "fc1", "fc2")
    weights = [
        p
        for n, p in model.model.decoder.layers.named_parameters()
        if n.endswith("weight") and p.dim() == 2 and any(k in n for k in names)
    ]
    return weights + [model.lm_head.weight]


def weight_read_floor(weights: list[Tensor], rows: int, repeats: int, device: str) -> tuple[float, float]:
    """(seconds, bytes/s): the step's matrix products alone, `rows` rows by each weight, on fresh copies of the weights
    (so that they come from memory, as in a real step, not from a cache warmed by the model). The floor of a step:
    a step cannot read its weights faster than this."""
    copies = [w.detach().clone() for w in weights]
    inputs = [torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in copies]

    def products():
        for x, w in zip(inputs, copies):
            torch.nn.functional.linear(x, w)

    (seconds,) = best_times([products], repeats, device)
    return seconds, sum(w.numel() * w.element_size() for w in copies) / seconds


def bench_decoder_step(args, model: Speech2Text, peer=None) -> None:
    """One decoder step (rows = utterances x beams) against its floor, the weight reads alone, same process.

    A step also reads every layer's cross-attention keys and values of its utterances (B x S x D x 2 x layers: as
    many bytes as the weights at batch 8 x 10 s); the second floor adds them at the same bandwidth, as what no
    implementation of the same arithmetic can avoid. The encoder, the same arithmetic in ours and transformers', is
    timed beside it: it bounds how much faster whole generation can get by a faster decoder.
    """
    from s2t_model.decoding import decoder_state

    steps = args.max_new_tokens
    features, lengths = model.feature_extractor(synthetic_speech(args.step_batch, args.seconds, seed=2), 16000)
    features, lengths = features.to(args.device), lengths.to(args.device)
    weights = decoder_weights_read_per_step(model)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    with torch.inference_mode():
        encoder_states, _ = model.encode(features, lengths)
    c = model.config
    cross_bytes = encoder_states.numel() * encoder_states.element_size() * 2 * c.decoder_layers
    print(
        f"\nDecoder step: s2t-small dimensions, {args.step_batch} utterances x {args.seconds:g} s, mean of {steps} "
        f"steps; a step reads {weight_bytes / 1e6:.1f} MB of weights and {cross_bytes / 1e6:.1f} MB of "
        f"cross-attention keys and values"
    )
    greedy_step = None
    for beams in (1, 5):

        @torch.inference_mode()
        def decode():
            state = decoder_state(model, features, lengths, beams, steps)
            tokens = torch.full((args.step_batch, beams), model.config.decoder_start_token_id, device=args.device)
            for _ in range(steps):
                tokens = state.logits(tokens).argmax(-1)
                if beams > 1:  # a beam step reorders the cache rows; keep the cost in the figure
                    state.reorder_rows(torch.arange(args.step_batch * beams, device=args.device).roll(1))

        @torch.inference_mode()
        def encode_only():
            decoder_state(model, features, lengths, beams, steps)

        with torch.inference_mode():
            t_total, t_encode = best_times([decode, encode_only], args.repeats, args.device)
            floor, bandwidth = weight_read_floor(weights, args.step_batch * beams, args.repeats, args.device)
        step = (t_total - t_encode) / steps
        greedy_step = greedy_step or step
        floor_with_cross = floor + cross_bytes / bandwidth
        print(
            f"  rows {args.step_batch * beams:4d} ({'greedy' if beams == 1 else f'beam {beams}'}): step "
            f"{step * 1e3:7.3f} ms, floor {floor * 1e3:7.3f} ms (weights at {bandwidth / 1e9:6.1f} GB/s): "
            f"{step / floor:5.2f}x the floor; {step / floor_with_cross:5.2f}x the floor with the cross-attention "
            f"keys and values ({floor_with_cross * 1e3:.3f} ms)"
        )
    if peer is not None:
        mask = torch.ones(features.shape[:2], dtype=torch.long, device=args.device)

        @torch.inference_mode()
        def ours_encoder():
            model.encode(features, lengths)

        @torch.inference_mode()
        def peer_encoder():
            peer.get_encoder()(input_features=features.to(peer.dtype), attention_mask=mask)

        t_ours, t_peer = best_times([ours_encoder, peer_encoder], args.repeats, args.device)
        print(
            f"  encoder, same utterances: ours {t_ours * 1e3:.1f} ms, transformers {t_peer * 1e3:.1f} ms "
            f"(= {t_ours / (steps * greedy_step):.2f}x the time of {steps} greedy steps)"
        )


def bench_generation(args) -> None:
    from transformers import Speech2TextForConditionalGeneration

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as folder:
        random_checkpoint(folder)
        ours = Speech2Text.from_pretrained(folder, device=args.device, dtype=dtype)
        peer = Speech2TextForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    bench_decoder_step(args, ours, peer)
    waves = synthetic_speech(args.utterances, args.seconds, seed=1)
    features, lengths = ours.feature_extractor(waves, 16000)
    features, lengths = features.to(args.device), lengths.to(args.device)
    mask = torch.ones(features.shape[:2], dtype=torch.long, device=args.device)  # equal lengths: no padding
    audio_seconds = args.utterances * args.seconds
    on_cuda = args.device.startswith("cuda")

    for num_beams in (1, 5):
        options = dict(num_beams=num_beams, max_new_tokens=args.max_new_tokens)
        results = {}

        def run_ours():
            results["ours"] = ours.generate(features, lengths, **options).ids

        def run_ours_with_features():  # what the Open ASR Leaderboard counts: features, generation, decoding
            waves_features, waves_lengths = ours.feature_extractor(waves, 16000, device=args.device)
            results["with features"] = ours.generate(waves_features, waves_lengths, **options).ids

        def run_ours_eager():
            ours.use_cuda_graphs = False
            try:
                results["eager"] = ours.generate(features, lengths, **options).ids
            finally:
                ours.use_cuda_graphs = True

        def run_peer():
            with torch.inference_mode():
                out = peer.generate(
                    input_features=features.to(dtype),
                    attention_mask=mask,
                    do_sample=False,
                    early_stopping=True,
                    **options,
                )
            results["peer"] = [row[1:][: row[1:].index(2) + 1] if 2 in row[1:] else row[1:] for row in out.tolist()]

        graphs = " + CUDA graphs" if on_cuda else ""
        sides = [
            (f"s2t_model generate ({args.device}, {args.dtype}{graphs})", run_ours, "ours"),
            ("  the same, features from waveforms included", run_ours_with_features, "with features"),
        ]
        if on_cuda:
            sides.append(("  the same without CUDA graphs", run_ours_eager, "eager"))
        sides.append(("transformers generate", run_peer, "peer"))
        times = best_times([fn for _, fn, _ in sides], args.repeats, args.device)
        tokens = sum(len(ids) for ids in results["ours"])
        rows = []
        for (name, _, key), seconds in zip(sides, times):
            same = sum(a == b for a, b in zip(results["ours"], results[key]))
            note = f"{tokens} tokens" if key == "ours" else f"ids identical to ours for {same}/{len(results['ours'])}"
            rows.append((name, seconds, note, audio_seconds / seconds))
        name = "greedy" if num_beams == 1 else f"beam {num_beams}"
        print_table(
            f"Generation, {name}: s2t-small dimensions, {args.utterances} x {args.seconds:g} s, "
            f"max {args.max_new_tokens} new tokens",
            rows,
            "RTFx",
        )


def main(args) -> None:
    torch.manual_seed(0)
    gpu = f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}{gpu}, dtype {args.dtype}"
    )
    if not args.skip_features:
        bench_features(args)
    if not args.skip_generation:
        bench_generation(args)
