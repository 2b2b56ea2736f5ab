"""The lease that keeps two runs from filling in one output at once (`s2t transcribe` and `s2t backfill`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import fsspec

log = logging.getLogger(__name__)
LEASE = "_lease.json"


class LeaseHeld(RuntimeError):
    pass


class Lease:
    """`<output>/_lease.json`, created only if absent (S3 `If-None-Match: *`, a local `O_EXCL`: fsspec's "xb"
    mode), so of runs starting at the same moment exactly one holds it; renewed by a thread while the run lasts.
    Another run's lease is respected while it is fresh and its process (when on this host) lives; a stale one is
    taken over by whichever run first creates `_lease.takeover-<its run id>`, again only if absent. A create whose
    answer was lost (a reset after the store took it) is retried by the client and refused as already there: a file
    that holds this run's own id is this run's."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, run_id: str, ttl_s: float):
        self.fs, self.path, self.run_id, self.ttl_s = fs, f"{root.rstrip('/')}/{LEASE}", run_id, ttl_s
        self.root = root.rstrip("/")
        self.stop = threading.Event()

    def __enter__(self) -> "Lease":
        self.fs.makedirs(self.root, exist_ok=True)
        if not self.create(self.path, self.record()):
            held = self.read()
            if held is not None and held.get("run_id") == self.run_id:
                pass  # our own create took effect and its answer was lost: the client's retry found it there
            elif held is None:  # let go between our attempt and the read: one more attempt
                if not self.create(self.path, self.record()):
                    raise LeaseHeld(f"{self.path}: another run took the lease at the same moment")
            elif not self.stale(held):
                raise LeaseHeld(
                    f"{self.path}: run {held['run_id']} (pid {held['pid']} on {held['host']}, started "
                    f"{held['started']}) is filling in this output; try again when it is done, or delete the lease if "
                    f"that run is dead"
                )
            elif (
                not self.create(f"{self.root}/_lease.takeover-{held['run_id']}", self.record())
                and (self.read(f"{self.root}/_lease.takeover-{held['run_id']}") or {}).get("run_id") != self.run_id
            ):
                raise LeaseHeld(f"{self.path}: another run is taking over the stale lease of run {held['run_id']}")
            else:
                self.write()
        self.thread = threading.Thread(target=self.renew, daemon=True)
        self.thread.start()
        return self

    def create(self, path: str, record: dict) -> bool:
        """Write `record` to `path` only if no file is there; whether this call created it."""
        try:
            with self.fs.open(path, "xb") as f:
                f.write(json.dumps(record).encode())
            return True
        except FileExistsError:
            return False
        except OSError as error:  # s3fs reports a failed precondition (HTTP 412) as a plain OSError
            if "412" in str(error) or "Precondition" in str(error):
                return False
            raise

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if (self.read() or {}).get("run_id") == self.run_id:
            self.fs.rm(self.path)

    def read(self, path: str | None = None) -> dict | None:
        try:
            with self.fs.open(path or self.path, "r") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def record(self) -> dict:
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "expires": time.time() + self.ttl_s,
        }

    def write(self) -> None:
        with self.fs.open(self.path, "w") as f:
            json.dump(self.record(), f)

    def renew(self) -> None:
        while not self.stop.wait(self.ttl_s / 3):
            try:
                self.write()
            except Exception as error:  # a failed write must not end the renewals: the next one may succeed
                log.warning("could not renew %s: %s", self.path, error)

    @staticmethod
    def stale(held: dict) -> bool:
        if held.get("expires", 0) < time.time():
            return True
        if held.get("host") == socket.gethostname():
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True  # its process is gone: killed before it could let go
            except PermissionError:
                pass
        return False
