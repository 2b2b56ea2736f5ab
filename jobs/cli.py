"""The `s2t` command line: one subcommand per job; each job's module owns its arguments."""

from __future__ import annotations

import argparse

from . import bench_model, corpus, evaluate, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2t", description="Speech2Text transcription and translation on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmarks against peers, side by side in one process")
    targets = bench.add_subparsers(dest="target", required=True)
    model = targets.add_parser("model", help="features and generation: ours vs kaldi-native-fbank and transformers")
    bench_model.add_arguments(model)
    model.set_defaults(run=bench_model.main)
    scorer = commands.add_parser("evaluate", help="WER and BLEU of a checkpoint on a corpus with references")
    evaluate.add_arguments(scorer)
    scorer.set_defaults(run=evaluate.main)
    trainer = commands.add_parser("train", help="train a Speech2Text checkpoint on a corpus manifest")
    train.add_arguments(trainer)
    trainer.set_defaults(run=train.main)
    make_corpus = commands.add_parser("corpus", help="synthetic corpora for the demo model")
    corpora = make_corpus.add_subparsers(dest="target", required=True)
    numbers = corpora.add_parser("spoken-numbers", help="English speech of numbers (espeak-ng), ASR and fr/de/es targets")
    corpus.add_arguments(numbers)
    numbers.set_defaults(run=corpus.main)
    part = corpora.add_parser("subset", help="some utterances of a corpus, within a size budget (the demo corpus)")
    corpus.add_subset_arguments(part)
    part.set_defaults(run=corpus.subset_main)
    long = corpora.add_parser("long-form", help="long recordings joining a corpus' utterances with pauses, "
                              "with each utterance's place in them")
    corpus.add_long_form_arguments(long)
    long.set_defaults(run=corpus.long_form_main)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
