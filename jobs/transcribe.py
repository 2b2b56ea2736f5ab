"""`s2t transcribe MANIFEST OUTPUT --model URI`: the corpus transcription job on Ray Data.

Runs on a local Ray (started here) or on the cluster that RAY_ADDRESS names; also a Ray job entry point:
    ray job submit -- python -m jobs.transcribe s3://bucket/manifest.jsonl s3://bucket/out --model s3://bucket/model
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.lease import LeaseHeld
from pipeline.output import SUMMARY, OutputError
from pipeline.rows import ManifestError
from pipeline.transcribe import TranscribeConfig, check_inputs, run, summary_line

EXIT_RETRYABLE = 75  # EX_TEMPFAIL (sysexits.h): rows remain that another run may do


def add_arguments(parser: argparse.ArgumentParser) -> None:
    TranscribeConfig.add_arguments(parser, positional=("manifest", "output"))
    parser.add_argument("--show", type=int, default=0, help="print this many transcripts next to their references")


def init_ray(verbose: bool = False) -> None:
    import ray

    from pipeline.progress import ray_init_options

    if not ray.is_initialized():
        ray.init(**ray_init_options(verbose))  # RAY_ADDRESS, when set, names the cluster to join


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = TranscribeConfig.from_args(args)
    try:
        check_inputs(config)  # before Ray starts: what cannot work is said in one line
    except (ManifestError, OutputError) as error:
        sys.exit(f"s2t transcribe: {error}")
    init_ray(config.verbose)
    try:
        summary = run(config)
    except LeaseHeld as error:
        sys.exit(f"s2t transcribe: {error}")
    print(summary_line(summary))
    if args.show:
        show(config, args.show)
    print(f"summary: {config.output.rstrip('/')}/{SUMMARY}")
    if summary["rows_retryable"] or summary["rows_missing"]:
        # Not done: a scheduler that reruns failed jobs gets them done (the rerun does those rows again).
        print(
            f"s2t transcribe: {summary['rows_retryable']} rows failed for the store's or our sake and "
            f"{summary['rows_missing']} have no row; run the same command again to do them",
            file=sys.stderr,
        )
        sys.exit(EXIT_RETRYABLE)
    return summary


def show(config: TranscribeConfig, count: int) -> None:
    """A few transcripts next to their references, the first rows of the output in id order."""
    from pipeline.output import output_filesystem, read_output

    fs, root = output_filesystem(config.output, config.options_for(config.output))
    rows = read_output(fs, root, lambda name: name in ("id", "text", "reference", "error")).to_pylist()
    for row in sorted(rows, key=lambda row: row["id"])[:count]:
        print(f"  {row['id']}")
        print(f"    reference: {row.get('reference')}")
        print(f"    {'error' if row['error'] else 'output'}:    {row['error'] or row['text']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m jobs.transcribe", description=__doc__)
    add_arguments(parser)
    main(parser.parse_args(sys.argv[1:]))
