"""The `s2t` command line itself: every subcommand's help, and what importing it costs."""

import argparse
import subprocess
import sys

import pytest

from jobs.cli import build_parser


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every subcommand, nested ones (bench model, corpus subset) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from subcommands(child, (*path, name))


def test_every_subcommands_help_states_real_defaults():
    helps = {" ".join(path): child.format_help() for path, child in subcommands(build_parser())}
    assert {"transcribe", "backfill", "serve", "export", "bench model", "corpus subset"} <= set(helps)
    assert [path for path, text in helps.items() if "PydanticUndefined" in text] == []
    # A field whose default is an empty dict (default_factory) says so.
    assert "fsspec options for every URL (default: {})" in " ".join(helps["transcribe"].split())


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_importing_the_cli_imports_neither_bench_nor_demo():
    run = python("import sys, jobs.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'bench', 'demo'}))")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "model"],
        ["bench", "io", "--help"],
        ["evaluate", "--help"],
        ["corpus", "subset", "--from", "x", "--out", "y"],
    ],
)
def test_bench_and_demo_commands_without_a_checkout_say_so_and_exit_2(argv):
    # As in an install from the wheel, which leaves bench/ and demo/ out: neither package is found.
    run = python(
        "import sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('bench', 'demo'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        f"from jobs.cli import main; main({argv!r})"
    )
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a checkout" in lines[0] and "pip install -e ." in lines[0], run.stderr


def test_bench_and_demo_commands_from_a_checkout_parse_their_own_arguments():
    args = build_parser().parse_args(["bench", "io", "--clips", "6"])
    assert args.clips == 6 and args.run.__module__ == "bench.io"
    args = build_parser().parse_args(["corpus", "subset", "--from", "a", "--out", "b", "--count", "3", "--max-mb", "1"])
    assert args.src == "a" and args.run.__module__ == "demo.corpus"
