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
