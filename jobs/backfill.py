"""`s2t backfill --manifest URI --output URI --model URI --tgt-langs fr,de,es [--retry-errors]`: fill in the
translations the output lacks, with the target language forced per row; also a Ray job entry point
(`python -m jobs.backfill ...`), run nightly by infra/kuberay/raycronjob-backfill.yaml."""

import argparse
import json
import logging
import sys

from pipeline.backfill import BackfillConfig, check_backfill_output, run
from pipeline.lease import LeaseHeld
from pipeline.output import OutputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    BackfillConfig.add_arguments(parser)


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = BackfillConfig.from_args(args)
    from jobs.transcribe import init_ray

    try:
        check_backfill_output(config)  # before Ray starts: an output that cannot work is said in one line
    except OutputError as error:
        sys.exit(f"s2t backfill: {error}")
    init_ray(config.verbose)
    try:
        summary = run(config)
    except LeaseHeld as error:
        raise SystemExit(f"not starting: {error}") from None
    print(json.dumps({k: v for k, v in summary.items() if k != "bleu_signature"}))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m jobs.backfill", description=__doc__)
    add_arguments(parser)
    main(parser.parse_args(sys.argv[1:]))
