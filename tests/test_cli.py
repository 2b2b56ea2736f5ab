"""The `s2t` command line itself: every subcommand's help, and what importing it costs."""

import argparse

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
