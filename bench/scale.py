"""`s2t bench scale`: the job's control path at corpus scale. A NeMo JSONL manifest of `--rows` rows (all but
`--real` of them name missing files, so no decoding time hides the reading, resuming and summing), in `--shards`
files, transcribed three times: first, again with nothing to do, again after 10 new rows were appended.

Each run is a driver process of its own on one local Ray started here (Ray's start is not timed); printed per run:
wall time, the driver's peak memory (VmHWM from /proc/self/status), when the first batch came out of generation (the
streaming start: how long the manifest's reading and the resume join hold the model back), and the summary's counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from s2t_model import DEMO_CORPUS, DEMO_MODEL

# The generation stage, marking its first batch with a file (this class is defined in __main__, so Ray ships it to
# the actors by value: the mark is the bench's alone, nothing in the job knows of it).
DRIVER = """
import json, os, sys, time
import pipeline.transcribe as job
from pipeline.stages import TranscribeAudio

class MarkFirstBatch(TranscribeAudio):
    mark = sys.argv[2]  # a class attribute: shipped with the class (the actor's own argv is Ray's)

    def __call__(self, batch):
        out = super().__call__(batch)
        if not os.path.exists(self.mark):
            open(self.mark, "a").close()
        return out



def anti_join_filter(fs, root, files):  # `done_filter` by Ray Data's hash-shuffle anti-join: the comparison
    from pipeline.output import plain_strings, rows_dataset, shuffle_partitions

    if not files:
        return (lambda rows: rows), None
    listed = rows_dataset(fs, root, files, ["id"])
    # The join's aggregators live as long as the job: a whole CPU each would starve the actor pools after them.
    return (lambda rows: rows.join(listed, join_type="left_anti", num_partitions=shuffle_partitions(), on=("id",),
                                   aggregator_ray_remote_args={"num_cpus": 0.01}).map_batches(
        plain_strings, batch_format="pyarrow", batch_size=None)), None  # the join (polars) gives large_string


job.TranscribeAudio = MarkFirstBatch
if sys.argv[3] == "join":
    job.done_filter = anti_join_filter
summary = job.run(job.TranscribeConfig(**json.loads(sys.argv[1])))
peak = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))
print('RESULT ' + json.dumps({'summary': summary, 'vmhwm_kb': int(peak)}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=200_000, help="manifest rows")
    parser.add_argument("--shards", type=int, default=1, help="manifest files (a brace pattern names them)")
    parser.add_argument("--real", type=int, default=40, help="rows that name a real demo clip")
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: cores+2)")
    parser.add_argument(
        "--resume",
        choices=["digests", "join"],
        default="digests",
        help="how reruns find the rows done: the job's sorted id digests, or Ray Data's anti-join "
        "(the alternative it was measured against)",
    )
    parser.add_argument(
        "--progress-s",
        type=float,
        default=30.0,
        help="seconds between the runs' progress lines, printed after the table",
    )
    parser.add_argument("--keep", default=None, help="folder to build in and keep (default: a temporary one)")


def build_manifest(folder: str, rows: int, shards: int, real: int) -> str:
    """The shards of the manifest; returns the pattern that names them all."""
    with open(os.path.join(DEMO_CORPUS, "manifest.jsonl")) as f:
        clips = [json.loads(line) for line in f if line.strip()]
    os.makedirs(folder, exist_ok=True)
    width = len(str(shards - 1))
    files = [open(os.path.join(folder, f"manifest_{k:0{width}d}.jsonl"), "w") for k in range(shards)]
    step = max(1, rows // max(real, 1))
    for i in range(rows):
        clip = clips[(i // step) % len(clips)]
        audio = (
            os.path.join(DEMO_CORPUS, clip["audio_filepath"])
            if i % step == 0 and i // step < real
            else f"/nonexistent/corpus/{i:09d}.flac"
        )
        files[i % shards].write(
            json.dumps(
                {"id": f"utt-{i:09d}", "audio_filepath": audio, "duration": clip["duration"], "text": clip["text"]}
            )
            + "\n"
        )
    for f in files:
        f.close()
    return (
        os.path.join(folder, f"manifest_{{{0:0{width}d}..{shards - 1:0{width}d}}}.jsonl")
        if shards > 1
        else files[0].name
    )


def run_once(config: dict, address: str, mark: str, resume: str) -> dict:
    if os.path.exists(mark):
        os.remove(mark)
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(config), mark, resume],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": address},
    )
    if done.returncode:
        raise SystemExit(f"the job failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    first = os.path.getmtime(mark) - started if os.path.exists(mark) else None
    progress = [line for line in done.stderr.splitlines() if line.startswith("progress: ")]
    return {**result, "wall_s": time.time() - started, "first_batch_s": first, "progress": progress}


def append_rows(pattern_first_file: str, start: int, count: int) -> None:
    with open(pattern_first_file, "a") as f:
        for i in range(start, start + count):
            f.write(
                json.dumps(
                    {
                        "id": f"new-{i:09d}",
                        "audio_filepath": f"/nonexistent/new/{i}.flac",
                        "duration": 1.0,
                        "text": "new",
                    }
                )
                + "\n"
            )


def main(args) -> None:
    import ray

    with tempfile.TemporaryDirectory(prefix="s2t-bench-scale-") as tmp:
        folder = args.keep or tmp
        started = time.time()
        manifest = build_manifest(os.path.join(folder, "manifest"), args.rows, args.shards, args.real)
        print(
            f"manifest: {args.rows} rows in {args.shards} file(s), {args.real} real clips, {manifest} "
            f"(built in {time.time() - started:.0f} s)"
        )
        cpus = args.ray_cpus or (os.cpu_count() or 1) + 2
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        print(
            f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; local Ray with "
            f"{cpus} logical CPUs"
        )
        config = dict(
            manifest=manifest,
            output=os.path.join(folder, "out"),
            model=args.model,
            num_beams=1,
            feature_stage="fused",
            progress_s=args.progress_s,
        )
        mark = os.path.join(folder, "first-generation-batch")
        first_shard = os.path.join(folder, "manifest", sorted(os.listdir(os.path.join(folder, "manifest")))[0])
        print(f"resume by {args.resume}")
        print(
            "| rows | shards | run | wall s | driver VmHWM MB | first generation batch s | rows this run | rows out "
            "| missing | doubled |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        progress = {}
        for name in ("first", "nothing to do", "10 new rows"):
            if name == "10 new rows":
                append_rows(first_shard, args.rows, 10)
            result = run_once(config, address, mark, args.resume)
            s = result["summary"]
            first = f"{result['first_batch_s']:.0f}" if result["first_batch_s"] is not None else "-"
            print(
                f"| {args.rows + (10 if name == '10 new rows' else 0):,} | {args.shards} | {name} | "
                f"{result['wall_s']:.0f} | {result['vmhwm_kb'] / 1024:.0f} | {first} | {s['rows_this_run']:,} | "
                f"{s['rows_out']:,} | {s['rows_missing']} | {s['rows_duplicated']} |",
                flush=True,
            )
            progress[name] = result["progress"]
        for name, lines in progress.items():
            print(f'progress of the run "{name}" (a line every {args.progress_s:g} s and one at the end):')
            print("\n".join(f"  {line}" for line in lines))
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        ray.shutdown()
