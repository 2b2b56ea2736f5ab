"""How hard the jobs try the store before a row is called `unavailable` (docs/faults.md says why these numbers).

Three layers, innermost first: botocore's own retries of each request (mode, attempts, timeouts), s3fs' retries of
each call around them (its default: five), and `RowRetry`, a row's whole read done again after a jittered backoff
(a reset in the middle of a body, a 500 that outlasted the client's attempts). Ray Data's own I/O retries
(`DataContext.retried_io_errors`) wrap the read tasks of manifests and tar shards and the output's writes;
`retry_store_errors` makes them see the errors our store's clients raise.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from .reasons import TRANSIENT_MESSAGES, StoreUnavailable, is_transient

T = TypeVar("T")
# s3fs' own tries of a call (around botocore's attempts; for resets mid-body, timeouts, "Slow Down"), nested once
# more in its reads: a request-level fault is tried up to S3FS_TRIES**2 * ClientRetry.attempts times. A class
# setting that s3fs takes no option for (its default is 5: 75 tries of a stalled GET), set in every process that
# imports this module (pipeline.audio does, and so every stage and reader).
S3FS_TRIES = 2

try:
    import s3fs

    s3fs.S3FileSystem.retries = S3FS_TRIES
except ImportError:
    pass


@dataclass(frozen=True)
class ClientRetry:
    """The S3 client's settings (s3fs over aiobotocore): what a single request or call may cost."""

    mode: str = "standard"  # botocore: retries 5xx, throttling and connection errors with jittered backoff
    attempts: int = 3  # botocore's attempts of one request, the first included
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # between bytes, not for a whole body: a stall costs this, not botocore's 60 s

    def s3_options(self) -> dict:
        """fsspec storage options for s3fs."""
        return {
            "config_kwargs": {
                "retries": {"mode": self.mode, "total_max_attempts": self.attempts},
                "connect_timeout": self.connect_timeout_s,
                "read_timeout": self.read_timeout_s,
            }
        }


def with_client_retry(options: dict | None, retry: ClientRetry) -> dict:
    """`options` (fsspec storage options) with `retry`'s settings under what the user gave (theirs win)."""
    options = dict(options or {})
    ours = retry.s3_options()
    given = options.get("config_kwargs", {})
    options["config_kwargs"] = {**ours["config_kwargs"], **given}
    return options


@dataclass(frozen=True)
class RowRetry:
    """A row's read done again when it failed for the store's sake: at most `attempts` reads in all, the k-th
    retry after a random wait of up to backoff_s * 2**k (full jitter: rows that failed together do not come back
    together), never more than max_backoff_s."""

    attempts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 20.0

    def call(self, read: Callable[[], T], transient: Callable[[BaseException], bool]) -> T:
        """read(), done again while it raises what `transient` accepts, at most `attempts` times in all."""
        for attempt in range(self.attempts):
            try:
                return read()
            except Exception as error:
                if attempt == self.attempts - 1 or not transient(error):
                    raise
            self.wait(attempt)
        raise AssertionError("unreachable")

    def wait(self, attempt: int) -> None:
        """The wait after failed attempt `attempt` (0: the first)."""
        time.sleep(random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt)))


def fetch_checkpoint(uri: str, storage_options: dict | None, retry: RowRetry = RowRetry()) -> str:
    """The local folder of checkpoint `uri` (`checkpoint.local_folder`), fetched again (`retry`: files already
    whole are kept) while the store fails; after the last, StoreUnavailable names the model and the store's error.
    A 404 or a folder that is no checkpoint passes at once: no retry makes it one."""
    from s2t_model import checkpoint

    try:
        return retry.call(lambda: checkpoint.local_folder(uri, storage_options), is_transient)
    except Exception as error:
        if not is_transient(error):
            raise
        raise StoreUnavailable(f"the model {uri}, {retry.attempts} reads", error) from error


def retry_store_errors() -> None:
    """Make Ray Data's own I/O retries (its file reads and writes, in this process and the tasks it starts) match
    the errors of our store's clients too, not only pyarrow's native S3 messages."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.retried_io_errors = [
        *context.retried_io_errors,
        *(text for text in TRANSIENT_MESSAGES if text not in context.retried_io_errors),
    ]
