"""The job's and the endpoint's own metrics, through Ray's metrics API: each process records into Ray's metrics
agent, which exports them in Prometheus format where Ray exports its own (`ray start --metrics-export-port`), every
name prefixed `ray_` by Ray. infra/grafana/s2t-dashboard.json charts them; docs/observability.md lists them.

    job (pipeline/progress.py, at the write):  s2t_job_rows_total{outcome, reason}, s2t_job_audio_seconds_total,
        s2t_job_rows_no_speech_total, s2t_job_rows_low_confidence_total
    generation (job and endpoint, `GenerationMetrics`):  s2t_generation_batch_rows, s2t_generation_frames_total{kind}
    endpoint (pipeline/serve.py, Serve's metrics: deployment and replica tags added):  s2t_serve_audio_seconds_total,
        s2t_serve_request_rtfx, s2t_serve_batch_requests, s2t_serve_queue_wait_seconds, s2t_serve_responses_total

Metric objects are made once per process (`_metric`): Ray registers a name once, and a batch's few `inc` calls are
all the per-batch cost.
"""

from __future__ import annotations

import functools

# Histogram boundaries: rows per generation batch, requests per Serve batch, seconds of queue wait, RTFx.
BATCH_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
WAIT_S = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
RTFX = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]

JOB = {
    "s2t_job_rows_total": (
        "Counter",
        "output rows written, by outcome (ok, no_speech, error) and error reason",
        ("outcome", "reason"),
    ),
    "s2t_job_audio_seconds_total": ("Counter", "seconds of audio in rows written without error", ()),
    "s2t_job_rows_no_speech_total": ("Counter", 'rows written with the text "": speech detection found none', ()),
    "s2t_job_rows_low_confidence_total": ("Counter", "rows written flagged low_confidence (min_avg_logprob)", ()),
}
GENERATION = {
    "s2t_generation_batch_rows": (
        "Histogram",
        "utterances per generation batch (length-sorted, frame-budgeted)",
        ("component",),
        BATCH_ROWS,
    ),
    "s2t_generation_frames_total": (
        "Counter",
        "feature frames through generation: kind=speech (the utterances') or padding (up to each batch's longest)",
        ("component", "kind"),
    ),
}
SERVE = {
    "s2t_serve_audio_seconds_total": ("Counter", "seconds of audio in requests answered 200", ()),
    "s2t_serve_request_rtfx": ("Histogram", "audio seconds / seconds to answer, per request answered 200", (), RTFX),
    "s2t_serve_batch_requests": (
        "Histogram",
        "requests (or long uploads' segments) decoded in one @serve.batch",
        (),
        BATCH_ROWS,
    ),
    "s2t_serve_queue_wait_seconds": (
        "Histogram",
        "seconds a request's audio waited for its batch to start",
        (),
        WAIT_S,
    ),
    "s2t_serve_responses_total": (
        "Counter",
        'responses by HTTP status and error code ("" when 200)',
        ("status", "code"),
    ),
}
NAMES = {**JOB, **GENERATION, **SERVE}


@functools.cache
def _metric(name: str):
    kind, description, tags, *boundaries = NAMES[name]
    if name in SERVE:
        from ray.serve import metrics  # adds the deployment, replica and application tags
    else:
        from ray.util import metrics
    cls = getattr(metrics, kind)
    return cls(name, description=description, tag_keys=tags, **({"boundaries": boundaries[0]} if boundaries else {}))


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    if value:
        _metric(name).inc(value, tags=tags or None)


def observe(name: str, value: float, **tags: str) -> None:
    _metric(name).observe(value, tags=tags or None)


class GenerationMetrics:
    """`on_batch` for `Speech2Text.transcribe_features`: each generation batch's size and padding."""

    def __init__(self, component: str):
        self.component = component

    def __call__(self, lengths: list[int]) -> None:
        observe("s2t_generation_batch_rows", len(lengths), component=self.component)
        frames = sum(lengths)
        inc("s2t_generation_frames_total", frames, component=self.component, kind="speech")
        inc(
            "s2t_generation_frames_total",
            max(lengths) * len(lengths) - frames,
            component=self.component,
            kind="padding",
        )


def answered_metrics(audio_s: float, wall_s: float) -> None:
    """A request answered 200: its audio seconds and RTFx (audio seconds / seconds from its upload read to answer)."""
    inc("s2t_serve_responses_total", status="200", code="")
    inc("s2t_serve_audio_seconds_total", audio_s)
    observe("s2t_serve_request_rtfx", audio_s / max(wall_s, 1e-9))
