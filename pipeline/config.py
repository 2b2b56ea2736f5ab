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
from pydantic import Field

from s2t_model import DecodingOptions
from s2t_model.segment import MAX_SEGMENT_S
from s2t_model.speech2text import MIN_AVG_LOGPROB


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
            default = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)})"
            help = (field.description or "") + default
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


class ModelConfig(JobConfig):
    """The model and how it decodes and hears speech: the options the jobs and the endpoint share, defined once."""

    model: str = Field(description="Speech2Text checkpoint folder, any fsspec URL")
    num_beams: int = Field(5, ge=1)
    max_frames: int | None = Field(None, ge=1, description="padded feature frames per generation batch (fairseq "
                                                          "max_tokens; default: 24,000 on a CPU, 192,000 on a GPU)")
    device: typing.Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU where there is one")
    dtype: typing.Literal["float32", "float16", "bfloat16"] = "float32"
    cuda_graphs: bool = Field(True, description="on a GPU, decode with CUDA graphs (false: eagerly)")
    vad: typing.Literal["silero", "off"] = Field("silero", description="speech detection: audio without speech "
                                                                       "gets the text \"\" without running the model")
    min_avg_logprob: float | None = Field(MIN_AVG_LOGPROB, description="transcripts whose mean log-probability per "
                                                                       "token is lower are flagged low_confidence")
    min_duration_s: float = Field(0.1, ge=0)
    max_segment_s: float = Field(MAX_SEGMENT_S, gt=0, description="longer audio is cut at pauses into segments "
                                                                  "this long")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for every URL")

    def decoding(self, **fields) -> DecodingOptions:
        """The `DecodingOptions` these options give (`fields`: the caller's own, e.g. word_timestamps)."""
        return DecodingOptions(num_beams=self.num_beams, max_frames=self.max_frames,
                               min_avg_logprob=self.min_avg_logprob, **fields)


def _plain_type(annotation) -> type:
    """int for `int | None`, str for Literal[...] of strings, and so on: what argparse converts to."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is dict or annotation is dict:
        return dict
    return annotation if isinstance(annotation, type) else str
