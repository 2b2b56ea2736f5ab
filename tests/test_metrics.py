"""The job's and the endpoint's metrics, scraped from Ray's own Prometheus endpoint on 127.0.0.1 (the session's Ray
exports them on a port of its own, tests/conftest.py) and read with prometheus_client's parser. The session's other
tests add to the same counters, so each check is on what a scrape before and one after differ by; Ray's agent
exports every few seconds, so the scrape is repeated until the figures arrive (or a minute passes). A histogram's
_sum is Ray's estimate from bucket midpoints: its _count and buckets are what is checked.

References: the audio's own lengths (soundfile), the Kaldi frame count 1 + (N - 400) // 160, the requests sent."""

import io
import json
import time

import httpx
import numpy as np
import pytest
import soundfile
from helpers import demo_rows
from prometheus_client.parser import text_string_to_metric_families

from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_MODEL

PREFIX = "ray_"  # Ray puts it before every application metric's name
REPORT_INTERVAL_S = 11.0  # longer than the few seconds Ray took here to export a recorded value


def scrape() -> dict[tuple, float]:
    """(sample name, sorted tags of ours, the recording process) -> the value of every s2t_ sample."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    ours = {"outcome", "reason", "component", "kind", "status", "code", "le"}
    process = ("WorkerId", "Component", "replica")
    found: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX + "s2t_"):
                key = (
                    sample.name[len(PREFIX) :],
                    tuple(sorted((k, v) for k, v in sample.labels.items() if k in ours)),
                    tuple(sample.labels.get(k) for k in process),
                )
                found[key] = found.get(key, 0.0) + sample.value
    return found


def settled() -> dict[tuple, float]:
    """A scrape once earlier tests' last figures are exported too: two scrapes a report interval apart agree (else
    what an earlier test recorded just before would count as this test's)."""
    last = scrape()
    for _ in range(10):
        time.sleep(REPORT_INTERVAL_S)
        now = scrape()
        if now == last:
            return now
        last = now
    return last


def delta(before: dict, after: dict, name: str, **tags) -> float:
    """What the processes recording (name, tags) added between the scrapes: a process of an earlier test that has
    exited since is gone from the second scrape, and takes nothing away."""
    wanted = (name, tuple(sorted(tags.items())))
    return sum(value - before.get(key, 0.0) for key, value in after.items() if key[:2] == wanted)


def wait_for(before: dict, expected: dict[tuple, float], timeout_s: float = 90.0) -> dict:
    """Scrapes until every (name, tags) of `expected` has moved by its value (approximately), or the time is up."""
    deadline = time.time() + timeout_s
    while True:
        after = scrape()
        moved = {key: delta(before, after, key[0], **dict(key[1])) for key in expected}
        if (
            all(moved[key] == pytest.approx(value, rel=1e-3, abs=1e-6) for key, value in expected.items())
            or time.time() > deadline
        ):
            return after
        time.sleep(2.0)


def key(name: str, **tags) -> tuple:
    return (name, tuple(sorted(tags.items())))


def test_job_metrics_count_rows_by_outcome_audio_and_generation_frames(ray_session, tmp_path):
    rows = demo_rows(5)
    rows[3]["audio_filepath"] = str(tmp_path / "not-there.flac")  # an error: missing
    soundfile.write(tmp_path / "silence.flac", np.zeros(32000, np.float32), 16000)  # no speech
    rows.append({"id": "silence", "audio_filepath": str(tmp_path / "silence.flac"), "text": ""})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heard = [r for i, r in enumerate(rows) if i != 3 and r["id"] != "silence"]
    samples = [soundfile.info(r["audio_filepath"]).frames for r in heard]
    audio_s = sum(n / 16000 for n in samples) + 2.0  # the silent row's audio counts too: it was read
    frames = sum(1 + (n - 400) // 160 for n in samples)

    before = settled()
    run(TranscribeConfig(manifest=str(manifest), output=str(tmp_path / "out"), model=DEMO_MODEL, num_beams=1))
    expected = {
        key("s2t_job_rows_total", outcome="ok", reason=""): 4,
        key("s2t_job_rows_total", outcome="no_speech", reason=""): 1,
        key("s2t_job_rows_total", outcome="error", reason="missing"): 1,
        key("s2t_job_rows_no_speech_total"): 1,
        key("s2t_job_audio_seconds_total"): audio_s,
        key("s2t_generation_batch_rows_count", component="job"): 1,
        key("s2t_generation_frames_total", component="job", kind="speech"): frames,
    }
    after = wait_for(before, expected)
    for k, value in expected.items():
        assert delta(before, after, k[0], **dict(k[1])) == pytest.approx(value, rel=1e-3), k
    # One batch of the four rows heard (the CPU frame budget holds them), padded up to its longest row.
    assert delta(before, after, "s2t_generation_batch_rows_bucket", component="job", le="2.0") == 0
    assert delta(before, after, "s2t_generation_batch_rows_bucket", component="job", le="4.0") == 1
    padding = delta(before, after, "s2t_generation_frames_total", component="job", kind="padding")
    assert padding == max(1 + (n - 400) // 160 for n in samples) * 4 - frames


@pytest.fixture(scope="module")
def server(ray_session):
    from conftest import free_port
    from ray import serve

    from pipeline.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"model": DEMO_MODEL, "max_batch_size": 4, "batch_wait_ms": 200, "num_beams": 1}),
        name="s2t-metrics",
        route_prefix="/",
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_serve_metrics_count_responses_audio_batches_and_queue_wait(server):
    from concurrent.futures import ThreadPoolExecutor

    rows = demo_rows(3)
    audio = [open(r["audio_filepath"], "rb").read() for r in rows]
    seconds = sum(soundfile.info(io.BytesIO(a)).duration for a in audio)
    frames = sum(1 + (soundfile.info(io.BytesIO(a)).frames - 400) // 160 for a in audio)

    def post(data: bytes) -> int:
        return httpx.post(
            f"{server}/v1/audio/transcriptions", files={"file": ("a.flac", data)}, timeout=120
        ).status_code

    before = settled()
    with ThreadPoolExecutor(3) as pool:  # at once: they meet in one @serve.batch (it waits 200 ms to fill)
        statuses = list(pool.map(post, audio))
    statuses.append(post(b""))  # an empty upload: 400 empty_file
    statuses.append(post(b"not audio at all" * 100))  # 415 unreadable
    assert statuses == [200, 200, 200, 400, 415]
    expected = {
        key("s2t_serve_responses_total", status="200", code=""): 3,
        key("s2t_serve_responses_total", status="400", code="empty_file"): 1,
        key("s2t_serve_responses_total", status="415", code="unreadable"): 1,
        key("s2t_serve_audio_seconds_total"): seconds,
        key("s2t_serve_request_rtfx_count"): 3,
        key("s2t_serve_queue_wait_seconds_count"): 3,
        key("s2t_generation_frames_total", component="serve", kind="speech"): frames,
    }
    after = wait_for(before, expected)
    for k, value in expected.items():
        assert delta(before, after, k[0], **dict(k[1])) == pytest.approx(value, rel=1e-3), k
    # Three requests sent at once meet in fewer than three batches; each batch is one generation batch here.
    batches = delta(before, after, "s2t_serve_batch_requests_count")
    assert 1 <= batches < 3
    assert delta(before, after, "s2t_generation_batch_rows_count", component="serve") == batches
