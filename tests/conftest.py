"""One Ray instance for the whole test session (starting Ray costs seconds): tests that need it ask for
`ray_session`."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Logical CPUs above the 2 real cores: a feature actor, a generation actor and the write tasks must all fit
    # at once, or the pipeline waits on itself. No dashboard, no log streaming: quiet and quick. Metrics exported
    # on a port of their own (tests/test_metrics.py scrapes it; Ray's agent runs either way).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=free_port())
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on 127.0.0.1 (moto's standalone server), shared by the session: tests take buckets of
    their own from `s3_bucket`."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """(s3fs filesystem, a new bucket's name) on the session's S3 server. The filesystem is one of its own (not
    fsspec's shared instance), so its listings cache sees what a job wrote."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(**S3_CREDENTIALS, client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    bucket = f"s2t-test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return fs, bucket


class Place:
    """Where a test's inputs and outputs live, named by paths relative to it: a local folder or an S3 bucket. `url`
    is what a job is given; `path` is for `fs`; `options` are the job's config fields, `cli` its command-line
    options, `storage` the fsspec options to read it."""

    def __init__(self, fs, root: str, url_root: str, options: dict, cli: list[str], storage: dict | None):
        self.fs, self.root, self.url_root = fs, root, url_root
        self.options, self.cli, self.storage = options, cli, storage

    def url(self, name: str) -> str:
        return f"{self.url_root}/{name}"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write(self, name: str, data: bytes | str) -> None:
        self.fs.pipe_file(self.path(name), data.encode() if isinstance(data, str) else data)

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def names(self, folder: str) -> list[str]:
        """The files under `folder`, as paths relative to it."""
        return sorted(p[len(self.path(folder)) + 1 :] for p in self.fs.find(self.path(folder)))

    def tables(self, folder: str) -> list[tuple]:
        """(name, table) for every Parquet file under `folder`."""
        import pyarrow.parquet as pq

        found = []
        for name in self.names(folder):
            if name.endswith(".parquet"):
                with self.fs.open(self.path(f"{folder}/{name}"), "rb") as f:
                    found.append((name, pq.read_table(f)))
        return found


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """Each test that asks for it runs twice: on local files and on the session's S3 server (a new bucket)."""
    import json

    import fsspec

    if request.param == "local":
        return Place(fsspec.filesystem("file", auto_mkdir=True), str(tmp_path), str(tmp_path), {}, [], None)
    endpoint = request.getfixturevalue("s3_endpoint")
    fs, bucket = request.getfixturevalue("s3_bucket")
    fs = type(fs)(**fs.storage_options, use_listings_cache=False)  # sees what a job wrote since its last look
    return Place(
        fs,
        bucket,
        f"s3://{bucket}",
        dict(s3_endpoint_url=endpoint, storage_options=S3_CREDENTIALS),
        ["--s3-endpoint-url", endpoint, "--storage-options", json.dumps(S3_CREDENTIALS)],
        dict(S3_CREDENTIALS, client_kwargs={"endpoint_url": endpoint}),
    )
