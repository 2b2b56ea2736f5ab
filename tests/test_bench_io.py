"""`s2t bench io` end to end on a few clips: every layout's rows come through the latency proxy to moto intact, and
the proxy does hold each request back by the latency asked (a real S3 client, s3fs, on both sides of it)."""

import logging
import time

import s3fs
from moto.server import ThreadedMotoServer

from bench import io as bench_io
from jobs import cli


def test_every_layout_reads_all_rows_through_the_proxy(capsys):
    args = cli.build_parser().parse_args(
        ["bench", "io", "--clips", "6", "--batch-size", "4", "--latency-ms", "5", "--vad", "off"]
    )
    args.run(args)
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "rows/s" not in line and "---" not in line and "missing" not in line
    ]
    assert [line.split(" | ")[:2] for line in lines][:3] == [
        ["| per-file rows", "1"],
        ["| per-file rows", "32"],
        ["| HF Parquet (bytes in rows)", "32"],
    ]
    assert all(line.rstrip(" |").endswith("6/6") for line in lines), lines


def test_proxy_forwards_objects_and_waits_per_request():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy, url = bench_io.start_proxy(f"http://{host}:{port}", 0.2)
    try:
        direct = s3fs.S3FileSystem(
            **bench_io.CREDENTIALS, client_kwargs={"endpoint_url": f"http://{host}:{port}"}, skip_instance_cache=True
        )
        direct.mkdir("proxied")
        direct.pipe_file("proxied/object", b"x" * 100_000)
        slow = s3fs.S3FileSystem(**bench_io.CREDENTIALS, client_kwargs={"endpoint_url": url}, skip_instance_cache=True)
        started = time.perf_counter()
        assert slow.size("proxied/object") == 100_000  # a HEAD keeps the object's Content-Length
        assert slow.cat_file("proxied/object") == b"x" * 100_000
        assert time.perf_counter() - started >= 0.4  # two requests, each held back 0.2 s
    finally:
        proxy.shutdown()
        server.stop()
