"""Translation backfills: every (id, target language) pair of a manifest that the output lacks, translated and
appended, partitioned by target language, with the run's id on each row.

    pairs = manifest x tgt_langs - pairs already in the output -> the transcription stages, tgt_lang per row -> write

A lease file in the output keeps two runs from writing the same pairs; a run killed mid-way leaves complete Parquet
files (kept: their pairs are done) and perhaps one cut short (removed: its pairs are found again by the next run).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid

import fsspec
import pyarrow as pa
from pydantic import Field

from s2t_model import Speech2Text, checkpoint

from . import scoring
from .longform import join_segments
from .manifest import read_manifest
from .transcribe import TranscribeConfig, arrow_filesystem, scan_output, transcription_dataset

log = logging.getLogger(__name__)
LEASE = "_lease.json"
PARTITION = re.compile(r"(?:^|/)tgt_lang=([^/]+)/")


class BackfillConfig(TranscribeConfig):
    hidden_options = ("tgt_lang",)  # each pair carries its own
    tgt_langs: str = Field("fr,de,es", description="comma-separated target languages to fill in")
    retry_errors: bool = Field(False, description="translate again the pairs whose earlier attempt failed")
    lease_ttl_s: float = Field(600.0, gt=0, description="a lease not renewed for this long is taken over")

    def languages(self) -> list[str]:
        return [lang.strip() for lang in self.tgt_langs.split(",") if lang.strip()]


class LeaseHeld(RuntimeError):
    pass


class Lease:
    """`<output>/_lease.json`, renewed by a thread while the run lasts. Another run's lease is respected while it is
    fresh and its process (when on this host) lives; a stale one is taken over."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, run_id: str, ttl_s: float):
        self.fs, self.path, self.run_id, self.ttl_s = fs, f"{root.rstrip('/')}/{LEASE}", run_id, ttl_s
        self.stop = threading.Event()

    def __enter__(self) -> "Lease":
        held = self.read()
        if held and held["run_id"] != self.run_id and not self.stale(held):
            raise LeaseHeld(
                f"{self.path}: run {held['run_id']} (pid {held['pid']} on {held['host']}, started {held['started']}) "
                f"is filling in this output; try again when it is done, or delete the lease if that run is dead"
            )
        self.write()
        time.sleep(0.05)
        if (self.read() or {}).get("run_id") != self.run_id:  # another run wrote its lease at the same moment
            raise LeaseHeld(f"{self.path}: another run took the lease at the same moment")
        self.thread = threading.Thread(target=self.renew, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if (self.read() or {}).get("run_id") == self.run_id:
            self.fs.rm(self.path)

    def read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "r") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write(self) -> None:
        self.fs.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with self.fs.open(self.path, "w") as f:
            json.dump({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "expires": time.time() + self.ttl_s}, f)

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


def run(config: BackfillConfig) -> dict:
    started = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    langs = config.languages()
    manifest = read_manifest(config.manifest, config.options_for(config.manifest))
    folder = checkpoint.local_folder(config.model, config.options_for(config.model))
    known = Speech2Text.from_pretrained(folder).tokenizer.langs
    unknown = [lang for lang in langs if lang not in known]
    if unknown:
        raise ValueError(f"{config.model} has no language tag for {', '.join(unknown)}; it has {', '.join(known)}")
    model_label = f"{config.model}@sha256:{checkpoint.content_hash(folder)[:16]}"
    fs, root = fsspec.core.url_to_fs(config.output, **(config.options_for(config.output) or {}))

    with Lease(fs, root, run_id, config.lease_ttl_s):
        join_segments(fs, root)  # long recordings a killed run left in segments
        done, errored = existing_pairs(fs, root)
        if config.retry_errors:
            drop_rows(fs, root, errored)  # first, so that a retried pair is never in the output twice
            errored = set()
        wanted = [(row_id, lang) for lang in langs for row_id in manifest.column("id").to_pylist()]
        todo_pairs = [pair for pair in wanted if pair not in done and pair not in errored]
        log.info("%d pairs wanted, %d done, %d errored earlier, %d to do", len(wanted), len(done), len(errored),
                 len(todo_pairs))
        todo = pairs_table(manifest, todo_pairs, run_id)
        if todo.num_rows:
            job = config.model_copy(update={"tgt_lang": None})  # each row carries its own target language
            dataset = transcription_dataset(todo, job, folder, model_label)
            dataset.write_parquet(root, filesystem=arrow_filesystem(fs), partition_cols=["tgt_lang"],
                                  min_rows_per_file=config.rows_per_file)
            join_segments(fs, root)
    summary = summarize(fs, root, run_id, todo_pairs, langs, time.time() - started)
    summary.update(manifest=config.manifest, output=config.output, model=model_label)
    fs.makedirs(f"{root.rstrip('/')}/_runs", exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/_runs/{run_id}.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def existing_pairs(fs, root: str) -> tuple[set, set]:
    """(pairs done, pairs whose attempt failed), read from every file of the output."""
    done, errored = set(), set()
    for path, table in scan_output(fs, root, ["id", "error"]):
        lang = partition_of(path)
        for row_id, error in zip(table.column("id").to_pylist(), table.column("error").to_pylist()):
            (errored if error else done).add((row_id, lang))
    return done, errored - done


def partition_of(path: str) -> str | None:
    match = PARTITION.search(path)
    return match.group(1) if match else None


def drop_rows(fs, root: str, pairs: set) -> None:
    """Rewrite the files that hold any of `pairs` without them (a new file first, then the old one goes)."""
    import pyarrow.parquet as pq

    for path, table in scan_output(fs, root, ["id"]):
        lang = partition_of(path)
        keep = [(row_id, lang) not in pairs for row_id in table.column("id").to_pylist()]
        if all(keep):
            continue
        with fs.open(path, "rb") as f:
            full = pq.read_table(f)
        kept = full.filter(pa.array(keep))
        if kept.num_rows:
            folder, name = path.rsplit("/", 1)
            with fs.open(f"{folder}/retried-{uuid.uuid4().hex[:8]}-{name}", "wb") as f:
                pq.write_table(kept, f)
        fs.rm(path)


def pairs_table(manifest: pa.Table, pairs: list[tuple[str, str]], run_id: str) -> pa.Table:
    index = {row_id: i for i, row_id in enumerate(manifest.column("id").to_pylist())}
    rows = manifest.take(pa.array([index[row_id] for row_id, _ in pairs], pa.int64()))
    rows = rows.set_column(rows.column_names.index("tgt_lang"), "tgt_lang",
                           pa.array([lang for _, lang in pairs], pa.string()))
    return rows.append_column("run_id", pa.array([run_id] * len(pairs), pa.string()))


def summarize(fs, root: str, run_id: str, todo_pairs: list, langs: list[str], wall_s: float) -> dict:
    """What this run found and wrote, and BLEU per language of what it wrote (references: text_<lang>, else the
    manifest's text)."""
    by_lang: dict[str, list] = {}
    columns = lambda name: name in ("id", "error", "text", "reference", "run_id") or name.startswith("text_")
    for path, table in scan_output(fs, root, columns):
        by_lang.setdefault(partition_of(path), []).extend(r for r in table.to_pylist() if r.get("run_id") == run_id)
    rows = [row for lang_rows in by_lang.values() for row in lang_rows]
    errors: dict[str, int] = {}
    for row in rows:
        if row["error"]:
            reason = row["error"].split(":", 1)[0]
            errors[reason] = errors.get(reason, 0) + 1
    summary = {"run_id": run_id, "tgt_langs": langs, "pairs_found": len(todo_pairs), "pairs_written": len(rows),
               "pairs_errored": sum(errors.values()), "errors_by_reason": errors, "wall_s": wall_s, "bleu": {}}
    for lang, lang_rows in sorted(by_lang.items()):
        ok = [row for row in lang_rows if not row["error"]]
        result = scoring.bleu([row.get(f"text_{lang}") or row.get("reference") for row in ok],
                              [row["text"] for row in ok])
        if result:
            summary["bleu"][lang], summary["bleu_signature"] = round(result[0], 2), result[1]
    return summary
