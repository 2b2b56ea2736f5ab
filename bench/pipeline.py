"""`s2t bench pipeline`: the whole Ray Data job against the model alone, same corpus, same options, one process.

(a) job:        `pipeline.transcribe.run(TranscribeConfig(...))` on a local Ray, writing Parquet to a temporary folder.
                Timed: the whole of run() (manifest read, actor start-up and model loading in the actors, audio
                reading, features, generation, Parquet writing, summary); not the start of Ray itself (a cluster
                is up before a job is submitted to it).
(b) model-only: this process, no Ray: `pipeline.audio.load_audio`, the model's feature extractor and
                `Speech2Text.transcribe_features`, handed the rows in the job's generation batches (`--batch-size`
                rows in manifest order, features under the same `--max-frames` budget). Timed: reading the audio,
                features and generation; not loading the model (timed apart and printed).

RTFx = audio seconds / wall seconds. Both sides must give the same texts, since they run the same code path.
The corpus repeats the bundled demo clips (with distinct ids) up to `--hours` of audio; no audio is copied.

Fair on a small CPU machine: the model-only side uses every core (torch's default threads), so by default the job
gets one single-threaded generation actor per core (Ray gives an actor as many torch threads as CPUs it reserves;
one multi-threaded actor does worse, as its threads wait for each other whenever Ray's own processes take a core),
and the local Ray is started with more logical CPUs than cores when the job's actors would not all fit at once. Each
side waits first for other processes to leave the CPUs idle (`--quiet-wait`): beside one busy process a 2-thread torch
run on 2 cores slows down several times over, which would measure the neighbours, not the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import tempfile
import time

from s2t_model import DEMO_CORPUS, DEMO_MODEL

TARGET = 0.70  # the job should reach 70 % of the model-only RTFx on this 2-core CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hours", type=float, default=1.0, help="audio in the corpus (at least this much)")
    parser.add_argument("--model", default=DEMO_MODEL, help="checkpoint folder (default: the bundled demo model)")
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--max-frames", type=int, default=24000, help="padded feature frames per generation batch")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows handed to a generation actor at a time "
        "(default: the job's; the model-only side gets "
        "the same batches)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="utterances of this many seconds (the demo clips joined, written as FLAC), instead of "
        "the demo clips as they are",
    )
    parser.add_argument(
        "--rows-per-block",
        type=int,
        default=256,
        help="manifest rows per Ray Data block: the unit the stages hand on and balance",
    )
    parser.add_argument(
        "--generation-cpus",
        type=float,
        default=None,
        help="CPUs the generation actor reserves, which is also its torch thread count "
        "(default on CPU: the cores shared among the generation actors, so that together they may use "
        "what the model-only side uses; 1 with --num-gpus)",
    )
    parser.add_argument(
        "--generation-actors",
        type=int,
        default=None,
        help="generation actors, each loading the model (default: one per core on CPU, 1 with --num-gpus)",
    )
    parser.add_argument("--feature-actors", type=int, default=2, help="most CPU feature actors")
    parser.add_argument("--feature-cpus", type=float, default=1.0, help="CPUs each feature actor reserves")
    parser.add_argument(
        "--feature-stage",
        default="auto",
        choices=["auto", "device", "separate", "fused"],
        help="device: CPU actors decode, the generation actors detect speech and compute features on "
        "their device; separate: features on their own CPU actors; fused: all in the "
        "generation actors (auto: device with GPUs, fused without)",
    )
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per generation actor")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray (default: the cores, or more when the job's actors "
        "and tasks would not fit in them)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the model-only side (default: torch's own, one per core)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of both sides, alternating; the best of each side counts (a shared machine)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each side, wait up to this many seconds for other processes to leave the CPUs "
        "idle (< 25 %% busy); 0: do not wait",
    )
    parser.add_argument("--keep", default=None, help="build corpus and output in this folder and keep them")


# ---------------------------------------------------------------------------------------------------- the corpus


def build_corpus(
    folder: str, hours: float, source: str = DEMO_CORPUS, seconds: float | None = None
) -> tuple[str, float]:
    """A NeMo manifest of `source`'s clips repeated, ids made distinct, until it holds at least `hours` of audio.

    Audio paths are absolute and point at the source's files; with `seconds`, at utterances of that length made of
    the demo clips joined (as many files as there are clips, in <folder>/audio). Returns (manifest path, audio seconds).
    """
    with open(os.path.join(source, "manifest.jsonl"), encoding="utf-8") as f:
        clips = [json.loads(line) for line in f if line.strip()]
    if not clips:
        raise ValueError(f"{source}: the manifest has no rows")
    for clip in clips:
        clip["audio_filepath"] = os.path.join(os.path.abspath(source), clip["audio_filepath"])
    if seconds is not None:
        clips = joined_clips(folder, len(clips), seconds)
    target_s, total_s, rows = hours * 3600, 0.0, []
    while total_s < target_s:
        clip = clips[len(rows) % len(clips)]
        rows.append(dict(clip, id=f"{clip['id']}-r{len(rows) // len(clips):04d}"))
        total_s += clip["duration"]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path, total_s


def joined_clips(folder: str, count: int, seconds: float) -> list[dict]:
    """`count` FLAC files of `seconds` each, the demo clips joined with pauses, as manifest rows."""
    import soundfile

    from bench.feed import RATE, utterances

    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    rows = []
    for i, wave in enumerate(utterances(count, seconds)):
        path = os.path.join(os.path.abspath(folder), "audio", f"joined-{i:03d}.flac")
        soundfile.write(path, wave, RATE)
        rows.append(dict(id=f"joined-{i:03d}", audio_filepath=path, duration=len(wave) / RATE))
    return rows


# ------------------------------------------------------------------------------------------------------ the job


def job_config(args, manifest: str, output: str):
    from pipeline.transcribe import TranscribeConfig

    return TranscribeConfig(
        manifest=manifest,
        output=output,
        model=args.model,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
        feature_actors=args.feature_actors,
        feature_cpus=args.feature_cpus,
        generation_cpus=args.generation_cpus,
        generation_actors=args.generation_actors,
        rows_per_block=args.rows_per_block,
        feature_stage=args.feature_stage,
        num_gpus=args.num_gpus,
        device=args.device,
        dtype=args.dtype,
    )


def fused(args) -> bool:
    from pipeline.transcribe import feature_stage

    return feature_stage(job_config(args, "", "")) == "fused"


def feature_stage(config) -> str:
    from pipeline.transcribe import feature_stage as stage

    return stage(config)


def ray_cpus_needed(args) -> float:
    """Logical CPUs for every actor of the job at once, plus one for the read and write tasks between them."""
    feature_cpus = 0 if fused(args) else args.feature_actors * args.feature_cpus
    return feature_cpus + args.generation_actors * args.generation_cpus + 1


def start_ray(args) -> str:
    import ray
    import ray.data

    if ray.is_initialized():
        return f"Ray already running here with {ray.cluster_resources().get('CPU', 0):g} logical CPUs"
    cores = os.cpu_count() or 1
    needed = ray_cpus_needed(args)
    num_cpus = args.ray_cpus or max(cores, math.ceil(needed))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the figures, not a progress log
    for handler in logging.getLogger("ray.data").handlers:  # quiet on the console; its log file is read below
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    note = f"local Ray started with {num_cpus} logical CPUs on {cores} cores"
    if num_cpus > cores:
        features = "" if fused(args) else f"{args.feature_actors} feature actor(s) x {args.feature_cpus:g} + "
        note += (
            f": the job asks for {needed:g} at once ({features}{args.generation_actors} generation actor(s) x "
            f"{args.generation_cpus:g} + 1 for read/write tasks); with only {cores} the actors would take turns "
            f"instead of overlapping"
        )
    return note


def run_job(args, manifest: str, output: str) -> tuple[dict, float]:
    from pipeline.transcribe import run

    config = job_config(args, manifest, output)
    started = time.perf_counter()
    summary = run(config)
    return summary, time.perf_counter() - started


def job_texts(output: str) -> tuple[dict[str, str | None], int]:
    """The job's text by id, and the tokens it generated."""
    import fsspec
    import pyarrow.compute as pc

    from pipeline.output import read_output

    fs, root = fsspec.core.url_to_fs(output)
    table = read_output(fs, root, lambda name: name in ("id", "text", "num_tokens"))
    tokens = pc.sum(table.column("num_tokens")).as_py() or 0
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist())), tokens


# ------------------------------------------------------------------------------------------------ the model alone


def run_model_only(args, manifest: str) -> dict:
    """Read, featurise and decode every row in this process, in the job's generation batches; times by step."""
    import torch

    from pipeline.audio import AudioError, load_audio
    from pipeline.manifest import read_manifest
    from s2t_model import Speech2Text
    from s2t_model.batching import frame_budget_batches
    from s2t_model.features import num_frames

    # As the job picks it: "auto" is cuda with --num-gpus, else cuda where there is one (GenerateText's rule).
    # The model's speed: each distinct audio slice is decoded once (the corpus repeats its files), the features are
    # computed on the model's device.
    device = "cuda" if args.num_gpus > 0 and args.device == "auto" else args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model = Speech2Text.from_pretrained(args.model, device=device, dtype=getattr(torch, args.dtype))
    load_s = time.perf_counter() - started
    extractor = model.feature_extractor
    rate = extractor.sampling_rate
    rows = read_manifest(manifest).select(["id", "audio", "offset_s", "duration_s"]).to_pylist()
    options = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, max_frames=args.max_frames)

    def synchronize():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    texts: dict[str, str | None] = {}
    decoded: dict[tuple, object] = {}
    tokens = 0
    steps = dict(audio=0.0, features=0.0, generation=0.0)
    audio_s = 0.0
    started = time.perf_counter()
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        t0 = time.perf_counter()
        waves = []
        for row in chunk:
            key = (row["audio"], row["offset_s"], row["duration_s"])
            if key not in decoded:
                try:
                    decoded[key] = load_audio(
                        row["audio"],
                        rate,
                        row["offset_s"] or 0.0,
                        row["duration_s"],
                        min_duration_s=0.1,
                        max_duration_s=30.0,
                    )
                except AudioError:
                    decoded[key] = None
            wave = decoded[key]
            waves.append(wave)
            texts[row["id"]] = None
        good = [i for i, wave in enumerate(waves) if wave is not None]
        audio_s += sum(len(waves[i]) / rate for i in good)
        t1 = time.perf_counter()
        features: list = [None] * len(chunk)
        for part in frame_budget_batches(
            [num_frames(len(waves[good[j]]), rate) for j in range(len(good))], args.max_frames
        ):
            indices = [good[j] for j in part]
            padded, lengths = extractor([waves[i] for i in indices], rate, device=device)
            for i, row, length in zip(indices, padded, lengths.tolist()):
                features[i] = row[:length]
        t2 = time.perf_counter()
        results = model.transcribe_features([features[i] for i in good], tgt_lang=None, **options) if good else []
        synchronize()
        t3 = time.perf_counter()
        for i, result in zip(good, results):
            texts[chunk[i]["id"]] = result.text
            tokens += len(result.ids)
        steps["audio"] += t1 - t0
        steps["features"] += t2 - t1
        steps["generation"] += t3 - t2
    wall_s = time.perf_counter() - started
    return dict(
        texts=texts,
        wall_s=wall_s,
        audio_s=audio_s,
        load_s=load_s,
        steps=steps,
        device=device,
        tokens=tokens,
        threads=torch.get_num_threads(),
    )


# ------------------------------------------------------------------------------------------------------- report

STAGE = re.compile(r"Operator \w+\[(?P<name>[^\]]+)\] completed\. Operator Metrics:\n(?P<metrics>\{.*\})")
FINISHED = re.compile(r"execution finished in (?P<seconds>[\d.]+) seconds")


def ray_data_stages(since: float) -> tuple[float | None, list[dict]]:
    """From the log Ray Data wrote for the dataset this process ran last (after `since`): its execution time, and
    for each stage the tasks run, their total time and the total time spent in our function (`__call__`)."""
    import glob

    import ray

    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # not a local Ray whose logs this process can read
        return None, []
    files = [
        f for f in glob.glob(os.path.join(logs, "ray-data", "ray-data-dataset_*.log")) if os.path.getmtime(f) >= since
    ]
    if not files:
        return None, []
    with open(max(files, key=os.path.getmtime), encoding="utf-8", errors="replace") as f:
        text = f.read()
    finished = FINISHED.search(text)
    stages = []
    for match in STAGE.finditer(text):
        if match["name"] == "Input":
            continue

        def metric(key: str) -> float:
            found = re.search(rf"'{key}': ([\d.e+-]+)", match["metrics"])
            return float(found[1]) if found else 0.0

        stages.append(
            dict(
                name=match["name"],
                tasks=int(metric("num_tasks_finished")),
                rows=int(metric("rows_task_outputs_generated")),
                task_s=metric("task_completion_time_s"),
                udf_s=metric("function_body_time_s"),
            )
        )
    return (float(finished["seconds"]) if finished else None), stages


def cpu_busy(window_s: float = 2.0) -> float | None:
    """Share of the machine's CPU time spent busy over the next `window_s` seconds (/proc/stat; None elsewhere)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(limit_s: float, threshold: float = 0.25) -> str:
    """Wait (at most limit_s) until others leave the cores nearly idle: on a shared 2-core machine one busy process
    beside a 2-thread torch run slows it several times over. Says how busy the machine was when the side began."""
    waited = 0.0
    while True:
        busy = cpu_busy()
        if busy is None:
            return "machine load unknown"
        if busy < threshold or waited >= limit_s:
            break
        waited += 2.0
    note = f"CPUs {100 * busy:.0f} % busy just before, load average {os.getloadavg()[0]:.1f}"
    if waited:
        note += f", after waiting {waited:.0f} s" + (" (gave up)" if busy >= threshold else "")
    return note


def main(args) -> None:
    import torch

    cores = os.cpu_count() or 1
    if args.generation_actors is None:
        args.generation_actors = 1 if args.num_gpus > 0 else cores
    if args.generation_cpus is None:
        args.generation_cpus = 1.0 if args.num_gpus > 0 else float(max(1, cores // args.generation_actors))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        from pipeline.transcribe import generation_batch_size

        args.batch_size = generation_batch_size(job_config(args, "", ""))
    with tempfile.TemporaryDirectory(prefix="s2t-bench-pipeline-") as tmp:
        folder = args.keep or tmp
        manifest, corpus_s = build_corpus(os.path.join(folder, "corpus"), args.hours, seconds=args.seconds)
        rows = sum(1 for _ in open(manifest, encoding="utf-8"))
        made = f"{args.seconds:g} s utterances of the" if args.seconds else "the"
        print(
            f"corpus: {rows} rows, {corpus_s:.0f} s = {corpus_s / 3600:.2f} h of audio ({made} {DEMO_CORPUS} clips "
            f"repeated), {manifest}"
        )
        print(
            f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} torch threads "
            f"in this process, cuda {'yes' if torch.cuda.is_available() else 'no'}"
        )
        print(
            f"options: num_beams {args.num_beams}, max_frames {args.max_frames}, batch_size {args.batch_size}, "
            f"rows_per_block {args.rows_per_block}, "
            f"device {args.device}, dtype {args.dtype}"
        )

        # Rounds alternate the sides (model-only, job, model-only, ...) so that load from elsewhere on a shared
        # machine hits both alike; the best round of each side counts. The first model-only run comes before Ray's
        # processes exist.
        alone = job = None
        for i in range(args.repeats):
            print(f"\nround {i + 1}/{args.repeats}", flush=True)
            load = wait_for_quiet(args.quiet_wait)
            result = run_model_only(args, manifest)
            print(f"  (b) model-only: {result['wall_s']:6.1f} s ({load})", flush=True)
            if alone is None or result["wall_s"] < alone["wall_s"]:
                alone = result
            if i == 0:
                print(f"  {start_ray(args)}")
                stage = feature_stage(job_config(args, "", ""))
                features = (
                    "features in the generation actors"
                    if stage == "fused"
                    else f"{'decode' if stage == 'device' else 'feature'} actors: up to {args.feature_actors} x "
                    f"{args.feature_cpus:g} CPU"
                    + (", speech detection and features on the generation actors' device" if stage == "device" else "")
                )
                print(
                    f"  {features}; {args.generation_actors} generation actor(s) x {args.generation_cpus:g} CPU "
                    f"(so {max(int(args.generation_cpus), 1)} torch threads: Ray sets OMP_NUM_THREADS to an actor's "
                    f"CPUs), {args.num_gpus:g} GPU",
                    flush=True,
                )
            load = wait_for_quiet(args.quiet_wait)
            output = os.path.join(folder, f"output-{i + 1}")  # a fresh folder: nothing to resume
            since = time.time()
            summary, wall_s = run_job(args, manifest, output)
            print(f"  (a) job:        {summary['wall_s']:6.1f} s ({load})", flush=True)
            if job is None or summary["wall_s"] < job["summary"]["wall_s"]:
                execution_s, stages = ray_data_stages(since)
                texts, tokens = job_texts(output)
                job = dict(
                    summary=summary, wall_s=wall_s, texts=texts, tokens=tokens, execution_s=execution_s, stages=stages
                )
    report(args, alone, job)


def report(args, alone: dict, job: dict) -> None:
    summary = job["summary"]
    job_rtfx = summary["rtfx"] or 0.0
    alone_rtfx = alone["audio_s"] / alone["wall_s"]
    ratio = job_rtfx / alone_rtfx if alone_rtfx else 0.0
    same = sum(job["texts"].get(i) == t and t is not None for i, t in alone["texts"].items())
    steps = alone["steps"]
    best = " (best round)" if args.repeats > 1 else ""
    print(f"\n  {'side':<12} {'audio s':>9} {'wall s':>9} {'RTFx':>8}  included in the wall time{best}")
    print(
        f"  {'job':<12} {summary['audio_hours_this_run'] * 3600:9.1f} {summary['wall_s']:9.1f} {job_rtfx:8.2f}  "
        f"all of run(): manifest, actor start-up + model loading, audio, features, generation, Parquet, "
        f"summary (not ray.init)"
    )
    print(
        f"  {'model-only':<12} {alone['audio_s']:9.1f} {alone['wall_s']:9.1f} {alone_rtfx:8.2f}  "
        f"audio {steps['audio']:.1f} s + features {steps['features']:.1f} s + generation "
        f"{steps['generation']:.1f} s; not model loading ({alone['load_s']:.2f} s); {alone['threads']} torch "
        f"threads, {alone['device']}"
    )
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(
        f"\n  job / model-only: {ratio:.2f} ({100 * ratio:.0f} %); target >= {100 * TARGET:.0f} % of model-only "
        f"on this {os.cpu_count()}-core CPU: {verdict}"
    )
    print(
        f"  tokens per audio-second: job {job['tokens'] / max(summary['audio_hours_this_run'] * 3600, 1e-9):.2f}, "
        f"model-only {alone['tokens'] / max(alone['audio_s'], 1e-9):.2f} (a trained model: ~3-4)"
    )
    print(
        f"  identical texts: {same}/{len(alone['texts'])}; job rows ok {summary['rows_ok']}, errors "
        f"{summary['rows_error']}, missing {summary['rows_missing']}, WER {summary.get('wer') or 0:.2f} %"
    )
    if not job["stages"]:
        return
    print("\n  where the job's time went (from Ray Data's log; stages overlap, times are summed over their tasks):")
    if job["execution_s"] is not None:
        print(
            f"    dataset execution {job['execution_s']:.1f} s of the job's {job['wall_s']:.1f} s (the rest: "
            f"manifest, resume check, reading the output back for the summary)"
        )
    for stage in job["stages"]:
        print(
            f"    {stage['name']:<28} {stage['tasks']:4d} tasks, {stage['rows']:6d} rows, {stage['task_s']:7.1f} s "
            f"in tasks, {stage['udf_s']:7.1f} s in __call__"
        )
    generation = next(
        (
            s
            for s in job["stages"]
            if any(name in s["name"] for name in ("GenerateText", "GenerateFromAudio", "TranscribeAudio"))
        ),
        None,
    )
    features = next((s for s in job["stages"] if "ComputeFeatures" in s["name"] or "DecodeAudio" in s["name"]), None)
    if generation and not features:
        busy = generation["udf_s"] / args.generation_actors
        print(
            f"    audio + features + generation in the generation actors: in __call__ {generation['udf_s']:.1f} s "
            f"(model-only: {sum(steps.values()):.1f} s for the same work); each of the {args.generation_actors} "
            f"actor(s) idle {job['wall_s'] - busy:.1f} s of {job['wall_s']:.1f} s on average (start-up, model "
            f"loading, the tail)"
        )
    if generation and features:
        actors = args.generation_actors
        busy = generation["udf_s"] / actors
        print(
            f"    generation: in __call__ {generation['udf_s']:.1f} s (model-only: {steps['generation']:.1f} s "
            f"generating the same rows); each of the {actors} actor(s) idle {job['wall_s'] - busy:.1f} s of "
            f"{job['wall_s']:.1f} s on average (start-up, model loading, waiting for features, the tail)"
        )
        print(
            f"    features: in __call__ {features['udf_s']:.1f} s (model-only: "
            f"{steps['audio'] + steps['features']:.1f} s reading audio and computing features), on the same "
            f"{os.cpu_count()} cores as generation"
        )
