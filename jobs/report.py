"""`s2t report OUT`: one HTML page about a job's output (summary, errors, WER/BLEU by duration and by manifest file,
confidence, worst rows, throughput), computed on Ray, to open from disk."""

import argparse
import json
import sys

from pipeline.report import report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the job's output folder, any fsspec URL")
    parser.add_argument("--html", help="where the page goes (default: OUTPUT/_report.html)")
    parser.add_argument(
        "--manifest",
        help="the manifest, for WER by manifest file (default: the one the last run read, from OUTPUT/_summary.json)",
    )
    parser.add_argument("--storage-options", type=json.loads, default=None, help="fsspec options (JSON)")
    parser.add_argument("--verbose", action="store_true", help="Ray's own output too")


def main(args: argparse.Namespace) -> str:
    from jobs.transcribe import init_ray
    from pipeline.progress import quiet_ray

    init_ray(args.verbose)
    quiet_ray(args.verbose)
    path = report(args.output, args.html, args.manifest, args.storage_options)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__)
    add_arguments(parser)
    main(parser.parse_args(sys.argv[1:]))
