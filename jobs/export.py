"""`s2t export OUTPUT --format srt|vtt|txt|json --to DIR [--cues words]`: subtitle or text files, one per
recording of a transcription job's output (pipeline/export.py); also a Ray job entry point (`python -m jobs.export`)."""

import argparse
import json
import sys

from pipeline.export import ExportConfig, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ExportConfig.add_arguments(parser, positional=("output",))


def main(args: argparse.Namespace) -> dict:
    config = ExportConfig.from_args(args)
    from jobs.transcribe import init_ray

    init_ray()
    counts = run(config)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__)
    add_arguments(parser)
    main(parser.parse_args(sys.argv[1:]))
