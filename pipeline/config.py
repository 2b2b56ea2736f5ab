"""Typed job configuration: one pydantic model per job, read from a YAML file and overridden on the command line.

Every field becomes a `--field-name` option, so the command line, the YAML file and the Python API can never drift.
"""

from __future__ import annotations

import argparse
import json
import types
import typing

import fsspec
import pydantic
import yaml
from pydantic import Field

from s2t_model import DecodingOptions
from s2t_model.segment import MAX_SEGMENT_S
from s2t_model.speech2text import MIN_AVG_LOGPROB

from .audio import is_remote
from .storage import ClientRetry, RowRetry, fetch_checkpoint, with_client_retry


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
    """The model, how it decodes and hears speech, and the store it and the audio are read from: the options the
    jobs and the endpoint share, defined once."""

    model: str = Field(description="Speech2Text checkpoint folder, any fsspec URL")
    num_beams: int = Field(5, ge=1)
    max_frames: int | None = Field(
        None,
        ge=1,
        description="padded feature frames per generation batch (fairseq "
        "max_tokens; default: 24,000 on a CPU, 192,000 on a GPU)",
    )
    device: typing.Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU where there is one")
    dtype: typing.Literal["float32", "float16", "bfloat16"] = "float32"
    cuda_graphs: bool = Field(True, description="on a GPU, decode with CUDA graphs (false: eagerly)")
    vad: typing.Literal["silero", "off"] = Field(
        "silero", description='speech detection: audio without speech gets the text "" without running the model'
    )
    min_avg_logprob: float | None = Field(
        MIN_AVG_LOGPROB,
        description="transcripts whose mean log-probability per token is lower are flagged low_confidence",
    )
    min_duration_s: float = Field(0.1, ge=0)
    max_segment_s: float = Field(
        MAX_SEGMENT_S, gt=0, description="longer audio is cut at pauses into segments this long"
    )
    storage_options: dict = Field(default_factory=dict, description="fsspec options for every URL")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, Ceph, ...); AWS_* variables work too")
    s3_retry_mode: typing.Literal["standard", "adaptive", "legacy"] = Field(
        ClientRetry.mode, description="botocore's retry mode for S3 requests (docs/faults.md)"
    )
    s3_attempts: int = Field(
        ClientRetry.attempts, ge=1, description="botocore's attempts of one S3 request, the first included"
    )
    s3_connect_timeout_s: float = Field(ClientRetry.connect_timeout_s, gt=0)
    s3_read_timeout_s: float = Field(
        ClientRetry.read_timeout_s, gt=0, description="longest wait for the next bytes of an S3 answer before a retry"
    )
    read_attempts: int = Field(
        RowRetry.attempts,
        ge=1,
        description="reads of a file (a row's audio, the model) while "
        "the store fails (after the client's own retries), "
        "the first included; then it is unavailable",
    )
    read_backoff_s: float = Field(
        RowRetry.backoff_s, ge=0, description="a file's k-th read again waits a random time up to this x 2^k"
    )

    def storage(self, uri: str | None = None) -> dict:
        """fsspec options for `uri` (None: any URL): the given ones, the endpoint, and for S3 the client's retry
        settings under them (the given ones win)."""
        options = dict(self.storage_options)
        if self.s3_endpoint_url:
            options.setdefault("client_kwargs", {})["endpoint_url"] = self.s3_endpoint_url
        if uri is None or fsspec.core.split_protocol(uri)[0] in ("s3", "s3a"):
            options = with_client_retry(
                options,
                ClientRetry(self.s3_retry_mode, self.s3_attempts, self.s3_connect_timeout_s, self.s3_read_timeout_s),
            )
        return options

    def options_for(self, uri: str) -> dict | None:
        """Storage options only for URLs of a protocol that takes them (s3fs' are no use to the local filesystem)."""
        return self.storage(uri) if is_remote(uri) else None

    def row_retry(self) -> RowRetry:
        """How a read of the store is done again while the store fails (a row's audio, the model)."""
        return RowRetry(self.read_attempts, self.read_backoff_s)

    def fetch_model(self) -> str:
        """The checkpoint's local folder, fetched with the store's retries (`storage.fetch_checkpoint`)."""
        return fetch_checkpoint(self.model, self.options_for(self.model), self.row_retry())

    def decoding(self, **fields) -> DecodingOptions:
        """The `DecodingOptions` these options give (`fields`: the caller's own, e.g. word_timestamps)."""
        return DecodingOptions(
            num_beams=self.num_beams, max_frames=self.max_frames, min_avg_logprob=self.min_avg_logprob, **fields
        )


def _plain_type(annotation) -> type:
    """int for `int | None`, str for Literal[...] of strings, and so on: what argparse converts to."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is dict or annotation is dict:
        return dict
    return annotation if isinstance(annotation, type) else str
