"""`s2t bench stream`: a streamed answer's time to its first event against the time to the whole answer.

One replica of the demo model on a local Ray Serve; the official `openai` client uploads a long recording of the
long-form set (2.2 min by default) with `stream=True`, and the time from sending to the first
`transcript.text.delta` and to `transcript.text.done` is taken, next to the same upload answered without streaming
(the floor the stream must not fall behind by much). Rounds alternate the two; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench.serve import free_port, load_average, start_ray
from s2t_model import DEMO_LONG_FORM, DEMO_MODEL

APP_NAME = "s2t-bench-stream"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--recording", type=int, default=0, help="index in the long-form manifest (0: 134 s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: cores)")


def main(args: argparse.Namespace) -> None:
    from openai import OpenAI
    from ray import serve

    from pipeline.serve import build_app

    with open(os.path.join(DEMO_LONG_FORM, "manifest.jsonl")) as f:
        recording = [json.loads(line) for line in f][args.recording]
    with open(os.path.join(DEMO_LONG_FORM, recording["audio_filepath"]), "rb") as f:
        audio = f.read()
    _, note = start_ray(args, 1.0)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": args.model, "num_beams": args.num_beams}), name=APP_NAME, route_prefix="/")
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
    print(f"machine: {os.cpu_count()} CPUs, load average {load_average()}; ray: {note}")
    print(
        f"upload: {recording['id']}, {recording['duration']:.0f} s, {len(recording['segments'])} utterances; "
        f"{args.model}, num_beams {args.num_beams}"
    )
    first, done, whole, deltas = [], [], [], []
    try:
        client.audio.transcriptions.create(model="s2t", file=("warm.flac", audio))  # warm-up
        for _ in range(args.rounds):
            start = time.perf_counter()
            stream = client.audio.transcriptions.create(model="s2t", file=("long.flac", audio), stream=True)
            count = 0
            for event in stream:
                if event.type == "transcript.text.delta":
                    if count == 0:
                        first.append(time.perf_counter() - start)
                    count += 1
            done.append(time.perf_counter() - start)
            deltas.append(count)
            start = time.perf_counter()
            client.audio.transcriptions.create(model="s2t", file=("long.flac", audio))
            whole.append(time.perf_counter() - start)
    finally:
        serve.delete(APP_NAME)
    median = statistics.median
    print(
        f"stream: first delta {median(first):.1f} s, done {median(done):.1f} s ({median(deltas):.0f} deltas); "
        f"not streamed: {median(whole):.1f} s; first delta / whole answer {median(first) / median(whole):.2f}, "
        f"streamed / not streamed {median(done) / median(whole):.2f} (medians of {args.rounds} rounds)"
    )
