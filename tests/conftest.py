"""One Ray instance for the whole test session (starting Ray costs seconds): tests that need it ask for `ray_session`."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Logical CPUs above the 2 real cores: a feature actor, a generation actor and the write tasks must all fit
    # at once, or the pipeline waits on itself. No dashboard, no log streaming: quiet and quick.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


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
