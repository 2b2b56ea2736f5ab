"""The `s2t` command line: one subcommand per job; each job's module owns its arguments."""

from __future__ import annotations

import argparse

from bench import (decode as bench_decode, feed as bench_feed, io as bench_io, model as bench_model,
                   pipeline as bench_pipeline, scale as bench_scale, serve as bench_serve, stream as bench_stream,
                   vad as bench_vad, words as bench_words)
from demo import corpus, evaluate, train

from . import backfill, export, report, serve, transcribe


def command(subparsers, name: str, help: str, add_arguments, run) -> None:
    parser = subparsers.add_parser(name, help=help)
    add_arguments(parser)
    parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2t", description="Speech2Text transcription and translation on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmarks against peers, side by side in one process")
    benchmarks = bench.add_subparsers(dest="target", required=True)
    command(benchmarks, "decode", "decode speed per format: libsndfile vs PyAV in one run, channel averaging",
            bench_decode.add_arguments, bench_decode.main)
    command(benchmarks, "feed", "feeding a GPU: each stage's audio-s per CPU-s (decode, detector, features, "
            "hand-offs) and the cores per GPU of the CPU-feature and the device path", bench_feed.add_arguments,
            bench_feed.main)
    command(benchmarks, "io", "one audio actor's rows/s from S3 with latency: per-file rows by io_concurrency, HF "
            "Parquet, WebDataset shards", bench_io.add_arguments, bench_io.main)
    command(benchmarks, "model", "features and generation: ours vs kaldi-native-fbank and transformers",
            bench_model.add_arguments, bench_model.main)
    command(benchmarks, "pipeline", "the whole Ray Data job vs the model alone on the same corpus: RTFx and ratio",
            bench_pipeline.add_arguments, bench_pipeline.main)
    command(benchmarks, "scale", "the job's control path at corpus scale: driver memory and time, first run and reruns",
            bench_scale.add_arguments, bench_scale.main)
    command(benchmarks, "serve", "the Serve endpoint with batching vs without: throughput, p50/p99 by concurrency",
            bench_serve.add_arguments, bench_serve.main)
    command(benchmarks, "stream", "a streamed 2-minute upload: time to the first event vs to the whole answer",
            bench_stream.add_arguments, bench_stream.main)
    command(benchmarks, "vad", "speech detection: audio-s/s per core, ours vs silero-vad's own forms, share of the job",
            bench_vad.add_arguments, bench_vad.main)
    command(benchmarks, "words", "word timestamps against true word boundaries; heads ranked for choosing them",
            bench_words.add_arguments, bench_words.main)
    command(commands, "transcribe", "transcribe (or translate) a corpus on Ray Data into a Parquet dataset",
            transcribe.add_arguments, transcribe.main)
    command(commands, "backfill", "translate the (id, language) pairs an output lacks",
            backfill.add_arguments, backfill.main)
    command(commands, "export", "one srt/vtt/txt/json file per recording of a transcription output",
            export.add_arguments, export.main)
    command(commands, "report", "one HTML page about a job's output: errors, WER/BLEU by group, confidence, throughput",
            report.add_arguments, report.main)
    command(commands, "serve", "the model behind an OpenAI-compatible audio API on Ray Serve",
            serve.add_arguments, serve.main)
    command(commands, "evaluate", "WER and BLEU of a checkpoint on a corpus with references",
            evaluate.add_arguments, evaluate.main)
    command(commands, "train", "train a Speech2Text checkpoint on a corpus manifest", train.add_arguments, train.main)
    make_corpus = commands.add_parser("corpus", help="synthetic corpora for the demo model")
    corpora = make_corpus.add_subparsers(dest="target", required=True)
    command(corpora, "spoken-numbers", "English speech of numbers (espeak-ng), ASR and fr/de/es targets",
            corpus.add_arguments, corpus.main)
    command(corpora, "subset", "some utterances of a corpus, within a size budget (the demo corpus)",
            corpus.add_subset_arguments, corpus.subset_main)
    command(corpora, "long-form", "long recordings joining a corpus' utterances with pauses, with each one's place",
            corpus.add_long_form_arguments, corpus.long_form_main)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
