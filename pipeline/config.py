"""Typed job configuration: one pydantic model per job, read from a YAML file and overridden on the command line.

Every field becomes a `--field-name` option, so the command line, the YAML file and the Python API can never drift.
"""

from __future__ import annotations

import argparse
import json
import types
import typing

import pydantic
import yaml


class JobConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    hidden_options: typing.ClassVar[tuple[str, ...]] = ()  # fields a subclass does not offer on its command line
    optional_values: typing.ClassVar[dict[str, str]] = {}  # text options that may be given bare: the value then

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "JobConfig":
        import fsspec

        with fsspec.open(path, "rt") as f:
            values = yaml.safe_load(f) or {}
        return cls(**{**values, **overrides})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, positional: tuple[str, ...] = ()) -> None:
        parser.add_argument("--config", help="YAML file with any of the options below (the command line wins)")
        for name, field in cls.model_fields.items():
            if name in cls.hidden_options:
                continue
            kind = _plain_type(field.annotation)
            help = (field.description or "") + ("" if field.is_required() else f" (default: {field.default})")
            if name in positional:
                parser.add_argument(name, nargs="?", help=help)
                continue
            flag = "--" + name.replace("_", "-")
            if kind is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
            elif name in cls.optional_values:
                parser.add_argument(flag, nargs="?", const=cls.optional_values[name], default=None, help=help)
            elif kind is dict:
                parser.add_argument(flag, type=json.loads, default=None, help=help + " (JSON)")
            else:
                parser.add_argument(flag, type=kind if kind in (int, float) else str, default=None, help=help)

    @classmethod
    def options_table(cls, skip: tuple[str, ...] = ()) -> str:
        """A Markdown table of the command-line options: option, type, default, what (docs/configuration.md)."""
        rows = ["| option | type | default | what |", "| --- | --- | --- | --- |"]
        for name, field in cls.model_fields.items():
            if name in cls.hidden_options or name in skip:
                continue
            kind = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
            type_name = " \\| ".join(map(str, kind)) if kind else _plain_type(field.annotation).__name__
            default = "required" if field.is_required() else f"`{field.get_default(call_default_factory=True)}`"
            what = (field.description or "").replace("|", "\\|")
            rows.append(f"| `--{name.replace('_', '-')}` | {type_name} | {default} | {what} |")
        return "\n".join(rows) + "\n"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "JobConfig":
        given = {n: getattr(args, n) for n in cls.model_fields if getattr(args, n, None) is not None}
        try:
            return cls.from_yaml(args.config, **given) if args.config else cls(**given)
        except pydantic.ValidationError as error:
            raise SystemExit(f"invalid configuration: {error}") from None


def _plain_type(annotation) -> type:
    """int for `int | None`, str for Literal[...] of strings, and so on: what argparse converts to."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is dict or annotation is dict:
        return dict
    return annotation if isinstance(annotation, type) else str
