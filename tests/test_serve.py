"""The Serve endpoint over real HTTP on 127.0.0.1: the official openai client, 32 concurrent clients, bad input."""

import io
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile
import soxr
import yaml
from helpers import demo_rows

from pipeline import scoring
from s2t_model import DEMO_LONG_FORM, DEMO_MODEL, Speech2Text

API_KEY = "test-key-123"
BODY_TIMEOUT_S = 8.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session):
    from ray import serve

    from pipeline.serve import build_app

    port = free_port()
    os.environ["S2T_TEST_API_KEY"] = API_KEY  # read by build_app in this process; replicas only get its hash
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "model": DEMO_MODEL,
                "api_key_env": "S2T_TEST_API_KEY",
                "max_upload_mb": 3.0,
                "max_duration_s": 120.0,
                "max_batch_size": 8,
                "batch_wait_ms": 50,
                "body_timeout_s": BODY_TIMEOUT_S,
            }
        ),
        name="s2t",
        route_prefix="/",
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, files=None, data=None, token: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{url}/v1/audio/transcriptions", files=files, data=data, headers=headers, timeout=120, **kwargs)


def test_openai_client_transcribes_and_translates(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    rows = demo_rows(6)
    texts = [client.audio.transcriptions.create(model="s2t", file=open(r["audio_filepath"], "rb")).text for r in rows]
    assert scoring.wer([r["text"] for r in rows], texts) <= 10.0
    row = rows[0]
    assert texts[0] == row["text"]
    with open(row["audio_filepath"], "rb") as f:
        audio = f.read()
    duration = soundfile.info(io.BytesIO(audio)).duration

    text = client.audio.transcriptions.create(model="s2t", file=("a.flac", audio), response_format="text")
    assert text.strip() == row["text"]
    srt = client.audio.transcriptions.create(model="s2t", file=("a.flac", audio), response_format="srt")
    assert srt.strip().split("\n") == ["1", f"00:00:00,000 --> 00:00:0{duration:.3f}".replace(".", ","), row["text"]]
    vtt = client.audio.transcriptions.create(model="s2t", file=("a.flac", audio), response_format="vtt")
    assert vtt.startswith("WEBVTT") and f"00:00:00.000 --> 00:00:0{duration:.3f}" in vtt and row["text"] in vtt
    verbose = client.audio.transcriptions.create(model="s2t", file=("a.flac", audio), response_format="verbose_json")
    assert verbose.text == row["text"] and verbose.duration == pytest.approx(duration, abs=1e-3)
    assert verbose.segments[0].end == pytest.approx(duration, abs=1e-3) and verbose.segments[0].avg_logprob < 0

    french = client.audio.translations.create(model="s2t", file=("a.flac", audio), extra_body={"target_language": "fr"})
    assert french.text == row["text_fr"]
    assert [m.id for m in client.models.list().data] == ["s2t"]


def test_32_concurrent_clients_each_get_their_own_transcript(server):
    rows = demo_rows(32)
    model = Speech2Text.from_pretrained(DEMO_MODEL)
    # Batching must not change anyone's result: each equals the model run on that clip alone.
    alone = [model.transcribe(soundfile.read(r["audio_filepath"], dtype="float32")[0], 16000)[0] for r in rows]

    def transcribe(row):
        with open(row["audio_filepath"], "rb") as f:
            response = post(server, files={"file": (os.path.basename(row["audio_filepath"]), f)})
        assert response.status_code == 200, response.text
        return response.json()["text"]

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(transcribe, rows))
    assert texts == alone
    assert scoring.wer([r["text"] for r in rows], texts) <= 10.0


def test_bad_input_gets_its_4xx_and_a_json_message(server, tmp_path):
    clip = demo_rows(1)[0]["audio_filepath"]
    flac = open(clip, "rb").read()
    long = open(os.path.join(DEMO_LONG_FORM, "audio", "long-form-4-000.flac"), "rb").read()  # 134 s, 2.6 MB
    cases = {
        "empty body": (post(server, content=b"", token=API_KEY), 400),
        "no file field": (post(server, data={"model": "s2t"}), 400),
        "text file": (post(server, files={"file": ("notes.wav", b"not audio at all\n" * 50)}), 415),
        "truncated flac": (post(server, files={"file": ("cut.flac", flac[: len(flac) // 2])}), 400),
        "oversized upload": (post(server, files={"file": ("big.wav", os.urandom(3_300_000))}), 413),
        "overlong audio": (post(server, files={"file": ("long.flac", long)}), 413),
        "wrong token": (post(server, files={"file": ("a.flac", flac)}, token="wrong"), 401),
        "no token": (post(server, files={"file": ("a.flac", flac)}, token=None), 401),
        "unknown target language": (
            httpx.post(
                f"{server}/v1/audio/translations",
                files={"file": ("a.flac", flac)},
                data={"target_language": "xx"},
                timeout=60,
                headers={"Authorization": f"Bearer {API_KEY}"},
            ),
            400,
        ),
        "bad response_format": (post(server, files={"file": ("a.flac", flac)}, data={"response_format": "xml"}), 400),
    }
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.json()["error"]["message"], name
    assert "fr" in cases["unknown target language"][0].json()["error"]["message"]  # lists the model's languages
    # The server keeps answering.
    assert post(server, files={"file": ("a.flac", flac)}).json()["text"] == demo_rows(1)[0]["text"]
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_a_full_queue_gets_503_with_retry_after_and_the_rest_are_answered(server):
    from ray import serve

    from pipeline.serve import build_app

    # A second app on the same proxy whose one replica holds one request and queues one more.
    serve.run(
        build_app(
            {
                "model": DEMO_MODEL,
                "max_batch_size": 1,
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "retry_after_s": 3,
            }
        ),
        name="s2t-tight",
        route_prefix="/tight",
    )
    try:
        clip = open(demo_rows(1)[0]["audio_filepath"], "rb").read()
        with ThreadPoolExecutor(16) as pool:
            responses = list(
                pool.map(lambda _: post(f"{server}/tight", files={"file": ("a.flac", clip)}, token=None), range(16))
            )
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 503} and statuses.count(503) >= 8, statuses
        assert all(r.headers["retry-after"] == "3" for r in responses if r.status_code == 503)
        assert all(r.json()["text"] == demo_rows(1)[0]["text"] for r in responses if r.status_code == 200)
        assert post(f"{server}/tight", files={"file": ("a.flac", clip)}, token=None).status_code == 200
    finally:
        serve.delete("s2t-tight")


def replica_pids(app: str, deployment: str = "Speech2TextServer") -> list[int]:
    """The processes of `app`'s replicas of `deployment` in this session's Ray, found by their process titles."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(f"ray::ServeReplica:{app}:{deployment}".encode()):
                    found.append(int(entry))
        except (ValueError, OSError):
            continue
    return found


def test_a_replica_killed_mid_batch_answers_its_requests_503_with_retry_after(server):
    """SIGKILL of the model's replica while a batch of 6 uploads decodes: each gets a 503 with Retry-After and an
    OpenAI-shaped JSON error, soon, not a hang; the replica Serve starts in its place answers the retry."""
    import signal

    from openai import OpenAI
    from ray import serve

    from pipeline.serve import build_app

    serve.run(
        build_app({"model": DEMO_MODEL, "max_batch_size": 8, "batch_wait_ms": 500, "retry_after_s": 2}),
        name="s2t-kill",
        route_prefix="/kill",
    )
    try:
        handle = serve.get_deployment_handle("Speech2TextServer", "s2t-kill")
        [pid] = replica_pids("s2t-kill")
        _, audio = long_recording()  # 87 s in 13 segments: a few seconds of decoding for the six together
        with ThreadPoolExecutor(6) as pool:
            answers = [
                pool.submit(
                    post,
                    f"{server}/kill",
                    files={"file": ("long.flac", audio)},
                    token=None,
                )
                for _ in range(6)
            ]
            deadline = time.monotonic() + 60
            while handle.batch_counts.remote().result()["decoding"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert handle.batch_counts.remote().result()["decoding"] > 0
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            responses = [answer.result() for answer in answers]
            waited = time.monotonic() - killed
        for response in responses:
            assert response.status_code == 503, (response.status_code, response.text[:300])
            assert response.headers["retry-after"] == "2"
            error = response.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "replica_unavailable", error
        assert waited < 30, waited  # the handle saw the death; nothing waited out a timeout
        print(f"503s {waited:.1f} s after the kill")
        # The openai client retries a 503 by itself, after its Retry-After: the new replica answers.
        client = OpenAI(base_url=f"{server}/kill/v1", api_key="-", max_retries=30)
        clip = demo_rows(1)[0]
        assert (
            client.audio.transcriptions.create(model="s2t", file=open(clip["audio_filepath"], "rb")).text
            == clip["text"]
        )
        assert replica_pids("s2t-kill") not in ([], [pid])
    finally:
        serve.delete("s2t-kill")


def test_long_upload_is_cut_at_pauses_with_timestamps(server):
    from openai import OpenAI

    with open(os.path.join(DEMO_LONG_FORM, "manifest.jsonl")) as f:
        recording = [json.loads(line) for line in f][1]  # 87 s, 13 utterances
    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    with open(os.path.join(DEMO_LONG_FORM, recording["audio_filepath"]), "rb") as f:
        audio = f.read()
    verbose = client.audio.transcriptions.create(model="s2t", file=("long.flac", audio), response_format="verbose_json")
    assert scoring.wer([recording["text"]], [verbose.text]) <= 10.0
    starts = [s.start for s in verbose.segments]
    assert starts == sorted(starts) and all(s.end - s.start <= 20.0 for s in verbose.segments)
    # Each true utterance's middle falls inside a segment whose text is that utterance's; a boundary may lie 0.45 s
    # into it (the clip's own leading silence, where the VAD's segment starts 150 ms before the speech).
    for truth in recording["segments"]:
        middle = (truth["start_s"] + truth["end_s"]) / 2
        segment = next(s for s in verbose.segments if s.start <= middle <= s.end)
        assert truth["end_s"] - 0.45 <= segment.end and segment.start <= truth["start_s"] + 0.45
    vtt = client.audio.transcriptions.create(model="s2t", file=("long.flac", audio), response_format="vtt")
    assert vtt.count(" --> ") == len(verbose.segments) >= len(recording["segments"]) - 2


def test_non_speech_gets_no_words_and_no_segments(server):
    from helpers import non_speech

    for name, audio in non_speech(3.0).items():
        upload = io.BytesIO()
        soundfile.write(upload, audio, 16000, format="WAV", subtype="FLOAT")
        files = {"file": (f"{name}.wav", upload.getvalue())}
        assert post(server, files=files).json() == {"text": ""}, name
        verbose = post(server, files=files, data={"response_format": "verbose_json"}).json()
        assert (verbose["text"], verbose["segments"]) == ("", []), name


def test_infra_serve_yaml_is_what_s2t_serve_prints():
    with open("infra/serve.yaml") as f:
        command = f.read().split("\n")[1].removeprefix("#   s2t ")
    printed = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *shlex.split(command)], capture_output=True, text=True, check=True
    ).stdout
    with open("infra/serve.yaml") as f:
        assert yaml.safe_load(f) == yaml.safe_load(printed)


# Hostile clients, on raw sockets where a polite client (httpx) would not behave so.


def multipart(audio: bytes, filename: str = "a.flac") -> tuple[bytes, str]:
    """The multipart body and its Content-Type, as httpx (and so the openai client) writes them."""
    request = httpx.Request("POST", "http://x", files={"file": (filename, audio)})
    return request.read(), request.headers["content-type"]


def open_request(url: str, headers: dict, body: bytes = b"", path: str = "/v1/audio/transcriptions"):
    """A socket that has sent the request line, `headers` and `body` (which may be a part of the declared one)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict]:
    """Status and JSON body of the response on `sock`, which must come within `timeout` seconds."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def content_length(data: bytes) -> int:
    lines = data.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
    return next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)


def serve_rss_bytes() -> int:
    """Resident memory of this session's Serve proxy and replicas (Ray's workers descend from this process)."""
    parents, names = {}, {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                names[int(entry)] = f.read()
        except (ValueError, OSError):
            continue
    ours, total = {os.getpid()}, 0
    for _ in range(6):  # the tree is shallow: pytest -> raylet -> worker
        ours |= {pid for pid, parent in parents.items() if parent in ours}
    for pid in ours:
        if names.get(pid, b"").startswith((b"ray::ProxyActor", b"ray::ServeReplica")):
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    return total


def test_stalled_uploads_do_not_block_good_requests_and_are_dropped(server):
    row = demo_rows(1)[0]
    flac = open(row["audio_filepath"], "rb").read()
    body, content_type = multipart(flac)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": content_type, "Content-Length": len(body)}
    stalled = [open_request(server, headers, body[: len(body) // 2]) for _ in range(100)]
    stalled_at = time.monotonic()
    try:
        time.sleep(1.0)  # all of them reach the replica and wait there for the rest of their bodies
        start = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(
                httpx.post,
                f"{server}/v1/audio/transcriptions",
                files={"file": ("a.flac", flac)},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=5,
            )
            health = pool.submit(httpx.get, f"{server}/healthz", timeout=5)
            assert good.result().json()["text"] == row["text"] and health.result().status_code == 200
        assert time.monotonic() - start < 5
        # Each stalled body is dropped with a 408 once nothing arrived for body_timeout_s, not before: they were
        # all held while the good request was answered.
        answers = [read_response(sock, BODY_TIMEOUT_S + 15) for sock in stalled]
        assert [status for status, _ in answers] == [408] * 100
        assert time.monotonic() - stalled_at >= BODY_TIMEOUT_S
        assert answers[0][1]["error"]["code"] == "body_timeout"
    finally:
        for sock in stalled:
            sock.close()


def test_an_upload_cut_short_is_a_400_that_says_so_and_resets_mid_upload_leave_the_server_answering(server):
    """The API takes uploads only (no URL is read on a request's behalf): a multipart body that ends before its
    closing boundary, with a Content-Length to match or chunked, is a 400 naming the cut, not a form without its
    file; clients that reset their connections mid-upload cost nothing: the next request is answered."""
    import struct

    row = demo_rows(1)[0]
    flac = open(row["audio_filepath"], "rb").read()
    body, content_type = multipart(flac)
    cut = body[: len(body) // 2]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": content_type}
    answers = {}
    with open_request(server, {**headers, "Content-Length": len(cut)}, cut) as sock:
        answers["length"] = read_response(sock, timeout=30)
    chunked = f"{len(cut):x}\r\n".encode() + cut + b"\r\n0\r\n\r\n"
    with open_request(server, {**headers, "Transfer-Encoding": "chunked"}, chunked) as sock:
        answers["chunked"] = read_response(sock, timeout=30)
    for status, error in answers.values():
        assert status == 400 and error["error"]["code"] == "truncated_upload", error
        assert "cut short" in error["error"]["message"]
    for _ in range(20):
        sock = open_request(server, {**headers, "Content-Length": len(body)}, cut)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a TCP reset
        sock.close()
    response = httpx.post(
        f"{server}/v1/audio/transcriptions",
        files={"file": ("a.flac", flac)},
        timeout=30,
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status_code == 200 and response.json()["text"] == row["text"], response.text


def test_a_declared_huge_body_gets_413_before_any_of_it_is_sent(server):
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "multipart/form-data; boundary=x",
        "Content-Length": 10**12,
    }
    start = time.monotonic()
    with open_request(server, headers) as sock:
        status, body = read_response(sock, timeout=2)
    assert status == 413 and body["error"]["code"] == "upload_too_large", body
    assert time.monotonic() - start < 2


def test_no_token_gets_401_before_the_body_is_read(server):
    headers = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": 400 * 2**20}
    start = time.monotonic()
    with open_request(server, headers, b"--x\r\n") as sock:  # 400 MB declared, 5 bytes sent
        status, body = read_response(sock, timeout=2)
    assert status == 401 and body["error"]["type"] == "authentication_error", body
    assert time.monotonic() - start < 2


def test_a_200_mb_streamed_body_is_cut_at_the_limit_without_growing_the_server(server):
    import threading

    baseline, peak, done = serve_rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], serve_rss_bytes())
            time.sleep(0.05)

    sent = [0]

    def chunks():  # chunked transfer: no Content-Length to check up front
        block = os.urandom(2**20)
        for _ in range(200):
            sent[0] += len(block)
            yield block

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = httpx.post(
            f"{server}/v1/audio/transcriptions",
            content=chunks(),
            timeout=60,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "multipart/form-data; boundary=x"},
        )
    finally:
        done.set()
        watcher.join()
    growth = peak[0] - baseline
    assert growth < 100 * 2**20, f"the server grew by {growth / 2**20:.0f} MB"
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"
    assert sent[0] < 200 * 2**20  # the connection was closed on the client mid-upload


def test_non_finite_audio_is_400_in_every_response_format(server):
    samples = (0.1 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    for bad, endpoint in ((np.nan, "transcriptions"), (np.inf, "translations")):
        wav = io.BytesIO()
        soundfile.write(wav, np.where(np.arange(16000) == 8000, bad, samples), 16000, format="WAV", subtype="FLOAT")
        for response_format in ("json", "text", "verbose_json", "srt", "vtt"):
            response = httpx.post(
                f"{server}/v1/audio/{endpoint}",
                files={"file": ("nan.wav", wav.getvalue())},
                data={"response_format": response_format, "target_language": "fr"},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=60,
            )
            assert response.status_code == 400, (bad, response_format, response.text)
            error = response.json()["error"]
            assert error["code"] == "corrupt" and "non-finite samples" in error["message"], error


def test_docs_follow_auth_and_messages_quote_only_a_prefix(server):
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(f"{server}{path}").status_code == 401
        assert httpx.get(f"{server}{path}", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    flac = open(demo_rows(1)[0]["audio_filepath"], "rb").read()
    huge = "x" * 100_000
    for endpoint, data in (("translations", {"target_language": huge}), ("transcriptions", {"response_format": huge})):
        response = httpx.post(
            f"{server}/v1/audio/{endpoint}",
            files={"file": ("a.flac", flac)},
            data=data,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )
        assert response.status_code == 400 and len(response.json()["error"]["message"]) < 200, response.text[:300]
    # A 2000-character file name (a longer one the multipart parser refuses by itself).
    response = post(server, files={"file": (huge[:2000] + ".wav", b"not audio")})
    assert response.status_code == 415 and len(response.json()["error"]["message"]) < 300, response.text[:300]


def test_a_500_is_a_server_error():
    from fastapi.testclient import TestClient

    from pipeline.serve import app

    # Outside a replica the guard has no limits: it fails closed, through the app's last-resort handler.
    response = TestClient(app, raise_server_exceptions=False).get("/healthz")
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error", response.text


def test_verbose_json_carries_no_non_finite_number():
    from pipeline.serve import render

    segments = [
        {"id": 0, "start": 0.0, "end": 1.0, "text": "", "tokens": [], "avg_logprob": float("-inf"), "temperature": 0.0}
    ]
    body = json.dumps(render("verbose_json", "", segments, 1.0, "transcribe", "en"), allow_nan=False)  # JSON as is
    assert json.loads(body)["segments"][0]["avg_logprob"] is None


def test_the_docs_client_code_runs_against_the_endpoint(server, tmp_path):
    """README.md's and docs/'s `openai` client blocks, as written, against a real endpoint (their URL and key come
    from S2T_URL and S2T_API_KEY when set)."""
    from test_docs import python_blocks, run_block

    blocks = python_blocks(needs_endpoint=True)
    assert blocks
    env = {**os.environ, "S2T_URL": f"{server}/v1", "S2T_API_KEY": API_KEY}
    for where, code in blocks:
        run = run_block(code, tmp_path, env)
        assert run.returncode == 0, f"{where} fails:\n{run.stderr[-3000:]}"
        assert "forty thousand seven hundred and twenty three" in run.stdout, where


def long_recording() -> tuple[dict, bytes]:
    """The 87 s long-form recording (13 utterances at known times) and its FLAC bytes."""
    with open(os.path.join(DEMO_LONG_FORM, "manifest.jsonl")) as f:
        recording = [json.loads(line) for line in f][1]
    with open(os.path.join(DEMO_LONG_FORM, recording["audio_filepath"]), "rb") as f:
        return recording, f.read()


def test_openai_client_streams_a_delta_per_segment_then_done_with_usage_and_logprobs(server):
    from openai import OpenAI

    recording, audio = long_recording()
    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    whole = client.audio.transcriptions.create(model="s2t", file=("long.flac", audio)).text
    events = list(
        client.audio.transcriptions.create(model="s2t", file=("long.flac", audio), stream=True, include=["logprobs"])
    )
    types = [e.type for e in events]
    assert types[-1] == "transcript.text.done" and set(types[:-1]) == {"transcript.text.delta"}
    deltas, done = events[:-1], events[-1]
    assert len(deltas) >= len(recording["segments"]) // 2  # per segment of the upload, not one at the end
    assert "".join(d.delta for d in deltas) == done.text == whole
    assert scoring.wer([recording["text"]], [done.text]) <= 10.0
    assert done.usage.type == "tokens" and done.usage.output_tokens > len(done.text.split())
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    for d in deltas:  # each delta's tokens spell its text
        assert "".join(p.token for p in d.logprobs).strip() == d.delta.strip()
        assert all(p.logprob <= 0 and bytes(p.bytes).decode() == p.token for p in d.logprobs)
    assert [p.token for p in done.logprobs] == [p.token for d in deltas for p in d.logprobs]


def test_word_timestamps_fall_on_the_true_utterance_starts_and_logprobs_come_with_json(server):
    from openai import OpenAI

    recording, audio = long_recording()
    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    verbose = client.audio.transcriptions.create(
        model="s2t",
        file=("long.flac", audio),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert " ".join(w.word for w in verbose.words) == verbose.text and verbose.segments
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and all(w.start < w.end for w in verbose.words)
    # The first word of each utterance begins where the utterance was put into the recording (the true time, from
    # the manifest), after at most the clip's own leading silence (<= 0.5 s).
    hits = 0
    for truth in recording["segments"]:
        first = truth["text"].split()[0]
        hits += any(
            w.word == first and truth["start_s"] - 0.2 <= w.start <= truth["start_s"] + 0.7 for w in verbose.words
        )
    assert hits >= len(recording["segments"]) - 1, hits
    only_words = client.audio.transcriptions.create(
        model="s2t", file=("long.flac", audio), response_format="verbose_json", timestamp_granularities=["word"]
    )
    assert only_words.segments is None and [w.word for w in only_words.words] == [w.word for w in verbose.words]
    clip = demo_rows(1)[0]
    with open(clip["audio_filepath"], "rb") as f:
        short = f.read()
    scored = client.audio.transcriptions.create(model="s2t", file=("a.flac", short), include=["logprobs"])
    assert "".join(p.token for p in scored.logprobs).strip() == scored.text == clip["text"]


def test_options_the_model_cannot_honour_are_400_naming_what_is_supported(server):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    flac = open(demo_rows(1)[0]["audio_filepath"], "rb").read()
    create = client.audio.transcriptions.create
    refused = {
        "prompt": (dict(prompt="numbers"), "prompt"),
        "server_vad": (dict(chunking_strategy={"type": "server_vad", "threshold": 0.5}), '"auto"'),
        "words with json": (dict(timestamp_granularities=["word"]), "verbose_json"),
        "logprobs with verbose_json": (dict(include=["logprobs"], response_format="verbose_json"), "json"),
        "stream with srt": (dict(stream=True, response_format="srt"), "json or text"),
    }
    for name, (options, named) in refused.items():
        with pytest.raises(openai.BadRequestError) as error:
            create(model="s2t", file=("a.flac", flac), **options)
        assert named in error.value.body["message"], (name, error.value.body)
    assert create(model="s2t", file=("a.flac", flac), chunking_strategy="auto").text == demo_rows(1)[0]["text"]
    # An error found before the first event is an HTTP error, not a stream.
    with pytest.raises(openai.APIStatusError) as error:
        create(model="s2t", file=("notes.wav", b"not audio at all\n" * 50), stream=True)
    assert error.value.status_code == 415


def test_a_client_gone_mid_stream_cancels_its_rest_and_leaves_no_stream_open(server):
    from ray import serve

    _, audio = long_recording()
    handle = serve.get_deployment_handle("Speech2TextServer", "s2t")  # the model's replica, behind the ingress
    cancelled = handle.stream_counts.remote().result()["cancelled_segments"]
    with httpx.stream(
        "POST",
        f"{server}/v1/audio/transcriptions",
        files={"file": ("long.flac", audio)},
        data={"stream": "true"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["type"] == "transcript.text.delta"
    for _ in range(120):  # the replica sees the disconnect, cancels the rest and closes the stream
        if handle.stream_counts.remote().result()["open"] == 0:
            break
        time.sleep(0.5)
    counts = handle.stream_counts.remote().result()
    # 13 segments, 8 a batch: at least the last batch's were never decoded.
    assert counts["open"] == 0 and counts["cancelled_segments"] > cancelled, counts
    assert (
        post(server, files={"file": ("a.flac", open(demo_rows(1)[0]["audio_filepath"], "rb").read())}).json()["text"]
        == demo_rows(1)[0]["text"]
    )


@pytest.mark.slow  # 240 uploads
def test_every_format_people_upload_is_transcribed_as_flac_is(server):
    """m4a, mp4 with H.264 video, mov, mkv, webm/ogg Opus, headerless and cover-art mp3, AMR, WMA through the openai
    client: each within 1 WER point of the same clips uploaded as FLAC (AMR: as 8 kHz FLAC)."""
    from helpers import formats_people_keep
    from openai import OpenAI
    from test_audio_formats import within_reach

    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    rows = demo_rows(20)
    clips = [soundfile.read(r["audio_filepath"], dtype="float32")[0] for r in rows]
    with ThreadPoolExecutor(2) as pool:
        encoded = list(pool.map(formats_people_keep, clips))
    uploads = [("flac", i, "clip.flac", open(r["audio_filepath"], "rb").read()) for i, r in enumerate(rows)]
    for i, clip in enumerate(clips):
        at_8k = io.BytesIO()
        soundfile.write(at_8k, soxr.resample(clip, 16000, 8000), 8000, format="FLAC")
        uploads.append(("flac 8 kHz", i, "clip.flac", at_8k.getvalue()))
        uploads += [(name, i, f"clip.{ext}", data) for name, (ext, data, _) in encoded[i].items()]

    def transcribe(upload):
        return client.audio.transcriptions.create(model="s2t", file=(upload[2], upload[3])).text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(transcribe, uploads))
    by_format: dict[str, list[str]] = {}
    for (name, i, _, _), text in zip(uploads, texts):
        by_format.setdefault(name, [None] * len(rows))[i] = text
    references = [r["text"] for r in rows]
    wer = {name: scoring.wer(references, got) for name, got in by_format.items()}
    print("WER by format through Serve:", wer)
    for name in encoded[0]:
        flac = wer["flac 8 kHz" if name == "amr-nb" else "flac"]
        assert within_reach(name, wer[name], flac), (name, wer)
