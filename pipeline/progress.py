"""A long run's progress, counted on the cluster: rows done of the total, audio hours, RTFx, errors so far, ETA.

    driver:  Progress(total and done before the run) -> a named ProgressCounter actor (no CPU), a printer thread
    write tasks:  observe_rows (fused into Ray Data's Write) -> the block's counts -> the actor, and the job's metrics

The driver never sees a row: it asks the actor for a few numbers. The total and what is done before the run come from
the digest sets the job reads first anyway (the manifest's ids, the output's): a resumed run starts where the last
one stopped. In a terminal the line redraws in place; otherwise (logs) one line every `every_s` seconds, and one
at the end. A long recording's segment counts as 1/segment_count of its row, so the count ends at the manifest's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc

from . import metrics
from .reasons import reason_words

log = logging.getLogger(__name__)
TIMELINE_POINTS = 200  # (seconds, rows, audio seconds) samples kept for the report's throughput plot


def row_counts(batch: pa.Table) -> dict:
    """A block of output rows -> rows (segments as fractions of their recording), audio_s (rows without error),
    no_speech, low_confidence, errors {reason: rows}."""
    n = batch.num_rows
    weight = pa.chunked_array([pa.array([1.0] * n, pa.float64())])
    if "segment_count" in batch.column_names:
        weight = pc.divide(1.0, pc.fill_null(pc.cast(batch["segment_count"], pa.float64()), 1.0))
    error = batch["error"] if "error" in batch.column_names else pa.chunked_array([pa.nulls(n, pa.string())])
    ok = pc.fill_null(pc.equal(error, ""), True)
    seconds = (
        pc.if_else(ok, pc.fill_null(batch["duration_s"], 0.0), 0.0) if "duration_s" in batch.column_names else None
    )
    no_speech = pc.and_(ok, pc.fill_null(pc.equal(batch["text"], ""), False)) if "text" in batch.column_names else None
    if no_speech is not None and "avg_logprob" in batch.column_names:
        no_speech = pc.and_(no_speech, pc.is_null(batch["avg_logprob"]))
    low = pc.fill_null(batch["low_confidence"], False) if "low_confidence" in batch.column_names else None
    errors: dict[str, float] = {}
    failed = pc.invert(ok)
    if pc.any(failed).as_py():
        reasons = reason_words(pc.filter(error, failed)).to_pylist()
        for reason, w in zip(reasons, pc.filter(weight, failed).to_pylist()):
            errors[reason] = errors.get(reason, 0.0) + w

    def weighted(mask) -> float:
        return 0.0 if mask is None else pc.sum(pc.if_else(mask, weight, 0.0)).as_py() or 0.0

    return {
        "rows": pc.sum(weight).as_py() or 0.0,
        "audio_s": (pc.sum(seconds).as_py() or 0.0) if seconds is not None else 0.0,
        "no_speech": weighted(no_speech),
        "low_confidence": weighted(low),
        "errors": errors,
    }


@functools.cache
def _counter(name: str):
    import ray

    return ray.get_actor(name)


def observe_rows(batch: pa.Table, counter: str | None = None) -> pa.Table:
    """Rows on their way to the write, unchanged: their counts go to the job's metrics and to the run's
    ProgressCounter (named `counter`), waited for, so that the last count is in before the write returns."""
    import ray

    counts = row_counts(batch)
    errors = counts["errors"]
    ok = counts["rows"] - sum(errors.values())
    metrics.inc("s2t_job_rows_total", ok - counts["no_speech"], outcome="ok", reason="")
    metrics.inc("s2t_job_rows_total", counts["no_speech"], outcome="no_speech", reason="")
    for reason, n in errors.items():
        metrics.inc("s2t_job_rows_total", n, outcome="error", reason=reason)
    metrics.inc("s2t_job_audio_seconds_total", counts["audio_s"])
    metrics.inc("s2t_job_rows_no_speech_total", counts["no_speech"])
    metrics.inc("s2t_job_rows_low_confidence_total", counts["low_confidence"])
    if counter is not None:
        try:
            ray.get(_counter(counter).add.remote(counts))
        except (ray.exceptions.RayActorError, ValueError) as error:  # gone (ValueError: no actor of that name)
            # The counter is there to watch the run; the rows are what the write must not lose.
            log.warning("the run's progress counter is gone (%s): these rows are written uncounted", error)
    return batch


def counted(dataset, counter: str | None):
    """The job's rows on their way to the write, through `observe_rows` (a task: Ray Data fuses it into the write's)."""
    return dataset.map_batches(observe_rows, fn_kwargs=dict(counter=counter), batch_format="pyarrow", batch_size=None)


class Counts:
    """The run's figures so far (the ProgressCounter actor's state)."""

    def __init__(self, totals: tuple[int, int]):
        self.total, self.done_before = totals
        self.started = time.time()
        self.rows = self.audio_s = self.no_speech = self.low_confidence = 0.0
        self.errors: dict[str, float] = {}
        self.timeline: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]

    def add(self, counts: dict) -> None:
        self.rows += counts["rows"]
        self.audio_s += counts["audio_s"]
        self.no_speech += counts["no_speech"]
        self.low_confidence += counts["low_confidence"]
        for reason, n in counts["errors"].items():
            self.errors[reason] = self.errors.get(reason, 0.0) + n
        self.timeline.append((time.time() - self.started, self.rows, self.audio_s))
        if len(self.timeline) > 2 * TIMELINE_POINTS:
            self.timeline = self.timeline[::2]  # every other point: evenly thinned, first one kept

    def snapshot(self) -> dict:
        return {
            "total": self.total,
            "done_before": self.done_before,
            "rows": self.rows,
            "audio_s": self.audio_s,
            "no_speech": self.no_speech,
            "low_confidence": self.low_confidence,
            "errors": dict(self.errors),
            "elapsed_s": time.time() - self.started,
            "timeline": list(self.timeline),
        }


def start_counts(manifest_ids, done_ids) -> tuple[int, int]:
    """(manifest rows, of them those the output holds) from the two digest sets (done_ids None: an empty output)."""
    import numpy as np

    from .ids import DIGEST, compare

    counts, _ = compare(manifest_ids, done_ids if done_ids is not None else np.empty(0, dtype=DIGEST))
    return counts["n_in"], counts["n_in"] - counts["missing"]


def line(s: dict, label: str = "rows") -> str:
    """`1,234/50,000 rows (2.5 %), 3.40 h audio, RTFx 12.3, 5 errors, ETA 0:12:34`"""
    done = s["done_before"] + s["rows"]
    total = max(s["total"], 1)
    elapsed = max(s["elapsed_s"], 1e-9)
    errors = sum(s["errors"].values())
    rate = s["rows"] / elapsed
    left = max(s["total"] - done, 0)
    eta = "0:00:00" if not left else (clock(left / rate) if rate > 0 else "?")
    share = math.floor(1000 * done / total + 1e-6) / 10  # 99.99 % is not yet 100.0 %
    return (
        f"{round(done):,}/{s['total']:,} {label} ({share:.1f} %), "
        f"{(s['audio_s']) / 3600:.2f} h audio, RTFx {s['audio_s'] / elapsed:.1f}, "
        f"{round(errors):,} errors, ETA {eta}"
    )


def clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The run's counter and its printer: `with Progress(run_id, totals, every_s) as progress:` ... the job passes
    `progress.name` to `observe_rows`; after the block, `progress.last` is the final snapshot.

    totals: (total, done before the run), or the ObjectRef of a task computing them (`start_counts`): the actor
    starts once they are known, without holding up the driver."""

    def __init__(self, run_id: str, totals, every_s: float = 30.0, label: str = "rows", stream=None):
        self.name = f"s2t-progress-{run_id}"
        self.totals, self.every_s, self.label = totals, every_s, label
        self.stream = stream
        self.last: dict | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "Progress":
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = ray.remote(num_cpus=0, max_concurrency=4)(Counts)
        # On the driver's node: a node lost mid-run (the job carries on without it) must not take the counter along,
        # and a driver's node lost ends the run anyway.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = actor.options(name=self.name, scheduling_strategy=here).remote(self.totals)
        self._thread = threading.Thread(target=self._print_every, daemon=True, name="s2t-progress")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        try:
            self.last = ray.get(self.actor.snapshot.remote())
            if exc[0] is None:
                self._write(self.last, final=True)
        except Exception:
            if exc[0] is None:
                raise
            # the job's own error is the one to see, not that its counter went with it
        finally:
            with contextlib.suppress(Exception):
                ray.kill(self.actor)

    def _out(self):
        return self.stream or sys.stderr

    def _print_every(self) -> None:
        import ray

        tty = self._out().isatty()
        while not self._stop.wait(1.0 if tty else self.every_s):
            with contextlib.suppress(Exception):  # a report missed is no reason to stop the job
                self._write(ray.get(self.actor.snapshot.remote()), final=False, tty=tty)

    def _write(self, snapshot: dict, final: bool, tty: bool | None = None) -> None:
        out = self._out()
        tty = out.isatty() if tty is None else tty
        text = f"progress: {line(snapshot, self.label)}"
        if tty:
            out.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            out.write(text + "\n")
        out.flush()


def quiet_ray(verbose: bool) -> None:
    """Ray Data's progress bars, operator plans and INFO lines, on only with --verbose (this line says more)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    # ERROR, not WARNING: else Ray Data says that its progress bars are off, each run.
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)


def ray_init_options(verbose: bool) -> dict:
    """ray.init's options for a command-line run: workers' output and Ray's INFO lines only with --verbose."""
    return dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
