"""The job at corpus scale, on small inputs: sharded manifests read by Ray Data read tasks, resume after SIGKILL with
sharded input, the summary's figures against jiwer and sacrebleu, and the backfill lease under a race."""

import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import demo_rows, killed_mid_job

from pipeline import scoring
from pipeline.ids import digest_set
from pipeline.lease import Lease, LeaseHeld
from pipeline.manifest import Manifest, read_manifest
from pipeline.rows import ManifestError
from pipeline.summary import corpus_summary
from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_MODEL

FAST = dict(batch_size=4, feature_batch_size=4, rows_per_file=4, rows_per_block=4, num_beams=1)


def output_ids(folder) -> list[str]:
    return [i for f in sorted(folder.rglob("*.parquet")) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]


def write_shards(folder, rows: list[dict], names: list[str], kind: str) -> None:
    """`rows` spread over files `names` (one shard each, in turn) as JSONL, TSV or Parquet."""
    shares = [rows[i :: len(names)] for i in range(len(names))]
    for name, share in zip(names, shares):
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(share), folder / name)
        elif kind == "tsv":
            header = ["id", "audio", "tgt_text"]
            lines = ["\t".join(header)] + [f"{r['id']}\t{r['audio_filepath']}\t{r['text']}" for r in share]
            (folder / name).write_text("\n".join(lines) + "\n")
        else:
            (folder / name).write_text("".join(json.dumps(r) + "\n" for r in share))


@pytest.mark.parametrize(
    "pattern, names, kind",
    [
        ("part-*.jsonl", ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"], "jsonl"),
        ("manifest_{000..002}.tsv", ["manifest_000.tsv", "manifest_001.tsv", "manifest_002.tsv"], "tsv"),
        ("manifest__OP_0..2_CL_.json", ["manifest_0.json", "manifest_1.json", "manifest_2.json"], "jsonl"),
        ("shard-*.parquet", ["shard-a.parquet", "shard-b.parquet"], "parquet"),
    ],
)
def test_sharded_manifests_are_one_manifest(ray_session, tmp_path, pattern, names, kind):
    rows = demo_rows(6)
    write_shards(tmp_path, rows, names, kind)
    if kind != "parquet":  # a bad line in the middle of the second shard
        second = tmp_path / names[1]
        lines = second.read_text().splitlines()
        second.write_text(
            "\n".join(
                lines[:1] + ['{"id": "broken", "audio_filepath": ' if kind == "jsonl" else "only-one-field"] + lines[1:]
            )
            + "\n"
        )
    summary = run(
        TranscribeConfig(manifest=str(tmp_path / pattern), output=str(tmp_path / "out"), model=DEMO_MODEL, **FAST)
    )
    ids = output_ids(tmp_path / "out")
    good = [r["id"] for r in rows]
    bad = [] if kind == "parquet" else [f"{names[1]}:2"]
    assert sorted(ids) == sorted(good + bad)
    assert summary["rows_in"] == summary["rows_out"] == len(good) + len(bad)
    assert summary["rows_ok"] == len(good) and summary["errors_by_reason"] == ({"bad_manifest_line": 1} if bad else {})
    if bad:
        error = next(
            pq.read_table(f).to_pylist()
            for f in (tmp_path / "out").glob("*.parquet")
            if bad[0] in pq.read_table(f, columns=["id"])["id"].to_pylist()
        )
        message = next(r["error"] for r in error if r["id"] == bad[0])
        assert message.startswith(f"bad_manifest_line: {tmp_path / names[1]}:2: ")


def test_a_pattern_of_manifests_and_audio_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "a.flac").write_bytes(b"")
    with pytest.raises(ManifestError, match="both manifests"):
        Manifest(str(tmp_path / "a.*"))
    assert Manifest(str(tmp_path / "*.flac")).kind == "audio"


def test_repeated_ids_are_numbered_in_file_order(tmp_path):
    lines = [{"id": "x", "audio_filepath": f"{i}.flac"} for i in range(3)] + [{"audio_filepath": "same.flac"}] * 2
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ids = read_manifest(str(tmp_path / "m.jsonl"))["id"].to_pylist()
    assert ids[:3] == ["x", "x#2", "x#3"] and ids[4] == ids[3] + "#2" and len(set(ids)) == 5
    assert read_manifest(str(tmp_path / "m.jsonl"))["id"].to_pylist() == ids  # the same on every read


def test_resume_after_sigkill_with_sharded_input(ray_session, tmp_path):
    rows = demo_rows(24)
    write_shards(tmp_path, rows, [f"part-{i}.jsonl" for i in range(4)], "jsonl")
    output = tmp_path / "out"
    intact = killed_mid_job(str(tmp_path / "part-*.jsonl"), output, ray_session, files=3)
    assert 0 < len(intact) < len(rows), "the driver must be killed mid-job for this test to mean anything"
    torn = output / f"s2t-{'f' * 32}_000099-0.parquet"  # a file of the job's naming that a write cut short left
    torn.write_bytes(b"PAR1" + b"\0" * 100)  # no footer

    summary = run(
        TranscribeConfig(manifest=str(tmp_path / "part-*.jsonl"), output=str(output), model=DEMO_MODEL, **FAST)
    )
    assert sorted(output_ids(output)) == sorted(r["id"] for r in rows)
    assert not torn.exists()
    assert summary["rows_this_run"] == len(rows) - len(intact)
    assert summary["rows_missing"] == summary["rows_duplicated"] == 0 and summary["rows_ok"] == len(rows)


def test_summary_figures_equal_jiwer_and_sacrebleu(ray_session, tmp_path):
    """The aggregated WER and BLEU against the reference libraries on the demo corpus' own texts (hypotheses:
    references mangled so the scores are neither 0 nor 100), with duplicates, misses and foreign rows."""
    import jiwer
    import ray
    import sacrebleu

    rows = demo_rows()

    def hyp(text: str, i: int) -> str:
        return " ".join(w for k, w in enumerate(text.split()) if (k + i) % 4) + (" extra" * (i % 3))

    asr = [
        dict(
            id=r["id"],
            error=None,
            duration_s=r["duration"],
            text=hyp(r["text"], i),
            tgt_lang=None,
            reference=r["text"],
            run_id="now",
            text_fr=None,
        )
        for i, r in enumerate(rows)
    ]
    fr = [
        dict(
            id=r["id"] + "-fr",
            error=None,
            duration_s=r["duration"],
            text=hyp(r["text_fr"], i),
            tgt_lang="fr",
            reference=r["text"],
            run_id="before",
            text_fr=r["text_fr"],
        )
        for i, r in enumerate(rows)
    ]
    failed = [
        dict(
            id="gone",
            error="missing: gone.flac",
            duration_s=None,
            text=None,
            tgt_lang=None,
            reference="x",
            run_id="now",
            text_fr=None,
        )
    ]
    foreign = [dict(asr[0], id="not-in-the-manifest", text="nothing alike")]
    output = pa.Table.from_pylist(asr + fr + failed + foreign + [asr[1]])  # asr[1] written twice
    manifest_ids = [r["id"] for r in asr + fr + failed] + ["never-written"]
    summary = corpus_summary(
        digest_set(ray.data.from_items([{"id": i} for i in manifest_ids])),
        ray.data.from_arrow([output.slice(0, 30), output.slice(30)]),
        run_id="now",
    )

    expected_wer = 100 * jiwer.wer(
        [scoring.normalise(r["reference"]) for r in asr + [asr[1]]],
        [scoring.normalise(r["text"]) for r in asr + [asr[1]]],
    )
    assert summary["wer"] == pytest.approx(expected_wer, abs=1e-9)
    assert 5 < summary["wer"] < 95
    expected_bleu = sacrebleu.BLEU().corpus_score([r["text"] for r in fr], [[r["text_fr"] for r in fr]])
    assert summary["bleu"]["fr"] == round(expected_bleu.score, 2) and 5 < expected_bleu.score < 95
    assert summary["rows_in"] == len(manifest_ids) and summary["rows_out"] == len(asr) + len(fr) + 2
    assert summary["rows_missing"] == 1 and summary["rows_duplicated"] == 1
    assert summary["rows_error"] == 1 and summary["errors_by_reason"] == {"missing": 1}
    assert summary["rows_this_run"] == len(asr) + 2  # with the failed row and the doubled one; not the foreign one
    assert summary["audio_hours"] == pytest.approx((2 * sum(r["duration"] for r in rows) + rows[1]["duration"]) / 3600)


class SlowWrites:
    """A filesystem whose writes land `delay_s` late, as from a client on a slow link."""

    def __init__(self, fs, delay_s: float):
        self.fs, self.delay_s = fs, delay_s

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open(self, path, mode="rb", **kwargs):
        if "w" in mode or "x" in mode:
            time.sleep(self.delay_s)
        return self.fs.open(path, mode, **kwargs)


def race(fs, root: str, runs: int) -> list[str]:
    """`runs` leases taken at once (threads released together), every other one over a slow link; the run ids
    that got one."""
    start, holders = threading.Barrier(runs), []

    def take(run_id):
        slow = int(run_id.split("-")[1]) % 2
        lease = Lease(SlowWrites(fs, 0.3) if slow else fs, root, run_id, ttl_s=60)
        start.wait()
        try:
            lease.__enter__()
            holders.append(run_id)
            lease.stop.set()  # no renewals: the test ends here
        except LeaseHeld:
            pass

    threads = [threading.Thread(target=take, args=(f"run-{i}",)) for i in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return holders


@pytest.mark.parametrize("where", ["s3", "local"])
def test_one_lease_holder_among_runs_started_at_once(s3_bucket, tmp_path, where):
    if where == "s3":
        fs, bucket = s3_bucket
        root = f"{bucket}/out"
    else:
        import fsspec

        fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    for attempt in range(3):  # a fresh lease each time, then a stale one taken over
        if fs.exists(f"{root}/_lease.json"):
            fs.rm(f"{root}/_lease.json")
        assert len(race(fs, root, 12)) == 1
    stale = {"run_id": "dead", "host": "elsewhere", "pid": 1, "started": "then", "expires": time.time() - 1}
    with fs.open(f"{root}/_lease.json", "w") as f:
        json.dump(stale, f)
    holders = race(fs, root, 12)
    assert len(holders) == 1
    with fs.open(f"{root}/_lease.json") as f:
        assert json.load(f)["run_id"] == holders[0]


def test_id_digest_sets_count_as_python_counters_do():
    """The summary's and the resume's id comparison (sorted 128-bit digests) against collections.Counter, on ids
    with repeats on both sides, ids on one side only, and digests sharing their first 64 bits."""
    import random
    from collections import Counter

    import numpy as np

    from pipeline.ids import DIGEST, compare, digests, lookup, sorted_digests

    rng = random.Random(7)
    manifest = [f"utt-{rng.randrange(3000)}" for _ in range(4000)]
    output = [f"utt-{rng.randrange(3500)}" for _ in range(3000)]

    def as_set(ids: list[str]):
        return sorted_digests({"hi": digests(ids)["hi"], "lo": digests(ids)["lo"]})

    counts, unlisted = compare(as_set(manifest), as_set(output))
    need, have = Counter(manifest), Counter(output)
    assert counts == {
        "n_in": len(manifest),
        "n_out": sum(n for i, n in have.items() if i in need),
        "missing": sum(max(n - have[i], 0) for i, n in need.items()),
        "duplicated": sum(max(n - need[i], 0) for i, n in have.items() if i in need),
        "unlisted": sum(n for i, n in have.items() if i not in need),
    }
    assert counts["missing"] and counts["duplicated"] and counts["unlisted"]
    assert sorted(map(tuple, unlisted.tolist())) == sorted(
        map(tuple, digests(sorted({i for i in have if i not in need})).tolist())
    )
    # Digests equal in their first 64 bits are told apart by the rest.
    listed = np.array([(5, 1), (5, 3), (5, 3), (9, 2)], dtype=DIGEST)
    wanted = np.array([(5, 3), (5, 2), (9, 2), (9, 1), (1, 1)], dtype=DIGEST)
    assert lookup(wanted, listed).tolist() == [1, -1, 3, -1, -1]
