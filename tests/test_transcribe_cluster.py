"""The transcription job survives losing a GPU node mid-job: a three-node Ray cluster on this machine (a head and two
workers with one logical GPU each), one generation actor per GPU, and one worker node removed once output has begun
to appear. Every manifest row must still end up in the output exactly once.

The cluster is built in a subprocess: the test session may already hold a Ray instance (the `ray_session` fixture),
and a driver joins one cluster only. The subprocess gets a Ray temp folder of its own, so neither its sessions nor
its cluster address (which `ray.init()` without an address would pick up) are seen by any other Ray user here.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from helpers import demo_rows

ROWS = 40
TIMEOUT_S = 300

SCRIPT = r'''
import glob, json, sys, threading, time, traceback

import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_MODEL

manifest, output, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
started = time.time()


def log(message):
    print(f"[{time.time() - started:6.1f} s] {message}", file=sys.stderr, flush=True)


def rows_written():
    """Rows in the Parquet files the job has finished so far (one being written is not readable yet)."""
    count = 0
    for path in glob.glob(f"{output}/*.parquet"):
        try:
            count += pq.ParquetFile(path).metadata.num_rows
        except Exception:
            pass
    return count


def generation_actor_nodes():
    """Node ids of the live generation actors (from the GCS actor table; no dashboard needed)."""
    nodes = []
    for actor in ray._private.state.actors().values():
        name = actor.get("ActorClassName") or ""
        if actor["State"] == "ALIVE" and ("GenerateText" in name or "GenerateFromAudio" in name):  # either path
            nodes.append(actor["Address"]["NodeID"])
    return nodes


def counter_nodes():
    """Node ids of the run's live progress counters (the Counts actor `observe_rows` reports to)."""
    return [actor["Address"]["NodeID"] for actor in ray._private.state.actors().values()
            if actor["State"] == "ALIVE" and (actor.get("Name") or "").startswith("s2t-progress-")]


cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
log(f"cluster up: {ray.cluster_resources()}")

config = TranscribeConfig(
    manifest=manifest, output=output, model=DEMO_MODEL, device="cpu", num_gpus=1, generation_actors=2,
    batch_size=2, feature_batch_size=4, rows_per_block=4, rows_per_file=2,
)
result = {}


def job():
    try:
        result["summary"] = run(config)
    except BaseException:
        result["error"] = traceback.format_exc()


thread = threading.Thread(target=job, daemon=True)
thread.start()
# Wait for the first finished Parquet file, then take away a node with a working generation actor on it.
while thread.is_alive() and time.time() - started < timeout_s and not (
        rows_written() > 0 and generation_actor_nodes()):
    time.sleep(0.1)
actor_nodes, counters = generation_actor_nodes(), counter_nodes()
# A node with a generation actor, the progress counter's first if it has one (it must not: the counter lives on the
# driver's node, and a write reporting to a lost counter would fail the job).
victim = next((w for w in workers if w.node_id in actor_nodes and w.node_id in counters),
              next((w for w in workers if w.node_id in actor_nodes), workers[0]))
removed = {"job_running": thread.is_alive(), "rows_written": rows_written(), "at_s": time.time() - started,
           "node_had_generation_actor": victim.node_id in actor_nodes, "generation_actor_nodes": len(actor_nodes),
           "counter_on_driver_node": counters == [cluster.head_node.node_id]}
log(f"removing node {victim.node_id}: {removed}")
cluster.remove_node(victim)
thread.join(max(1.0, timeout_s - (time.time() - started)))
log(f"job {'still running' if thread.is_alive() else 'finished'}")

ids = []
for path in sorted(glob.glob(f"{output}/*.parquet")):
    table = pq.read_table(path, columns=["id", "error"])
    ids.extend(table.column("id").to_pylist())
    errors = [e for e in table.column("error").to_pylist() if e]
    if errors:
        result.setdefault("row_errors", []).extend(errors)
print(json.dumps({"removed": removed, "finished": not thread.is_alive(), "ids": ids, **result}), flush=True)
if thread.is_alive():  # the job hangs: stop the cluster under it, and do not wait on its thread
    cluster.shutdown()
    import os
    os._exit(3)
ray.shutdown()
cluster.shutdown()
'''


@pytest.mark.slow
def test_every_row_once_after_losing_a_gpu_node(tmp_path):
    rows = demo_rows(ROWS)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    script = tmp_path / "node_loss.py"
    script.write_text(SCRIPT)
    output = tmp_path / "out"
    # Short: Ray's socket paths live under it and must stay within the 107 characters of a Unix socket name.
    ray_tmp = tempfile.mkdtemp(prefix="s2t-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=ray_tmp,
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
    )
    try:
        try:
            process = subprocess.run(
                [sys.executable, str(script), str(manifest), str(output), str(TIMEOUT_S - 30)],
                env=env,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as error:
            # (Killing the script stops its cluster too: Ray's reaper ends the nodes when their parent dies.)
            text = [
                out.decode(errors="replace") if isinstance(out, bytes) else out or ""
                for out in (error.stdout, error.stderr)
            ]
            pytest.fail(
                f"the node-loss script ran past {TIMEOUT_S} s\nstdout:\n{text[0][-4000:]}\nstderr:\n{text[1][-8000:]}"
            )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)  # Ray's sessions and logs
    shown = f"exit {process.returncode}\nstdout:\n{process.stdout[-4000:]}\nstderr:\n{process.stderr[-8000:]}"
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    assert lines, shown
    result = json.loads(lines[-1])

    removed = result["removed"]
    # The node went away mid-job, with a generation actor on it and part of the output written.
    assert removed["job_running"] and removed["node_had_generation_actor"], shown
    assert 0 < removed["rows_written"] < ROWS, shown
    assert removed["counter_on_driver_node"], shown  # a lost node never takes the run's progress counter along
    assert result["finished"] and "error" not in result, shown
    assert process.returncode == 0, shown
    ids = result["ids"]
    expected = sorted(row["id"] for row in rows)
    assert sorted(set(ids)) == expected, f"missing: {sorted(set(expected) - set(ids))}\n{shown}"
    assert len(ids) == len(expected), f"duplicated: {sorted(i for i in set(ids) if ids.count(i) > 1)}\n{shown}"
    assert "row_errors" not in result, shown
    summary = result["summary"]
    assert (summary["rows_in"], summary["rows_ok"], summary["rows_missing"], summary["rows_duplicated"]) == (
        ROWS,
        ROWS,
        0,
        0,
    ), shown
