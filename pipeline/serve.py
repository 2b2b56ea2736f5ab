"""The model on Ray Serve behind an OpenAI-compatible audio API, sharing the batch job's generation code.

    POST /v1/audio/transcriptions   multipart: file, model, language, response_format, temperature (ignored),
                                    stream, timestamp_granularities[], include[], chunking_strategy, prompt
                                    (pipeline/openai_api.py)
    POST /v1/audio/translations     the same plus target_language (speech-translation checkpoints have several)
    GET  /v1/models, GET /healthz

Concurrent requests meet in `@serve.batch` and go through `Speech2Text.transcribe_features` (length-sorted,
frame-budgeted), the path the Ray Data job uses. Bad input is a 4xx with an OpenAI-shaped JSON error, never a 500.
The token, the body's size and its arrival are checked first, by `http_guard.RequestGuard` (see there why there).
Requests come through `serve_ingress.Speech2TextIngress`, which answers a 503 with Retry-After for those of a
replica that died before answering.
"""

import asyncio
import hashlib
import io
import logging
import math
import os
import time

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import Field
from ray import serve
from starlette.datastructures import UploadFile as AnyUploadFile  # what FastAPI hands over
from starlette.exceptions import HTTPException as StarletteHTTPException

from s2t_model import Transcript
from s2t_model.segment import find_segments
from s2t_model.vad import shared_vad, speech_features

from .audio import AudioError, decode_audio
from .config import ModelConfig
from .http_guard import GuardLimits, RequestGuard, error_response, quote
from .metrics import GenerationMetrics, answered_metrics, observe
from .openai_api import (
    ApiOptions,
    OptionError,
    delta_event,
    done_event,
    parse_options,
    timed_words,
    token_logprobs,
    usage,
)
from .serve_ingress import Speech2TextIngress, relay_asgi
from .stages import load_model
from .subtitles import subtitles

logger = logging.getLogger(__name__)
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # a request body may exceed the upload limit by its form fields and boundaries


class ServeConfig(ModelConfig):
    model_name: str = Field("s2t", description="the model id /v1/models lists (requests may name any)")
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = Field(1, ge=1, description="fewest replicas")
    max_replicas: int | None = Field(None, description="most replicas when autoscaling (default: no autoscaling)")
    gpus_per_replica: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(1.0, gt=0)
    max_batch_size: int = Field(16, ge=1, description="requests decoded together (1: no batching)")
    batch_wait_ms: float = Field(20.0, ge=0, description="how long a batch waits to fill")
    # Uploads still arriving count too: 512 lets a few hundred slow or stalled clients (each dropped after
    # body_timeout_s) sit beside the good requests, which only a full replica would queue.
    max_ongoing_requests: int = Field(
        512, ge=1, description="requests a replica holds at once, uploads in progress included"
    )
    max_queued_requests: int = Field(256, ge=-1, description="requests waiting for a replica; more get 503")
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After a 503 for a full queue carries")
    max_upload_mb: float = Field(25.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0, description="a request body that stops arriving for this long gets 408")
    max_duration_s: float = Field(1800.0, gt=0, description="longest upload, in seconds of audio")
    api_key_env: str | None = Field(None, description="environment variable holding the bearer token to require")

    def guard_limits(self, api_key_sha256: str | None) -> GuardLimits:
        return GuardLimits(
            max_body_bytes=int(self.max_upload_mb * 1024 * 1024) + MULTIPART_OVERHEAD_BYTES,
            body_timeout_s=self.body_timeout_s,
            api_key_sha256=api_key_sha256,
        )

    def deployment_options(self) -> dict:
        options = dict(
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            # Serve's proxy answers a full queue itself: 503, and with this a Retry-After clients can honour.
            backpressure_config={"status_code": 503, "retry_after_s": self.retry_after_s},
            ray_actor_options={"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
        )
        if self.max_replicas and self.max_replicas > self.replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.max_batch_size,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


app = FastAPI(title="Speech2Text", description=__doc__)
# Every request passes the guard first, /docs and /openapi.json included; each replica sets its limits at start.
app.add_middleware(RequestGuard, limits=lambda: app.state.guard_limits)


@app.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    return error_response(error.status, error.message, error.code, error.headers)


@app.exception_handler(OptionError)
async def _option_error(request: Request, error: OptionError) -> JSONResponse:
    return error_response(400, error.message, error.code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return error_response(400, f"invalid request: {problems}", "invalid_request")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return error_response(error.status_code, str(error.detail), "http_error")


def render(response_format: str, text: str, segments: list[dict], duration: float, task: str, language: str):
    if response_format == "json":
        return {"text": text}
    if response_format == "text":
        return PlainTextResponse(text + "\n")
    if response_format == "verbose_json":
        return {
            "task": task,
            "language": language,
            "duration": round(duration, 3),
            "text": text,
            "segments": [
                {key: finite_or_none(value) if isinstance(value, float) else value for key, value in segment.items()}
                for segment in segments
            ],
        }
    body = subtitles([(s["start"], s["end"], s["text"]) for s in segments], response_format)
    return PlainTextResponse(body, media_type="text/vtt" if response_format == "vtt" else None)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or Infinity: a number that is not finite (a score, say) is reported as null, not as a 500."""
    return value if math.isfinite(value) else None


@app.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("500 on %s", request.url.path)  # the details go to the log, not to the client
    return error_response(500, f"internal error ({type(error).__name__})", "internal_error")


# Audio problems -> HTTP status: an unknown format is 415, a too long one 413, the rest 400.
AUDIO_STATUS = {"unreadable": 415, "too_long": 413}


@serve.deployment
@serve.ingress(app)
class Speech2TextServer:
    def __init__(self, config: dict, api_key_sha256: str | None = None):
        self.config = ServeConfig(**config)
        c = self.config
        # Fetched as the job's actors fetch it: the S3 client's retry settings, then the whole fetch again while the
        # store fails; after that the replica's error says the store is unavailable (Serve restarts the replica).
        self.model = load_model(c.model, c.options_for(c.model), c.row_retry(), c.device, c.dtype, c.cuda_graphs)
        app.state.guard_limits = c.guard_limits(api_key_sha256)
        self.decode_batch.set_max_batch_size(c.max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(c.batch_wait_ms / 1000)
        self.languages = self.model.tokenizer.langs if self.model.tokenizer else []
        self.vad = shared_vad() if c.vad == "silero" else None
        self.generation_metrics = GenerationMetrics("serve")
        self.open_streams = 0  # streamed answers in progress (a client gone mid-stream must not leave one open)
        self.cancelled_segments = 0  # segments of streams whose client went away before they were decoded
        self.decoding = 0  # requests in the batches being decoded now

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def decode_batch(self, requests: list[tuple]) -> list[Transcript]:
        """(16 kHz waveform, target language or None, timed, time.monotonic() when queued) of each request -> its
        `Transcript`; timed: with words and token log-probabilities (one more decoder pass, for the whole batch when
        one asks)."""
        started = time.monotonic()
        observe("s2t_serve_batch_requests", len(requests))
        for r in requests:
            if len(r) > 3:
                observe("s2t_serve_queue_wait_seconds", started - r[3])
        # In a thread, so the replica keeps taking requests (and health checks) while the batch decodes.
        timed = any(len(r) > 2 and r[2] for r in requests)
        self.decoding += len(requests)
        try:
            return await asyncio.to_thread(self.transcribe, [r[0] for r in requests], [r[1] for r in requests], timed)
        finally:
            self.decoding -= len(requests)

    def transcribe(self, waveforms: list[np.ndarray], langs: list[str | None], timed: bool = False) -> list[Transcript]:
        c, model = self.config, self.model
        features, _ = speech_features(
            model.feature_extractor,
            waveforms,
            model.feature_extractor.sampling_rate,
            c.max_frames,
            self.vad,
            model.device,
        )
        return model.transcribe_features(
            features, langs, c.decoding(word_timestamps=timed, logprobs=timed), self.generation_metrics
        )

    async def read_audio(self, file: UploadFile | None) -> tuple[np.ndarray, float]:
        limit = int(self.config.max_upload_mb * 1024 * 1024)
        if not isinstance(file, AnyUploadFile):
            raise RequestError(400, "no audio: send it as the multipart form field 'file'", "missing_file")
        name = quote(file.filename or "upload")
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise RequestError(413, f"{name}: more than {limit} bytes", "upload_too_large")
        if not data:
            raise RequestError(400, f"{name}: the file is empty", "empty_file")
        rate = self.model.feature_extractor.sampling_rate
        try:
            audio = await asyncio.to_thread(
                decode_audio,
                io.BytesIO(data),
                name,
                rate,
                min_duration_s=self.config.min_duration_s,
                max_duration_s=self.config.max_duration_s,
            )
        except AudioError as error:
            raise RequestError(AUDIO_STATUS.get(error.reason, 400), str(error), error.reason) from None
        return audio, len(audio) / rate

    async def respond(
        self, file, response_format: str, tgt_lang: str | None, task: str, options: ApiOptions = ApiOptions()
    ):
        formats = ("json", "text", "verbose_json", "srt", "vtt")
        if response_format not in formats:
            raise RequestError(
                400,
                f"response_format {quote(response_format)} is not one of {', '.join(formats)}",
                "invalid_response_format",
            )
        started = time.monotonic()
        audio, duration = await self.read_audio(file)
        rate = self.model.feature_extractor.sampling_rate
        # Long uploads are cut where the VAD hears pauses (in a thread: seconds for 30 min), and each piece joins the
        # batch like any request of its own.
        if duration > self.config.max_segment_s:
            found = await asyncio.to_thread(find_segments, audio, rate, self.config.max_segment_s)
            pieces = [(s.start_s, s.end_s) for s in found]
        else:
            pieces = [(0.0, duration)]
        if options.stream:  # from here on errors are events: the status line is sent with the first one
            return StreamingResponse(
                self.stream(audio, pieces, tgt_lang, options, duration, started), media_type="text/event-stream"
            )
        results = await asyncio.gather(
            *[
                self.decode_batch((audio[round(a * rate) : round(b * rate)], tgt_lang, options.timed, time.monotonic()))
                for a, b in pieces
            ]
        )
        heard = [(piece, r) for piece, r in zip(pieces, results) if r.speech]  # no speech: no segment
        segments = [
            {
                "id": i,
                "start": round(a, 3),
                "end": round(b, 3),
                "text": r.text,
                "tokens": r.ids,
                "avg_logprob": r.avg_logprob,
                "low_confidence": r.low_confidence,
                "temperature": 0.0,
            }
            for i, ((a, b), r) in enumerate(heard)
        ]
        text = " ".join(r.text for r in results if r.text)
        body = render(response_format, text, segments, duration, task, tgt_lang or "en")
        if options.words:
            body["words"] = timed_words([(a, r) for (a, _), r in heard])
        if response_format == "verbose_json" and not options.segments:
            del body["segments"]
        if options.logprobs:
            body["logprobs"] = [entry for r in results for entry in token_logprobs(self.model, r)]
        answered_metrics(duration, time.monotonic() - started)
        return body

    async def stream(
        self,
        audio: np.ndarray,
        pieces: list[tuple[float, float]],
        tgt_lang: str | None,
        options: ApiOptions,
        duration: float,
        started: float | None = None,
    ):
        """Server-Sent Events of one upload: a delta per segment with text, in order, as soon as it is decoded,
        then the whole text. The first segment is decoded on its own, so its delta does not wait for the rest; the
        rest then go in together. A client gone mid-stream cancels what is not decoded yet (Serve drops cancelled
        requests from its batches)."""
        rate = self.model.feature_extractor.sampling_rate

        def submit(a: float, b: float) -> asyncio.Future:
            return asyncio.ensure_future(
                self.decode_batch((audio[round(a * rate) : round(b * rate)], tgt_lang, options.timed, time.monotonic()))
            )

        tasks = [submit(*pieces[0])]
        self.open_streams += 1
        try:
            texts, results, logprobs = [], [], []
            for n in range(len(pieces)):
                result = await tasks[n]
                if n == 0:
                    tasks += [submit(a, b) for a, b in pieces[1:]]
                results.append(result)
                entries = token_logprobs(self.model, result) if options.logprobs else None
                logprobs += entries or []
                if result.text:
                    yield delta_event(result.text if not texts else " " + result.text, entries)
                    texts.append(result.text)
            answered_metrics(duration, time.monotonic() - (started or time.monotonic()))
            yield done_event(" ".join(texts), logprobs if options.logprobs else None, usage(duration, results))
        finally:
            self.cancelled_segments += sum(task.cancel() for task in tasks)  # False for those already done
            self.open_streams -= 1

    def stream_counts(self) -> dict:
        """Streamed answers in progress and segments cancelled so far (for tests and operators, through a
        deployment handle)."""
        return {"open": self.open_streams, "cancelled_segments": self.cancelled_segments}

    def batch_counts(self) -> dict:
        """Requests in the batches being decoded now (for tests and operators, through a deployment handle)."""
        return {"decoding": self.decoding}

    async def asgi(self, scope: dict, body: bytes):
        """A request relayed by `Speech2TextIngress` (its ASGI scope and whole body) -> this app's ASGI messages."""
        async for message in relay_asgi(app, scope, body):
            yield message

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        self,
        request: Request,
        file: UploadFile | None = File(None),
        model: str | None = Form(None),
        language: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float | None = Form(None),
        prompt: str | None = Form(None),
    ):
        options = parse_options(await request.form(), response_format)
        return await self.respond(file, response_format, None, "transcribe", options)

    @app.post("/v1/audio/translations")
    async def translations(
        self,
        request: Request,
        file: UploadFile | None = File(None),
        model: str | None = Form(None),
        target_language: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float | None = Form(None),
        prompt: str | None = Form(None),
    ):
        if target_language not in self.languages:
            given = "no target_language" if target_language is None else f"target_language {quote(target_language)}"
            raise RequestError(
                400,
                f"{given}: this model translates into {', '.join(self.languages) or 'nothing'}",
                "invalid_target_language",
            )
        options = parse_options(await request.form(), response_format)
        return await self.respond(file, response_format, target_language, "translate", options)

    @app.get("/v1/models")
    async def models(self):
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "s2t-ray",
                    "source": self.config.model,
                    "languages": self.languages,
                }
            ],
        }

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "model": self.config.model}  # answered: the replica is up, its model loaded


def build_app(args: dict) -> serve.Application:
    """The Serve application for `ServeConfig` fields: `s2t serve`, `serve deploy` (import_path
    pipeline.serve:build_app, args: the fields) and a KubeRay RayService all build it here."""
    config = ServeConfig(**args)
    api_key_sha256 = None
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ValueError(f"api_key_env names {config.api_key_env}, and that environment variable is not set")
        api_key_sha256 = hashlib.sha256(key.encode()).hexdigest()  # the replicas never see the key itself
    options = config.deployment_options()
    server = Speech2TextServer.options(**options).bind(config.model_dump(), api_key_sha256)
    # The ingress relays and holds no model: it reserves no CPU, so it never waits for one a model replica holds.
    return Speech2TextIngress.options(**{**options, "ray_actor_options": {"num_cpus": 0}}).bind(
        server, config.guard_limits(api_key_sha256), config.retry_after_s
    )
