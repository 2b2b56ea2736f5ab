"""The parts of OpenAI's audio API beyond text and segments: streaming, word timestamps, log-probabilities, and the
form fields the model cannot honour refused by name.

    stream=true                         Server-Sent Events: `transcript.text.delta` (`delta`, `logprobs` with
                                        include[]=logprobs) per segment as it is decoded, then `transcript.text.done`
                                        (`text`, `logprobs`, `usage`); json or text only
    timestamp_granularities[]=word      verbose_json gets `words: [{word, start, end}]` (s2t_model/alignment.py)
    timestamp_granularities[]=segment   verbose_json gets `segments` (also the default when none is named)
    include[]=logprobs                  json (and streaming) get `logprobs: [{token, logprob, bytes}]`
    chunking_strategy=auto              accepted: long uploads are always cut at the VAD's pauses; server_vad
                                        settings are refused
    prompt                              refused unless empty: Speech2Text takes no text prompt

Every unsupported value is a 400 that names what is supported, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from s2t_model import Transcript

GRANULARITIES = ("word", "segment")
INCLUDES = ("logprobs",)
STREAM_FORMATS = ("json", "text")
AUDIO_TOKENS_PER_S = 25  # encoder frames a second of audio becomes (10 ms features subsampled 4x): usage's input


class OptionError(Exception):
    """A form field the endpoint does not support as given: the message says what is supported."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message, self.code = message, code


@dataclass(frozen=True)
class ApiOptions:
    stream: bool = False
    words: bool = False  # timestamp_granularities[] has word
    segments: bool = True  # verbose_json carries segments
    logprobs: bool = False

    @property
    def timed(self) -> bool:
        """The decoding must also run the teacher-forced pass (words or log-probabilities)."""
        return self.words or self.logprobs


def parse_options(form, response_format: str) -> ApiOptions:
    """The request's multipart form (as the openai client sends it: `include[]`, `timestamp_granularities[]`,
    `chunking_strategy` or `chunking_strategy[type]`) -> ApiOptions, or OptionError."""
    stream = str(form.get("stream", "false")).lower()
    if stream not in ("true", "false", "1", "0"):
        raise OptionError(f"stream {stream!r}: send true or false", "invalid_stream")
    stream_on = stream in ("true", "1")
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise OptionError(
            f"timestamp_granularities {unknown}: supported are {', '.join(GRANULARITIES)}",
            "invalid_timestamp_granularities",
        )
    if granularities and response_format != "verbose_json":
        raise OptionError(
            "timestamp_granularities needs response_format verbose_json", "invalid_timestamp_granularities"
        )
    includes = form.getlist("include[]") + form.getlist("include")
    unknown = [i for i in includes if i not in INCLUDES]
    if unknown:
        raise OptionError(f"include {unknown}: supported is {', '.join(INCLUDES)}", "invalid_include")
    if includes and response_format != "json":
        raise OptionError("include logprobs needs response_format json", "invalid_include")
    if stream_on and response_format not in STREAM_FORMATS:
        raise OptionError(
            f"stream needs response_format {' or '.join(STREAM_FORMATS)}, not {response_format}", "invalid_stream"
        )
    chunking = form.get("chunking_strategy")
    settings = [key for key in form.keys() if key.startswith("chunking_strategy[")]
    if settings or (chunking is not None and chunking != "auto"):
        raise OptionError(
            'chunking_strategy: only "auto" is supported (long audio is cut at the speech detector\'s '
            "pauses into segments of at most max_segment_s)",
            "invalid_chunking_strategy",
        )
    if form.get("prompt"):
        raise OptionError(
            "prompt is not supported: Speech2Text decodes without a text prompt (send none)", "unsupported_prompt"
        )
    return ApiOptions(
        stream=stream_on,
        words="word" in granularities,
        segments=not granularities or "segment" in granularities,
        logprobs=bool(includes),
    )


def token_logprobs(model, result: Transcript) -> list[dict]:
    """A transcript's text tokens as OpenAI's logprobs entries: {token, logprob, bytes}; tags and </s> left out."""
    from s2t_model.alignment import text_pieces

    if result.token_logprobs is None:
        return []
    pieces, content = text_pieces(model, result.ids)
    out = []
    for piece, k in zip(pieces, content):
        token = piece.replace("▁", " ")
        out.append({"token": token, "logprob": result.token_logprobs[k], "bytes": list(token.encode())})
    return out


def timed_words(results: list[tuple[float, Transcript]]) -> list[dict]:
    """(segment start s, transcript) pairs -> verbose_json's words, in the upload's time."""
    return [
        {"word": w.word, "start": round(start + w.start_s, 3), "end": round(start + w.end_s, 3)}
        for start, result in results
        for w in result.words or []
    ]


def usage(duration_s: float, results: list[Transcript]) -> dict:
    audio_tokens = round(duration_s * AUDIO_TOKENS_PER_S)
    output = sum(len(r.ids) for r in results)
    return {
        "type": "tokens",
        "input_tokens": audio_tokens,
        "output_tokens": output,
        "total_tokens": audio_tokens + output,
        "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": 0},
    }


def event(payload: dict) -> str:
    """One Server-Sent Event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def delta_event(text: str, logprobs: list[dict] | None) -> str:
    payload = {"type": "transcript.text.delta", "delta": text}
    if logprobs is not None:
        payload["logprobs"] = logprobs
    return event(payload)


def done_event(text: str, logprobs: list[dict] | None, usage_: dict) -> str:
    payload = {"type": "transcript.text.done", "text": text}
    if logprobs is not None:
        payload["logprobs"] = logprobs
    payload["usage"] = usage_
    return event(payload)
