"""`s2t bench serve`'s pure parts: percentiles as numpy computes them, the per-level summary, the verdict, the plan.
No server is started here."""

import math

import numpy as np
import pytest

from bench import serve as bench_serve
from bench.serve import Level, percentile, request_plan, summarize, verdict
from jobs import cli
from s2t_model import DEMO_CORPUS


@pytest.mark.parametrize("n", [1, 2, 3, 16, 64, 101])
@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 99.9, 100])
def test_percentile_is_numpys(n, q):
    values = np.random.default_rng(n).lognormal(size=n).tolist()
    assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)
    assert percentile(reversed(values), q) == pytest.approx(np.percentile(values, q), rel=1e-12)  # any order


def test_percentile_of_nothing_is_nan():
    assert math.isnan(percentile([], 99))


def test_summary_counts_200s_only_and_tallies_the_rest():
    latencies = [0.1, 0.2, 0.3, 0.4, 5.0]
    results = [(200, t, 2.0) for t in latencies] + [(503, 0.01, 2.0), (503, 0.02, 3.0), (0, 9.0, 4.0)]
    level = summarize(8, results, wall_s=2.0)
    assert (level.concurrency, level.requests, level.ok) == (8, 8, 5)
    assert level.failed == {0: 1, 503: 2}
    assert level.rps == 2.5 and level.audio_s == 10.0 and level.audio_rate == 5.0
    ms = [t * 1000 for t in latencies]
    assert level.p50_ms == pytest.approx(np.percentile(ms, 50))
    assert level.p99_ms == pytest.approx(np.percentile(ms, 99))
    assert level.mean_ms == pytest.approx(np.mean(ms))


def test_summary_with_no_200_has_no_latency():
    level = summarize(1, [(500, 0.1, 1.0)], wall_s=1.0)
    assert level.ok == 0 and level.rps == 0 and math.isnan(level.p99_ms)


def level(rps: float, p99_ms: float, ok: int = 64) -> Level:
    return Level(
        concurrency=32,
        requests=64,
        ok=ok,
        failed={} if ok == 64 else {503: 64 - ok},
        wall_s=1.0,
        audio_s=0.0,
        rps=rps,
        audio_rate=0.0,
        p50_ms=p99_ms / 2,
        p99_ms=p99_ms,
        mean_ms=p99_ms / 2,
    )


@pytest.mark.parametrize(
    "batched, unbatched, met",
    [
        (level(20, 300), level(10, 150), True),  # exactly 2x throughput, exactly 2x p99: met
        (level(19.9, 100), level(10, 150), False),  # throughput short
        (level(40, 301), level(10, 150), False),  # p99 too high
        (level(40, 100, ok=63), level(10, 150), False),  # one non-200 fails it
        (level(40, 100), level(10, 150, ok=63), False),
    ],
)
def test_verdict(batched, unbatched, met):
    ok, speedup, p99_ratio = verdict(batched, unbatched)
    assert ok is met
    assert speedup == pytest.approx(batched.rps / unbatched.rps)
    assert p99_ratio == pytest.approx(batched.p99_ms / unbatched.p99_ms)


def test_plan_cycles_through_the_clips_in_order():
    assert request_plan(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    with pytest.raises(ValueError):
        request_plan([], 3)


def test_levels():
    assert bench_serve.parse_levels("1,8,32") == [1, 8, 32]
    assert bench_serve.parse_levels(" 4 ") == [4]
    for bad in ("", "0,8", "8,8", "-1"):
        with pytest.raises(ValueError):
            bench_serve.parse_levels(bad)


def test_demo_clips_load_with_their_durations():
    clips = bench_serve.load_clips(DEMO_CORPUS)
    assert len(clips) == 50 and all(c.data[:4] == b"fLaC" and 1 <= c.duration <= 12.5 for c in clips)


def test_the_command_is_registered():
    args = cli.build_parser().parse_args(
        ["bench", "serve", "--requests", "16", "--concurrency", "1,8", "--cpus-per-replica", "2"]
    )
    assert args.run is bench_serve.main and args.requests == 16 and args.concurrency == "1,8"
    assert args.cpus_per_replica == 2.0 and args.max_batch_size == 16 and args.num_beams == 5


def test_cpu_accounting_finds_this_process_and_no_replica_of_another_ray():
    import os

    seconds = bench_serve.process_cpu_s()
    assert seconds["client"][0] == os.getpid() and seconds["client"][1] > 0
    # Only descendants of this process count: another Ray's replicas on the machine (another bench) never do.
    assert "replica" not in seconds
