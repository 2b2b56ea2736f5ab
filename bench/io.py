"""`s2t bench io`: audio rows per second of ONE audio actor (`ComputeFeatures`, no model) reading the same clips
from an object store with latency, as per-file rows (at `io_concurrency` 1 and at the job's default), as Hugging
Face datasets Parquet (audio bytes in the rows) and as WebDataset tar shards; and from local disk, the actor's
ceiling on this machine (its decoding, speech detection and features, with no store to wait on).

The store is the local S3 test server (moto's ThreadedMotoServer on 127.0.0.1, as the tests start it) behind a
small proxy that waits `--latency-ms` before forwarding each request. A proxy rather than an fsspec wrapper that
sleeps: the latency belongs to each HTTP request, and s3fs makes several per file (HEAD on open, ranged GETs) that a
wrapper around fsspec's calls would not see one by one; behind a proxy the real client runs as it would against S3,
its connection pool and retries included. Server and proxy run in a process of their own, as a remote store would:
their request handling does not take the measured process's GIL.

Each layout is timed from its manifest (or shards) to the features of every row, in this process: the read the job's
read tasks do, then the actor's batches (`--batch-size` rows each, the job's `feature_batch_size`); and again to
every row's samples only (the actor's reads and decoding, without fbank and speech detection): the part that
`io_concurrency` changes, which a machine short of CPU shows even when the features' CPU time hides it.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import tarfile
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa

from s2t_model import DEMO_CORPUS, DEMO_MODEL, FeatureExtractor

CREDENTIALS = {"key": "testing", "secret": "testing"}
BUCKET = "bench-io"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency-ms", type=float, default=50.0, help="wait before each request is forwarded")
    parser.add_argument("--clips", type=int, default=512, help="rows (the demo clips, repeated under new names)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per actor batch (feature_batch_size)")
    parser.add_argument("--shards", type=int, default=2, help="Parquet files and tar shards the clips are split into")
    parser.add_argument("--vad", choices=["silero", "off"], default="silero", help="the actor's speech detection")


class LatencyProxy(BaseHTTPRequestHandler):
    """Forwards each request to the upstream server after `server.latency_s`; one upstream connection per client
    connection (keep-alive on both sides, as s3fs keeps its connections)."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm the body would wait for the client's delayed
    # ACK of the headers (40 ms on Linux), a delay S3 does not have (measured here: a GET through the proxy at
    # latency 0 took 41-45 ms with it, 5 ms without).
    disable_nagle_algorithm = True

    def forward(self) -> None:
        self.server.count(self.command, +1)
        try:
            self.relay()
        finally:
            self.server.count(self.command, -1)

    def relay(self) -> None:
        time.sleep(self.server.latency_s)
        self.answer(*self.ask_upstream(self.request_body()))

    def request_body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def ask_upstream(self, body: bytes | None) -> tuple[http.client.HTTPResponse, bytes]:
        """The upstream server's response to this request, and its body."""
        if not hasattr(self, "upstream"):
            self.upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {name: value for name, value in self.headers.items() if name.lower() != "expect"}
        self.upstream.request(self.command, self.path, body=body, headers=headers)
        response = self.upstream.getresponse()
        return response, response.read()

    def answer(self, response: http.client.HTTPResponse, data: bytes, sent: int | None = None) -> None:
        """Relay the upstream's response; only the first `sent` bytes of its body when given (a fault proxy's
        response cut short: the Content-Length still says the whole)."""
        self.send_response(response.status)
        for name, value in response.getheaders():
            # HEAD's Content-Length is the object's size: kept; otherwise the body's, set below.
            if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date") or (
                name.lower() == "content-length" and self.command == "HEAD"
            ):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data if sent is None else data[:sent])

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    def log_message(self, *args) -> None:
        pass


class ProxyServer(ThreadingHTTPServer):
    """The proxy's server: counts the requests by method (`requests`) and the most it held at once (`most_at_once`)."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], latency_s: float):
        super().__init__(("127.0.0.1", 0), LatencyProxy)
        self.upstream, self.latency_s = upstream, latency_s
        self.requests: Counter = Counter()
        self.at_once = self.most_at_once = 0
        self.lock = threading.Lock()

    def count(self, method: str, step: int) -> None:
        with self.lock:
            self.requests[method] += step > 0
            self.at_once += step
            self.most_at_once = max(self.most_at_once, self.at_once)


def start_proxy(upstream: str, latency_s: float) -> tuple[ProxyServer, str]:
    host, port = upstream.removeprefix("http://").split(":")
    server = ProxyServer((host, int(port)), latency_s)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def demo_clips(count: int) -> list[dict]:
    """`count` rows of the demo corpus (repeated), each with its own name and its file's bytes."""
    with open(os.path.join(DEMO_CORPUS, "manifest.jsonl")) as f:
        corpus = [json.loads(line) for line in f if line.strip()]
    clips = []
    for i in range(count):
        row = corpus[i % len(corpus)]
        with open(os.path.join(DEMO_CORPUS, row["audio_filepath"]), "rb") as f:
            clips.append({"key": f"clip-{i:06d}", "text": row["text"], "duration": row["duration"], "data": f.read()})
    return clips


def upload(fs, clips: list[dict], shards: int, folder: str) -> dict[str, str]:
    """The clips on the server in each layout -> {layout: the manifest or shard pattern to read}."""
    lines = [manifest_line(c) for c in clips]
    for c in clips:
        fs.pipe_file(f"{BUCKET}/files/audio/{c['key']}.flac", c["data"])
    fs.pipe_file(f"{BUCKET}/files/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    for i, part in enumerate(split(clips, shards)):
        write_hf_parquet(part, os.path.join(folder, "part.parquet"))
        fs.put_file(os.path.join(folder, "part.parquet"), f"{BUCKET}/hf/data/test-{i:05d}-of-{shards:05d}.parquet")
        fs.pipe_file(f"{BUCKET}/wds/shard-{i:06d}.tar", webdataset_tar(part))
    return {
        "files": f"s3://{BUCKET}/files/manifest.jsonl",
        "hf": f"s3://{BUCKET}/hf/data/test-*.parquet",
        "wds": f"s3://{BUCKET}/wds/shard-{{000000..{shards - 1:06d}}}.tar",
    }


def local_files(clips: list[dict], folder: str) -> str:
    """The clips as per-file rows on local disk -> their manifest."""
    os.makedirs(os.path.join(folder, "audio"))
    with open(os.path.join(folder, "manifest.jsonl"), "w") as manifest:
        for c in clips:
            with open(os.path.join(folder, "audio", f"{c['key']}.flac"), "wb") as f:
                f.write(c["data"])
            manifest.write(manifest_line(c) + "\n")
    return os.path.join(folder, "manifest.jsonl")


def manifest_line(clip: dict) -> str:
    return json.dumps(
        {
            "id": clip["key"],
            "audio_filepath": f"audio/{clip['key']}.flac",
            "duration": clip["duration"],
            "text": clip["text"],
        }
    )


def split(clips: list[dict], parts: int) -> list[list[dict]]:
    size = -(-len(clips) // parts)
    return [clips[i : i + size] for i in range(0, len(clips), size)]


def write_hf_parquet(clips: list[dict], path: str) -> None:
    """A Parquet file as Hugging Face datasets writes one (the Audio feature's struct and schema metadata)."""
    import pyarrow.parquet as pq

    audio = pa.array(
        [{"bytes": c["data"], "path": f"{c['key']}.flac"} for c in clips],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    features = {
        "audio": {"sampling_rate": 16000, "decode": True, "_type": "Audio"},
        "sentence": {"dtype": "string", "_type": "Value"},
    }
    table = pa.table({"audio": audio, "sentence": [c["text"] for c in clips]}).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})}
    )
    pq.write_table(table, path, row_group_size=100)


def webdataset_tar(clips: list[dict]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for c in clips:
            for name, data in ((f"{c['key']}.flac", c["data"]), (f"{c['key']}.txt", c["text"].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def manifest_rows(uri: str, options: dict, rows_per_block: int):
    """The blocks the job's read tasks give for `uri` (manifests and Parquet: pipeline.records; tar shards:
    pipeline.shards), read here one file after another."""
    from pipeline.manifest import Manifest
    from pipeline.records import read_blocks

    manifest = Manifest(uri, options)
    for path in manifest.files:
        with manifest.fs.open(path, "rb") as f:
            if manifest.kind == "webdataset":
                from pipeline.shards import webdataset_rows

                yield from webdataset_rows(f, manifest.url(path), rows_per_block)
            else:
                yield from read_blocks(f, manifest.url(path), rows_per_block, manifest.base(path))


def rows_per_second(
    uri: str, options: dict, io_concurrency: int, batch_size: int, vad: str, read_only: bool
) -> tuple[float, int]:
    """(rows per second, rows without error) of one ComputeFeatures from `uri` to every row's features, or with
    `read_only` to every row's samples (its reads and decoding, the part io_concurrency changes). The actor takes
    CALLS_PER_ACTOR batches at once, as the job's actor pool calls it; its first batch is read once untimed (a
    long job's connections and models are warm)."""
    from pipeline.stages import CALLS_PER_ACTOR, ComputeFeatures, FeatureOptions

    actor = ComputeFeatures(
        FeatureOptions(
            FeatureExtractor.from_pretrained(DEMO_MODEL).to_dict(),
            min_duration_s=0.1,
            max_duration_s=60.0,
            storage_options=options,
            vad=vad,
            io_concurrency=io_concurrency,
        )
    )

    def work(block: pa.Table) -> tuple[int, int]:
        """-> (rows, rows without error)"""
        if read_only:
            loaded = list(actor.reads.map(actor.load, block.to_pylist()))
            return block.num_rows, sum(not isinstance(samples, str) for samples in loaded)
        return block.num_rows, actor.compute(block)[0]["error"].null_count

    work(next(manifest_rows(uri, options, batch_size)))
    started = time.perf_counter()
    counts = list(calls_at_once(work, manifest_rows(uri, options, batch_size), CALLS_PER_ACTOR))
    rows, ok = (sum(column) for column in zip(*counts))
    return rows / (time.perf_counter() - started), ok


def calls_at_once(work, blocks, calls: int):
    """work(block) for each block in order, `calls` of them running at once (as Ray Data calls an actor whose
    max_concurrent_calls_per_actor is `calls`); blocks are drawn only as a call is free."""
    with ThreadPoolExecutor(calls) as pool:
        running = deque()
        for block in blocks:
            if len(running) == calls:
                yield running.popleft().result()
            running.append(pool.submit(work, block))
        while running:
            yield running.popleft().result()


def webdataset_reader() -> bool:
    try:
        from pipeline.shards import webdataset_rows  # noqa: F401
    except ImportError:
        return False
    return True


def serve_store(latency_s: float, urls) -> None:
    """In a process of its own (the store is remote to the actor: its request handling must not take the actor
    process's GIL): moto's S3 server and the latency proxy in front of it; puts (moto's URL, the proxy's) on `urls`
    and serves until terminated."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    _, proxy_url = start_proxy(f"http://{host}:{port}", latency_s)
    urls.put((f"http://{host}:{port}", proxy_url))
    threading.Event().wait()


def main(args) -> None:
    import multiprocessing

    import s3fs

    from pipeline.transcribe import TranscribeConfig

    context = multiprocessing.get_context("spawn")
    urls = context.Queue()
    store = context.Process(target=serve_store, args=(args.latency_ms / 1000, urls), daemon=True)
    store.start()
    default = TranscribeConfig.model_fields["io_concurrency"].default
    try:
        moto_url, proxy_url = urls.get(timeout=120)
        direct = s3fs.S3FileSystem(**CREDENTIALS, client_kwargs={"endpoint_url": moto_url})
        direct.mkdir(BUCKET)
        clips = demo_clips(args.clips)
        with tempfile.TemporaryDirectory(prefix="s2t-bench-io-") as folder:
            sources = upload(direct, clips, args.shards, folder)
            # Reads through the proxy (a filesystem instance of their own: fsspec caches instances by their options).
            options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": proxy_url}}
            runs = [
                ("per-file rows", "files", 1),
                ("per-file rows", "files", default),
                ("HF Parquet (bytes in rows)", "hf", default),
            ]
            runs += [("WebDataset shards", "wds", default)] if webdataset_reader() else []
            sources["local"] = local_files(clips, folder)
            runs += [("per-file rows on local disk (no store: the actor's ceiling here)", "local", default)]
            print(
                f"{args.clips} demo clips, latency {args.latency_ms:.0f} ms per request (proxy in front of moto, both "
                f"in a process of their own), batches of {args.batch_size}, VAD {args.vad}, {os.cpu_count()} cores, "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            print(
                "| layout | io_concurrency | actor rows/s | vs per-file at 1 | reads alone, rows/s | vs per-file at 1 "
                "| rows ok |\n| --- | --- | --- | --- | --- | --- | --- |"
            )
            base = {}
            for name, layout, concurrency in runs:
                speeds = {}
                for read_only in (False, True):
                    speeds[read_only], ok = rows_per_second(
                        sources[layout],
                        None if layout == "local" else options,
                        concurrency,
                        args.batch_size,
                        args.vad,
                        read_only,
                    )
                    base.setdefault(read_only, speeds[read_only])
                print(
                    f"| {name} | {concurrency} | {speeds[False]:.1f} | {speeds[False] / base[False]:.1f}x | "
                    f"{speeds[True]:.1f} | {speeds[True] / base[True]:.1f}x | {ok}/{args.clips} |",
                    flush=True,
                )
        if not webdataset_reader():
            print(
                "| WebDataset shards | - | missing: pipeline/shards.py (webdataset_rows) is not in this tree | | | | |"
            )
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        store.terminate()
