"""The `s2t` command line: one subcommand per job; each job's module owns its arguments."""

from __future__ import annotations

import argparse
import importlib

from . import backfill, export, report, serve, transcribe

# Checkout-only packages: the wheel leaves them out, and their subcommands import them only when they run.
CHECKOUT_ONLY = ("bench", "demo")


class CheckoutCommand(argparse.ArgumentParser):
    """A subcommand's parser; one made by `checkout_command` (bench/, demo/) imports its module, and so learns its
    arguments, only when it is parsed (run, or asked for --help): `import jobs.cli` and the jobs never import them."""

    source: tuple[str, str, str] | None = None  # module, its add_arguments function, its main function

    def load(self) -> None:
        if self.source is None:
            return
        (module_name, add_arguments, run), self.source = self.source, None
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name not in CHECKOUT_ONLY:
                raise
            self.exit(
                2,
                f"{self.prog}: needs a checkout of s2t-ray (`pip install -e .` in a clone); "
                f"the wheel leaves out {error.name}/\n",
            )
        getattr(module, add_arguments)(self)
        self.set_defaults(run=getattr(module, run))

    def parse_known_args(self, args=None, namespace=None):
        self.load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.load()
        return super().format_help()


def command(subparsers, name: str, help: str, add_arguments, run) -> None:
    parser = subparsers.add_parser(name, help=help)
    add_arguments(parser)
    parser.set_defaults(run=run)


def checkout_command(
    subparsers, name: str, help: str, module: str, add_arguments: str = "add_arguments", run: str = "main"
) -> None:
    parser = subparsers.add_parser(name, help=help)
    parser.source = (module, add_arguments, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2t", description="Speech2Text transcription and translation on Ray")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CheckoutCommand)
    bench = commands.add_parser("bench", help="benchmarks against peers, side by side in one process")
    benchmarks = bench.add_subparsers(dest="target", required=True)
    checkout_command(
        benchmarks,
        "decode",
        "decode speed per format: libsndfile vs PyAV in one run, channel averaging",
        "bench.decode",
    )
    checkout_command(
        benchmarks,
        "feed",
        "feeding a GPU: each stage's audio-s per CPU-s (decode, detector, features, "
        "hand-offs) and the cores per GPU of the CPU-feature and the device path",
        "bench.feed",
    )
    checkout_command(
        benchmarks,
        "io",
        "one audio actor's rows/s from S3 with latency: per-file rows by io_concurrency, HF Parquet, WebDataset shards",
        "bench.io",
    )
    checkout_command(
        benchmarks, "model", "features and generation: ours vs kaldi-native-fbank and transformers", "bench.model"
    )
    checkout_command(
        benchmarks,
        "pipeline",
        "the whole Ray Data job vs the model alone on the same corpus: RTFx and ratio",
        "bench.pipeline",
    )
    checkout_command(
        benchmarks,
        "scale",
        "the job's control path at corpus scale: driver memory and time, first run and reruns",
        "bench.scale",
    )
    checkout_command(
        benchmarks,
        "serve",
        "the Serve endpoint with batching vs without: throughput, p50/p99 by concurrency",
        "bench.serve",
    )
    checkout_command(
        benchmarks,
        "stream",
        "a streamed 2-minute upload: time to the first event vs to the whole answer",
        "bench.stream",
    )
    checkout_command(
        benchmarks,
        "vad",
        "speech detection: audio-s/s per core, ours vs silero-vad's own forms, share of the job",
        "bench.vad",
    )
    checkout_command(
        benchmarks,
        "words",
        "word timestamps against true word boundaries; heads ranked for choosing them",
        "bench.words",
    )
    command(
        commands,
        "transcribe",
        "transcribe (or translate) a corpus on Ray Data into a Parquet dataset",
        transcribe.add_arguments,
        transcribe.main,
    )
    command(
        commands,
        "backfill",
        "translate the (id, language) pairs an output lacks",
        backfill.add_arguments,
        backfill.main,
    )
    command(
        commands,
        "export",
        "one srt/vtt/txt/json file per recording of a transcription output",
        export.add_arguments,
        export.main,
    )
    command(
        commands,
        "report",
        "one HTML page about a job's output: errors, WER/BLEU by group, confidence, throughput",
        report.add_arguments,
        report.main,
    )
    command(
        commands,
        "serve",
        "the model behind an OpenAI-compatible audio API on Ray Serve",
        serve.add_arguments,
        serve.main,
    )
    checkout_command(commands, "evaluate", "WER and BLEU of a checkpoint on a corpus with references", "demo.evaluate")
    checkout_command(commands, "train", "train a Speech2Text checkpoint on a corpus manifest", "demo.train")
    make_corpus = commands.add_parser("corpus", help="synthetic corpora for the demo model")
    corpora = make_corpus.add_subparsers(dest="target", required=True)
    checkout_command(
        corpora, "spoken-numbers", "English speech of numbers (espeak-ng), ASR and fr/de/es targets", "demo.corpus"
    )
    checkout_command(
        corpora,
        "subset",
        "some utterances of a corpus, within a size budget (the demo corpus)",
        "demo.corpus",
        "add_subset_arguments",
        "subset_main",
    )
    checkout_command(
        corpora,
        "long-form",
        "long recordings joining a corpus' utterances with pauses, with each one's place",
        "demo.corpus",
        "add_long_form_arguments",
        "long_form_main",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
