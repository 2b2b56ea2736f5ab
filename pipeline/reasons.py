"""Why a row failed: the first word of its `error` (`<reason>: <what and where>`), one member of `Reason`.

A reason is final when the input is at fault (a file that is not there, not audio, cut short, a bad manifest line):
running again gives the same answer. It is retryable when we or the store are (`unavailable`: the store or the
network failed after every retry; `generation_failed`: our model code failed on the row): a rerun does such rows
again by default, and a job that leaves any exits non-zero (docs/faults.md).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from enum import StrEnum

import pyarrow as pa
import pyarrow.compute as pc


class Reason(StrEnum):
    MISSING = "missing"  # no such file (404), no such member of an archive or tar
    EMPTY = "empty"  # zero bytes
    UNREADABLE = "unreadable"  # not audio any decoder reads
    CORRUPT = "corrupt"  # audio that breaks while decoding
    TRUNCATED = "truncated"  # cut short: fewer samples or bytes than its header or the manifest says
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    BAD_MANIFEST_LINE = "bad_manifest_line"
    UNKNOWN_TGT_LANG = "unknown_tgt_lang"
    UNAVAILABLE = "unavailable"  # the store or the network failed (5xx, throttling, resets, timeouts) after retries
    GENERATION_FAILED = "generation_failed"  # the model failed on the row (ours: out of memory, a bug)

    @property
    def final(self) -> bool:
        """Whether the row's input is at fault, so that doing it again gives the same error."""
        return self not in RETRYABLE


RETRYABLE = frozenset({Reason.UNAVAILABLE, Reason.GENERATION_FAILED})


# The reasons versions before `unavailable` gave the store's failures: such a row whose message is a store's error
# (TRANSIENT_MESSAGES) counts as unavailable, so that a rerun repairs what the store broke then too.
LEGACY_STORE_REASONS = ("missing", "unreadable", "corrupt")


def reason_word(error: str) -> str:
    """The reason word of an `error` value: its first word, as written (an older version's may be no member of
    `Reason`), or "unavailable" for an older version's store failure (LEGACY_STORE_REASONS)."""
    word = error.split(":", 1)[0]
    if word in LEGACY_STORE_REASONS and any(text in error for text in TRANSIENT_MESSAGES):
        return Reason.UNAVAILABLE.value
    return word


def reason_words(errors: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """`reason_word` of a column of errors, computed by Arrow (no Python object per row); null where null."""
    words = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
    legacy = pc.is_in(words, value_set=pa.array(LEGACY_STORE_REASONS))
    if not pc.any(legacy).as_py():  # the usual block: no such reason, no message to search
        return words
    store = pc.match_substring(errors, TRANSIENT_MESSAGES[0])
    for text in TRANSIENT_MESSAGES[1:]:
        store = pc.or_(store, pc.match_substring(errors, text))
    return pc.if_else(pc.and_(legacy, store), Reason.UNAVAILABLE.value, words)


def reason_of(error: str | None) -> Reason | None:
    """The reason of an `error` value (None for a row without error); a word no member has (an older version's)
    counts as unreadable, final."""
    if not error:
        return None
    try:
        return Reason(reason_word(error))
    except ValueError:
        return Reason.UNREADABLE


def retryable(error: str | None) -> bool:
    reason = reason_of(error)
    return reason is not None and not reason.final


def parse_reasons(names: str) -> frozenset[Reason]:
    """`--retry-errors` values -> the reasons: a comma-separated list of members, or "all"."""
    if names.strip() == "all":
        return frozenset(Reason)
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in Reason.__members__.values()]
    if unknown:
        raise ValueError(f"unknown error reasons {', '.join(unknown)}; they are {', '.join(Reason)} (or all)")
    return frozenset(Reason(name) for name in chosen)


UNAVAILABLE_MARK = "s2t: the store is unavailable"  # in errors raised as StoreUnavailable, for the match below
# An OSError of the store or the network, by its errno: EREMOTEIO is s3fs's for a 5xx; the rest are a connection's.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EREMOTEIO,
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ESTALE,
    }
)
# Substrings of the errors the store's clients raise once their own retries are spent (s3fs, aiohttp, botocore,
# pyarrow's S3), also given to Ray Data's own I/O retries (`DataContext.retried_io_errors`), which match messages.
TRANSIENT_MESSAGES = (
    "Internal Server Error",
    "InternalError",
    "internal error",
    "Service Unavailable",
    "ServiceUnavailable",
    "SlowDown",
    "Slow Down",
    "reduce your request rate",
    "Bad Gateway",
    "Gateway Timeout",
    "[Errno 121]",
    "Response payload is not completed",
    "ClientPayloadError",
    "ServerDisconnected",
    "Server disconnected",
    "Connection reset",
    "ConnectionReset",
    "Connection was closed",
    "ConnectionClosed",
    "Connection aborted",
    "Read timeout",
    "timed out",
    "TimeoutError",
    "IncompleteRead",
    "Could not connect",
    "Cannot connect",
    "EndpointConnectionError",
    UNAVAILABLE_MARK,
)


class StoreUnavailable(OSError):
    """A read that failed for the store's or the network's sake after every retry (Ray Data's retries match it)."""

    def __init__(self, what: str, error: BaseException):
        super().__init__(f"{UNAVAILABLE_MARK}: {what}: {type(error).__name__}: {error}")


def is_transient(error: BaseException) -> bool:
    """Whether `error` is the store's or the network's (worth a retry), not the file's: 5xx, throttling, resets,
    incomplete bodies, timeouts. FileNotFoundError (404) and the like are the file's."""
    if isinstance(error, StoreUnavailable):
        return True
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError, asyncio.TimeoutError, socket.timeout)):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    names = {kind.__name__ for kind in type(error).__mro__}
    # aiohttp's and botocore's own (not imported here: this module is imported by processes that have neither).
    if names & {
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientOSError",
        "ServerTimeoutError",
        "HTTPClientError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "EndpointConnectionError",
        "FSTimeoutError",
        "IncompleteRead",
        "ResponseParserError",
    }:
        return True
    return any(text in str(error) for text in TRANSIENT_MESSAGES)
