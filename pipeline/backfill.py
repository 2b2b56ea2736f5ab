"""Translation backfills: every (id, target language) pair of a manifest that the output lacks, translated and
appended, each row with its target language (`tgt_lang`) and the run's id.

    pairs = manifest x tgt_langs - pairs already in the output (a distributed anti-join)
            -> the transcription stages, tgt_lang per row -> write

A lease file in the output keeps two runs from writing the same pairs; a run killed mid-way leaves complete Parquet
files (kept: their pairs are done) and perhaps one cut short (removed: its pairs are found again by the next run).
"""

from __future__ import annotations

import json
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from s2t_model import Speech2Text, checkpoint

from .ids import digest_set, drop_listed
from .lease import Lease
from .longform import join_segments, write_output
from .manifest import Manifest
from .output import META, RUNS, arrow_filesystem, drop_errors, each_language, footers, mark_output, rows_dataset
from .progress import Progress, counted, quiet_ray
from .reasons import RETRYABLE, Reason
from .storage import retry_store_errors
from .summary import run_summary
from .transcribe import TranscribeConfig, check_inputs, transcription_dataset

PAIR = ("id", "tgt_lang")  # what a backfill's row is: one manifest row in one language


class BackfillConfig(TranscribeConfig):
    hidden_options = ("tgt_lang",)  # each pair carries its own
    tgt_langs: str = Field("fr,de,es", description="comma-separated target languages to fill in")
    retry_errors: bool = Field(
        False,
        description="translate again the pairs whose earlier attempt failed for any "
        "reason (those of retryable reasons are always done again)",
    )

    def languages(self) -> list[str]:
        return [lang.strip() for lang in self.tgt_langs.split(",") if lang.strip()]


def run(config: BackfillConfig) -> dict:
    import ray

    quiet_ray(config.verbose)
    started = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    langs = config.languages()
    manifest, fs, root = check_inputs(config)
    folder = config.fetch_model()
    known = Speech2Text.from_pretrained(folder).tokenizer.langs
    unknown = [lang for lang in langs if lang not in known]
    if unknown:
        raise ValueError(f"{config.model} has no language tag for {', '.join(unknown)}; it has {', '.join(known)}")
    model_label = f"{config.model}@sha256:{checkpoint.content_hash(folder)[:16]}"

    retry_store_errors()
    with Lease(fs, f"{root.rstrip('/')}/{META}", run_id, config.lease_ttl_s):
        mark_output(fs, root, "s2t backfill")
        join_segments(fs, root)  # long recordings a killed run left in segments
        # First, so that a pair done again is never in the output twice: retryable errors always, all with
        # --retry-errors.
        drop_errors(fs, root, frozenset(Reason) if config.retry_errors else RETRYABLE)
        # Streamed, never materialized: rows of tar shards and Parquet audio carry their audio's bytes (~100 kB a
        # row, once per language), and the driver would keep every block's reference.
        block_rows = manifest.block_rows(config.rows_per_block)
        # The manifest's ids, read once: the progress' total, and those more than one file holds (labelled).
        manifest_ids, shared, _ = manifest.ids_as_listed(block_rows, arrow_filesystem(manifest.fs))
        pairs = missing_pairs(manifest, block_rows, langs, run_id, fs, root, shared)
        job = config.model_copy(update={"tgt_lang": None})  # each row carries its own target language
        totals = ray.remote(pair_counts).remote(manifest_ids, len(langs), held_pairs(fs, root, langs))
        with Progress(run_id, totals, config.progress_s, label="pairs") as progress:
            dataset = counted(transcription_dataset(pairs, job, folder, model_label), progress.name)
            # The language is a column of the rows, not tgt_lang=xx/ folders. Tried with duckdb, polars, pandas,
            # `datasets` and Ray (docs/ecosystem.md): `datasets` and polars given a glob do not read folder names, so
            # without the column they lose the language; with it in the files too, pandas (pyarrow) refuses the folder
            # (string in the files, dictionary from the folders), and Ray's partitioned write cannot keep it in the
            # files anyway (pyarrow's write_dataset moves a partition column into the path). A plain column reads the
            # same in all five.
            write_output(dataset, fs, root, config.rows_per_file)
        join_segments(fs, root)
    summary = summarize(fs, root, run_id, langs, time.time() - started)
    summary.update(manifest=config.manifest, output=config.output, model=model_label)
    fs.makedirs(f"{root.rstrip('/')}/{RUNS}", exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{RUNS}/{run_id}.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def missing_pairs(manifest: Manifest, rows_per_block: int, langs: list[str], run_id: str, fs, root: str, shared=None):
    """Every (manifest row, language) pair the output holds no row for (done or errored), as a Dataset: the
    manifest's rows once per language, less the output's (id, tgt_lang) pairs (pipeline/ids.py: their sorted
    digests in the object store, and a filter). shared: `Manifest.ids_as_listed`' ids more than one file holds, which
    get their file's label, as `s2t transcribe` gives them."""
    pairs = manifest.dataset(rows_per_block, arrow_filesystem(manifest.fs), shared=shared).map_batches(
        each_language, fn_kwargs=dict(langs=langs, run_id=run_id), batch_format="pyarrow", batch_size=None
    )
    files = list(footers(fs, root))
    if files:
        held = digest_set(rows_dataset(fs, root, files, ["id", "tgt_lang"]), on=PAIR)
        pairs = pairs.map_batches(
            drop_listed, fn_kwargs=dict(listed=held, on=PAIR), batch_format="pyarrow", batch_size=None
        )
    return pairs.repartition(target_num_rows_per_block=rows_per_block)


def held_pairs(fs, root: str, langs: list[str]) -> int:
    """Rows the output holds in `langs` (its tgt_lang column read on the cluster, counted there)."""
    files = list(footers(fs, root))
    if not files:
        return 0
    return (
        rows_dataset(fs, root, files, ["tgt_lang"])
        .map_batches(in_languages, fn_kwargs=dict(langs=langs), batch_format="pyarrow", batch_size=None)
        .count()
    )


def in_languages(batch, langs: list[str]):
    return batch.filter(pc.is_in(batch["tgt_lang"], pa.array(langs, pa.string())))


def pair_counts(manifest_ids, langs: int, held: int) -> tuple[int, int]:
    """(pairs to have, pairs the output holds) for the backfill's progress."""
    return len(manifest_ids) * langs, min(held, len(manifest_ids) * langs)


def summarize(fs, root: str, run_id: str, langs: list[str], wall_s: float) -> dict:
    """What this run found and wrote, and BLEU per language of what it wrote (references: text_<lang>, else the
    manifest's text), by Ray Data aggregations over the output. Every pair found missing is written as one row of this
    run (an error row when it fails), so the rows this run wrote are the pairs it found missing."""
    written = footers(fs, root)
    columns = {"id", "error", "text", "reference", "run_id", "tgt_lang", "duration_s"}
    names = (
        set.intersection(*(set(m.schema.to_arrow_schema().names) | {"tgt_lang"} for m in written.values()))
        if written
        else set()
    )
    rows = (
        rows_dataset(fs, root, list(written), sorted(n for n in names if n in columns or n.startswith("text_")))
        if written
        else None
    )
    figures = run_summary(rows, run_id)
    return {
        "run_id": run_id,
        "tgt_langs": langs,
        "pairs_written": figures["rows"],
        "pairs_errored": sum(figures["errors_by_reason"].values()),
        "pairs_retryable": figures["rows_retryable"],
        "errors_by_reason": figures["errors_by_reason"],
        "wall_s": wall_s,
        "bleu": figures["bleu"],
        **({"bleu_signature": figures["bleu_signature"]} if "bleu_signature" in figures else {}),
    }
