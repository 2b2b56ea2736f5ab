"""`s2t backfill --manifest URI --output URI --model URI --tgt-langs fr,de,es [--retry-errors]`: fill in the
translations the output lacks, with the target language forced per row; also a Ray job entry point
(`python -m jobs.backfill ...`), run nightly by infra/kuberay/raycronjob-backfill.yaml."""

import argparse
import json
import logging
import sys

from jobs.transcribe import EXIT_RETRYABLE, init_ray
from pipeline.backfill import BackfillConfig, run
from pipeline.lease import LeaseHeld
from pipeline.output import OutputError
from pipeline.rows import ManifestError
from pipeline.transcribe import check_inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    BackfillConfig.add_arguments(parser)


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = BackfillConfig.from_args(args)
    try:
        check_inputs(config)  # before Ray starts: what cannot work is said in one line, as s2t transcribe says it
    except (ManifestError, OutputError) as error:
        sys.exit(f"s2t backfill: {error}")
    init_ray(config.verbose)
    try:
        summary = run(config)
    except LeaseHeld as error:
        sys.exit(f"s2t backfill: {error}")
    print(json.dumps({k: v for k, v in summary.items() if k != "bleu_signature"}))
    if summary["pairs_retryable"]:
        # Not done: a scheduler that reruns failed jobs gets them done (the rerun does those pairs again).
        print(
            f"s2t backfill: {summary['pairs_retryable']} pairs failed for the store's or our sake; run the same "
            f"command again to do them",
            file=sys.stderr,
        )
        sys.exit(EXIT_RETRYABLE)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m jobs.backfill", description=__doc__)
    add_arguments(parser)
    main(parser.parse_args(sys.argv[1:]))
