"""`s2t bench serve`: the Serve endpoint with batching on against batching off, same clips, same concurrency levels.

Both sides are the real endpoint (`pipeline.serve.build_app`) on a local Ray, reached over HTTP on 127.0.0.1:
(a) batched:   max_batch_size from --max-batch-size (requests meet in `@serve.batch`, wait up to --batch-wait-ms);
(b) unbatched: max_batch_size 1 (each request decodes alone), everything else the same.
The application is deleted and deployed again between the two sides, so they never share a replica.

At each concurrency level C, C client coroutines (one async httpx client) send the same fixed list of --requests
requests, the demo clips in manifest order, cycling, to `POST /v1/audio/transcriptions`; a coroutine sends its next
request when its last one is answered (closed loop). Warm-up requests go first at each side and are not counted.
Throughput counts 200 responses over the level's wall time (first send to last answer): requests/s and audio
seconds/s. Latency is each 200 response's, send to answer, at the client. Every non-200 (and transport error) is
counted and printed. With --rounds R the two sides are deployed and measured R times, alternating, and each level's
figures pool the R runs (latencies together, wall times summed): on a shared machine, other load then falls on both.

Also printed, per level: the CPU time per request of the client (this process), Serve's HTTP proxy and the replica,
read from /proc (local processes only). Batching can only raise throughput by what it saves there, or by keeping a
replica busy that otherwise waits.

Target: at concurrency 32, batching gives >= 2x the throughput of no batching with a p99 latency no worse than 2x
the unbatched p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass

from s2t_model import DEMO_CORPUS, DEMO_MODEL

APP_NAME = "s2t-bench"
TARGET_CONCURRENCY = 32
TARGET_SPEEDUP = 2.0  # batched throughput / unbatched, at least
TARGET_P99_RATIO = 2.0  # batched p99 / unbatched p99, at most


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEMO_MODEL, help="checkpoint folder (default: the bundled demo model)")
    parser.add_argument(
        "--corpus",
        default=DEMO_CORPUS,
        help="folder with manifest.jsonl (NeMo, relative audio_filepath) whose clips are sent",
    )
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batched side's max_batch_size")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=None, help="how long a batch waits to fill (default: ServeConfig's)"
    )
    parser.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests a replica holds at once (default: ServeConfig's)",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=None,
        help="padded feature frames per generation batch: a batch is sorted by length and cut so "
        "that size x longest stays within it (default: ServeConfig's)",
    )
    parser.add_argument(
        "--cpus-per-replica",
        type=float,
        default=None,
        help="CPUs the replica reserves, which is also its torch thread count (OMP_NUM_THREADS; "
        "default: ServeConfig's)",
    )
    parser.add_argument("--requests", type=int, default=64, help="timed requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="deploy and measure each side this many times, alternating, and pool the figures "
        "(evens out other load on a shared machine)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed requests before each side, sent at the highest level (default: that level)",
    )
    parser.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray (default: the cores, or the replica's CPUs if more)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")


# ------------------------------------------------------------------------------------------ pure helpers (tested)


def parse_levels(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]: positive, distinct, in the order given."""
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or any(level < 1 for level in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"--concurrency {text!r}: give distinct positive integers, e.g. 1,8,32")
    return levels


def request_plan(clips: list, count: int) -> list:
    """The fixed list of requests: the clips in order, cycling, `count` of them."""
    if not clips:
        raise ValueError("no clips to send")
    return [clips[i % len(clips)] for i in range(count)]


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics: numpy's default method."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Level:
    """One concurrency level of one side."""

    concurrency: int
    requests: int
    ok: int
    failed: dict  # status (0: transport error, -1: a 200 without a transcript) -> count
    wall_s: float
    audio_s: float  # audio of the 200 responses
    rps: float
    audio_rate: float  # audio seconds per wall second
    p50_ms: float
    p99_ms: float
    mean_ms: float


def summarize(concurrency: int, results: list[tuple[int, float, float]], wall_s: float) -> Level:
    """results: (HTTP status, latency s, audio s) per request. Throughput and latency count the 200s only."""
    ok = [(latency, audio) for status, latency, audio in results if status == 200]
    latencies = [latency * 1000 for latency, _ in ok]
    audio_s = sum(audio for _, audio in ok)
    failed = dict(sorted(Counter(status for status, _, _ in results if status != 200).items()))
    return Level(
        concurrency=concurrency,
        requests=len(results),
        ok=len(ok),
        failed=failed,
        wall_s=wall_s,
        audio_s=audio_s,
        rps=len(ok) / wall_s if wall_s > 0 else 0.0,
        audio_rate=audio_s / wall_s if wall_s > 0 else 0.0,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        mean_ms=sum(latencies) / len(latencies) if latencies else math.nan,
    )


def verdict(batched: Level, unbatched: Level) -> tuple[bool, float, float]:
    """(met, batched/unbatched throughput, batched/unbatched p99). Failed requests fail the target."""
    speedup = batched.rps / unbatched.rps if unbatched.rps else math.nan
    p99_ratio = batched.p99_ms / unbatched.p99_ms if unbatched.p99_ms else math.nan
    clean = batched.ok == batched.requests and unbatched.ok == unbatched.requests
    return clean and speedup >= TARGET_SPEEDUP and p99_ratio <= TARGET_P99_RATIO, speedup, p99_ratio


# ------------------------------------------------------------------------------------------------------ the clips


@dataclass
class Clip:
    name: str
    data: bytes
    duration: float


def load_clips(corpus: str) -> list[Clip]:
    with open(os.path.join(corpus, "manifest.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    clips = []
    for row in rows:
        path = os.path.join(corpus, row["audio_filepath"])
        with open(path, "rb") as f:
            clips.append(Clip(os.path.basename(path), f.read(), float(row["duration"])))
    return clips


# ---------------------------------------------------------------------------------------------- the client side


async def send_all(client, plan: list[Clip], concurrency: int) -> tuple[list[tuple[int, float, float]], list, float]:
    """`concurrency` coroutines share `plan`, each sending its next request when its last one is answered.
    Returns (status, latency s, audio s) and the text (None unless 200) per request, and the wall time."""
    import httpx

    results: list = [None] * len(plan)
    texts: list = [None] * len(plan)
    next_index = 0

    async def worker():
        nonlocal next_index
        while next_index < len(plan):
            i = next_index
            next_index += 1
            clip = plan[i]
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/audio/transcriptions", files={"file": (clip.name, clip.data, "audio/flac")}
                )
                status = response.status_code
                if status == 200:
                    texts[i] = response.json()["text"]
            except httpx.HTTPError:
                status = 0
            except (ValueError, KeyError, TypeError):  # a 200 without a JSON transcript counts as a failure
                status = -1
            results[i] = (status, time.perf_counter() - started, clip.duration)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(plan)))))
    return results, texts, time.perf_counter() - started


async def run_side(url: str, plan: list[Clip], levels: list[int], warmup: int, timeout: float) -> list[dict]:
    """Warm-up, then each level in turn: per level its results, texts, wall time and CPU seconds by process."""
    import httpx

    most = max(levels)
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        if warmup:
            await send_all(client, request_plan(plan, warmup), most)  # also opens the connections
        out = []
        for level in levels:
            before = process_cpu_s()
            results, texts, wall_s = await send_all(client, plan, level)
            after = process_cpu_s()
            cpu = {
                name: after[name][1] - before[name][1]
                for name in after  # the same process only
                if name in before and before[name][0] == after[name][0]
            }
            out.append(dict(level=level, results=results, texts=texts, wall_s=wall_s, cpu=cpu))
        return out


# ---------------------------------------------------------------------------------------------- the server side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(args, replica_cpus: float) -> tuple[bool, str]:
    """(started here, note). Serve's controller and proxy reserve 0 CPUs; the replica reserves `replica_cpus`."""
    import ray

    if ray.is_initialized():
        return False, f"Ray already running here with {ray.cluster_resources().get('CPU', 0):g} logical CPUs"
    cores = os.cpu_count() or 1
    num_cpus = args.ray_cpus or max(cores, math.ceil(replica_cpus))
    ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False)
    note = f"local Ray started with {num_cpus} logical CPUs on {cores} cores"
    if num_cpus > cores:
        note += (
            f" (more than the cores: the replica reserves {replica_cpus:g}; Serve's controller and proxy "
            f"reserve 0 but run on the same cores)"
        )
    return True, note


def replica_threads(config) -> str:
    """The torch threads a replica of `config` gets: a probe actor with the replica's actor options reports them
    (Ray sets OMP_NUM_THREADS to the reserved CPUs, at least 1, in each worker before torch starts). Run while
    no replica holds the CPUs."""
    import ray

    @ray.remote
    class Probe:
        def threads(self):
            import torch

            return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    probe = Probe.options(**config.deployment_options()["ray_actor_options"]).remote()
    try:
        omp, threads = ray.get(probe.threads.remote())
    finally:
        ray.kill(probe)
    return f"{threads} (OMP_NUM_THREADS={omp})"


def process_cpu_s() -> dict[str, tuple[int, float]]:
    """(pid, CPU seconds (user + system) so far) of the processes a request passes through on this machine: this one
    (the client, and Ray's driver threads), Serve's HTTP proxy, the ingress and the model's replica. Found in /proc by
    their titles, among this process' descendants only (a local Ray started here: its raylet is our child, its
    workers the raylet's), so that another Ray on the same machine never counts."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, titles = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                titles[int(pid)] = f.read()
        except (OSError, IndexError, ValueError):
            continue

    def ours(pid: int) -> bool:
        for _ in range(16):
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
            if pid <= 1:
                return False
        return False

    found = {"client": os.getpid()}
    for pid, title in titles.items():
        if f"ServeReplica:{APP_NAME}:Speech2TextServer".encode() in title and ours(pid):
            found["replica"] = pid
        elif f"ServeReplica:{APP_NAME}:Speech2TextIngress".encode() in title and ours(pid):
            found["ingress"] = pid  # relays requests to the replica (pipeline/serve_ingress.py)
        elif title.startswith(b"ray::ProxyActor") and ours(pid):
            found["proxy"] = pid
    seconds = {}
    for name, pid in found.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            seconds[name] = pid, (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return seconds


def deploy(config: dict) -> None:
    from ray import serve

    from pipeline.serve import build_app

    serve.run(build_app(config), name=APP_NAME, route_prefix="/")


def undeploy() -> None:
    """Delete the application and wait until its replica is gone, so the next one gets its CPUs."""
    from ray import serve

    serve.delete(APP_NAME, _blocking=True)


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------------------- report


def ms(value: float, width: int = 8) -> str:
    return f"{value:{width}.0f}" if not math.isnan(value) else f"{'-':>{width}}"


def print_table(rows: list[tuple[Level, Level, float, float]]) -> None:
    """rows: (batched, unbatched, batched replica CPU ms per request, unbatched's)."""
    head = f"{'req/s':>7} {'audio s/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms':>6}"
    print(f"\n  {'':>4} | {'batched':^41} | {'unbatched':^41} | {'batched / unbatched':^19}")
    print(f"  {'conc':>4} | {head} | {head} | {'throughput':>10} {'p99':>8}")
    for b, u, b_cpu, u_cpu in rows:
        speedup = b.rps / u.rps if u.rps else math.nan
        p99 = b.p99_ms / u.p99_ms if u.p99_ms else math.nan
        cells = [
            f"{s.rps:7.2f} {s.audio_rate:9.2f} {ms(s.p50_ms, 7)} {ms(s.p99_ms, 7)} {ms(cpu, 6)}"
            for s, cpu in ((b, b_cpu), (u, u_cpu))
        ]
        print(f"  {b.concurrency:>4} | {cells[0]} | {cells[1]} | {speedup:9.2f}x {p99:7.2f}x")
    print("  CPU ms: the replica process' CPU time per request (all its threads), from /proc")


def describe(level: Level, cpu: dict) -> str:
    names = {0: "transport error", -1: "200 without a transcript"}
    failed = ", ".join(f"{n} x {names.get(s, s)}" for s, n in level.failed.items())
    per_request = ", ".join(f"{k} {1000 * v / level.requests:.0f}" for k, v in cpu.items())
    return (
        f"concurrency {level.concurrency:>3}: {level.ok}/{level.requests} ok in {level.wall_s:.1f} s, "
        f"{level.rps:.2f} req/s, p50 {level.p50_ms:.0f} ms, p99 {level.p99_ms:.0f} ms"
        + (f"; NOT 200: {failed}" if failed else "")
        + f"; CPU ms per request: {per_request}"
    )


def main(args) -> None:
    import torch
    from ray import serve

    from pipeline.serve import ServeConfig

    levels = parse_levels(args.concurrency)
    if args.rounds < 1 or args.requests < 1:
        raise SystemExit("--rounds and --requests must be at least 1")
    clips = load_clips(args.corpus)
    plan = request_plan(clips, args.requests)
    warmup = max(levels) if args.warmup is None else args.warmup
    base = {"model": args.model, "num_beams": args.num_beams, "device": args.device, "dtype": args.dtype}
    for option in ("batch_wait_ms", "max_ongoing_requests", "max_frames", "cpus_per_replica"):
        if getattr(args, option) is not None:
            base[option] = getattr(args, option)
    sides = {
        "batched": ServeConfig(**base, max_batch_size=args.max_batch_size),
        "unbatched": ServeConfig(**base, max_batch_size=1),
    }
    config = sides["batched"]

    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_average()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads in this (client) process, cuda "
        f"{'yes' if torch.cuda.is_available() else 'no'}"
    )
    started_ray, note = start_ray(args, config.cpus_per_replica * config.replicas)
    print(f"ray: {note}")
    print(
        f"server: {args.model}, num_beams {config.num_beams}, {config.replicas} replica x "
        f"{config.cpus_per_replica:g} CPU, batch_wait_ms {config.batch_wait_ms:g}, max_ongoing_requests "
        f"{config.max_ongoing_requests}, max_frames {config.max_frames}, device {config.device}, dtype "
        f"{config.dtype}; batched "
        f"max_batch_size {args.max_batch_size} vs unbatched 1"
    )
    print(
        f"load: {len(plan)} timed requests per level ({sum(c.duration for c in plan):.1f} s of audio, the "
        f"{len(clips)} clips of {args.corpus} in order, cycling), levels {levels}, {warmup} warm-up requests "
        f"per side at concurrency {max(levels)}; closed loop, one async httpx client"
        + (f"; {args.rounds} rounds, sides alternating, figures pooled over rounds" if args.rounds > 1 else "")
    )

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    measured: dict[str, list[list[dict]]] = {name: [] for name in sides}  # side -> round -> level
    try:
        for round_ in range(args.rounds):
            for name, side in sides.items():
                label = f" round {round_ + 1}/{args.rounds}" if args.rounds > 1 else ""
                print(f"\n{name}{label}: deploying (max_batch_size {side.max_batch_size}) ...", flush=True)
                threads = replica_threads(side)
                t0 = time.perf_counter()
                deploy(side.model_dump())
                print(
                    f"  ready in {time.perf_counter() - t0:.1f} s; replica torch threads {threads}; "
                    f"load average {load_average()}",
                    flush=True,
                )
                measured[name].append(asyncio.run(run_side(url, plan, levels, warmup, args.timeout)))
                for run in measured[name][-1]:
                    level = summarize(run["level"], run["results"], run["wall_s"])
                    print(f"  {describe(level, run['cpu'])}; load average {load_average()}", flush=True)
                undeploy()
    finally:
        if started_ray:
            import ray

            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)

    def pooled(name: str, index: int) -> tuple[Level, float]:
        runs = [rounds[index] for rounds in measured[name]]
        level = summarize(
            levels[index], [r for run in runs for r in run["results"]], sum(run["wall_s"] for run in runs)
        )
        replica_s = sum(run["cpu"].get("replica", math.nan) for run in runs)
        return level, 1000 * replica_s / level.requests

    rows = [(*pooled("batched", i), *pooled("unbatched", i)) for i in range(len(levels))]
    rows = [(b, u, b_cpu, u_cpu) for b, b_cpu, u, u_cpu in rows]
    print_table(rows)
    total = sum(s.requests for b, u, _, _ in rows for s in (b, u))
    non_200 = sum(s.requests - s.ok for b, u, _, _ in rows for s in (b, u))
    print(f"\n  responses not 200: {non_200} of {total}")
    by_clip: dict[str, set] = {}
    for name in sides:
        for rounds in measured[name]:
            for run in rounds:
                for clip, text in zip(plan, run["texts"]):
                    by_clip.setdefault(clip.name, set()).add(text)
    same = sum(len(texts) == 1 and None not in texts for texts in by_clip.values())
    print(f"  clips whose every response, batched or not, is the same 200 text: {same} of {len(by_clip)}")
    samples = len(plan) * args.rounds
    print(
        f"  p50/p99: of the {samples} latencies of a level"
        + (", so p99 lies between its two slowest" if 2 <= samples <= 100 else "")
    )

    print(
        f"\n  target: at concurrency {TARGET_CONCURRENCY}, batched throughput >= {TARGET_SPEEDUP:g}x unbatched, "
        f"batched p99 <= {TARGET_P99_RATIO:g}x unbatched p99, every response 200"
    )
    at_target = [(b, u) for b, u, _, _ in rows if b.concurrency == TARGET_CONCURRENCY]
    if not at_target:
        print(f"  NOT EVALUATED: concurrency {TARGET_CONCURRENCY} was not among the levels run")
        return
    met, speedup, p99_ratio = verdict(*at_target[0])
    print(
        f"  {'MET' if met else 'NOT MET'}: throughput {speedup:.2f}x, p99 {p99_ratio:.2f}x "
        f"(on {os.cpu_count()} CPUs, replica {config.cpus_per_replica:g} CPU, load average now {load_average()})"
    )
