"""The corpus transcription job: manifest -> CPU feature actors -> generation actor pool -> Parquet, plus a summary.

    read (manifest read tasks) -> drop ids done (a filter on the output's id digests) -> split_long_audio
    -> ComputeFeatures -> GenerateText -> write_parquet;  then join_segments, and the summary (pipeline/summary.py)

The driver holds no rows: it lists files and reads Parquet footers. Resuming filters out the ids the output holds:
re-running the same command after a crash writes only what is missing. A Parquet file cut short by the crash has no
footer; it is removed and its rows are done again, so nothing is lost and nothing doubled.
"""

from __future__ import annotations

import json
import logging
import time
import typing
import uuid
from typing import Literal

import fsspec
import pyarrow.parquet as pq
from pydantic import Field

from s2t_model import FeatureExtractor, checkpoint
from s2t_model.batching import CPU_MAX_FRAMES

from .audio import IO_CONCURRENCY
from .config import ModelConfig
from .gpu_stage import DecodeAudio, GenerateFromAudio
from .ids import digest_set, drop_listed, union
from .lease import Lease
from .longform import join_segments, split_long_audio, write_output
from .manifest import Manifest
from .output import (
    META,
    SUMMARY,
    arrow_filesystem,
    check_output,
    drop_errors,
    footers,
    holds_segments,
    mark_output,
    output_filesystem,
    rows_dataset,
    with_run_id,
)
from .progress import Progress, counted, quiet_ray, start_counts
from .reasons import RETRYABLE, Reason, parse_reasons
from .shards import TarredAudio
from .stages import CALLS_PER_ACTOR, ComputeFeatures, FeatureOptions, GenerateText, GenerationOptions, TranscribeAudio
from .storage import retry_store_errors
from .summary import corpus_summary

log = logging.getLogger(__name__)
TASK_CPUS = 1.0  # CPUs the actor pools leave to the read, split and write tasks (`actor_cpus`)


class TranscribeConfig(ModelConfig):
    manifest: str = Field(
        description="manifest (NeMo .jsonl, fairseq .tsv, .csv, .parquet), a glob or brace list of "
        "manifest shards or of WebDataset .tar shards, or a glob of audio files; any "
        "fsspec URL"
    )
    tarred_audio: str | None = Field(
        None,
        description="NeMo tarred audio: the tars the manifest's audio_filepath "
        "members are in, each the tar of shard_id in its name "
        "(audio__OP_0..127_CL_.tar, audio_{0..127}.tar, a glob)",
    )
    output: str = Field(description="Parquet dataset folder, any fsspec URL")
    tgt_lang: str | None = Field(
        None,
        description="target language tag for every row (default: the row's "
        "tgt_lang column when the model has that tag, else none: ASR)",
    )
    max_new_tokens: int | None = Field(None, description="default: the model's max_length - 1")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="rows handed to a generation actor at a time (default: "
        "64 on CPUs; 768 with GPUs, four frame budgets of 10 s "
        "rows: a GPU is slow on small batches)",
    )
    word_timestamps: bool = Field(
        False,
        description="a words column: each word's (start_s, end_s, word), in the "
        "row's time (a long recording's: in the recording's)",
    )
    feature_batch_size: int = Field(32, ge=1, description="rows handed to a feature actor at a time")
    feature_actors: int = Field(2, ge=1, description="most CPU feature actors")
    feature_cpus: float = Field(1.0, gt=0, description="CPUs each feature actor reserves")
    io_concurrency: int = Field(
        IO_CONCURRENCY,
        ge=1,
        description="audio files each actor (and each long-form split task) reads at once: hides object-store latency",
    )
    generation_actors: int = Field(1, ge=1, description="fewest generation actors")
    max_generation_actors: int | None = Field(None, description="most generation actors (default: the fewest)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generation actor (0: CPU actors)")
    generation_cpus: float = Field(1.0, gt=0, description="CPUs each generation actor reserves")
    feature_stage: Literal["auto", "device", "separate", "fused"] = Field(
        "auto",
        description="device: CPU actors only decode, the generation actors detect speech and compute "
        "features on their device (docs/gpu.md); separate: CPU feature actors feed the generation "
        "actors; fused: each generation actor reads and computes its own features; auto: device "
        "with GPUs, fused on CPUs only (no two stages competing for the same cores)",
    )
    max_duration_s: float = Field(4 * 3600.0, gt=0, description="longest recording, in seconds")
    rows_per_file: int = Field(10000, ge=1, description="rows per Parquet file (the last ones may have fewer)")
    rows_per_block: int | None = Field(
        None,
        ge=1,
        description="manifest rows per Ray Data block, the unit the actors "
        "share out (default: 1,024; 256 for rows carrying "
        "their audio: tar shards, Parquet with audio bytes)",
    )
    lease_ttl_s: float = Field(
        600.0, gt=0, description="a run's lease on its output not renewed for this long is taken over"
    )
    adopt_output: bool = Field(
        False,
        description="take an output folder of an older version of s2t (Parquet files "
        "of its columns, no _s2t/output.json) as this job's: its files are "
        "rewritten in this version's layout and the folder marked",
    )
    retry_errors: str | None = Field(
        None,
        description="also do again the rows whose earlier error has one of these "
        "final reasons (comma-separated, or all; bare: all); rows of "
        "retryable reasons (unavailable, generation_failed) are "
        "always done again",
    )
    optional_values: typing.ClassVar[dict[str, str]] = {"retry_errors": "all"}
    progress_s: float = Field(30.0, gt=0, description="seconds between progress lines when not in a terminal")
    verbose: bool = Field(False, description="Ray's own output too: Ray Data's progress bars, plans, INFO lines")

    def audio_storage(self) -> dict | None:
        """fsspec options for the audio's URLs (those of the manifest's protocol, else any URL's)."""
        return self.options_for(self.manifest) or self.storage() or None

    def feature_options(self, folder: str) -> FeatureOptions:
        """The audio stages' options; folder: the checkpoint, fetched locally (for its preprocessor config)."""
        return FeatureOptions(
            feature_config=FeatureExtractor.from_pretrained(folder).to_dict(),
            min_duration_s=self.min_duration_s,
            max_duration_s=self.max_duration_s,
            storage_options=self.audio_storage(),
            max_frames=self.max_frames or CPU_MAX_FRAMES,  # feature actors run on CPUs
            vad=self.vad,
            io_concurrency=self.io_concurrency,
            row_retry=self.row_retry(),
        )

    def generation_options(self, model_label: str) -> GenerationOptions:
        return GenerationOptions(
            model_uri=self.model,
            model_label=model_label,
            device=self.device,
            dtype=self.dtype,
            cuda_graphs=self.cuda_graphs,
            storage_options=self.options_for(self.model),
            fetch_retry=self.row_retry(),
            tgt_lang=self.tgt_lang,
            decoding=self.decoding(max_new_tokens=self.max_new_tokens, word_timestamps=self.word_timestamps),
        )

    def redo_reasons(self) -> frozenset[Reason]:
        """The reasons of the error rows a run does again: the retryable ones, and those --retry-errors names."""
        try:
            chosen = parse_reasons(self.retry_errors) if self.retry_errors else frozenset()
        except ValueError as error:
            raise SystemExit(f"s2t transcribe: --retry-errors: {error}") from None
        return RETRYABLE | chosen


def run(config: TranscribeConfig) -> dict:
    """Run the job to completion (or resume it) and return its summary, also written as <output>/_s2t/summary.json."""
    import ray

    quiet_ray(config.verbose)
    started = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    manifest, fs, root = check_inputs(config)
    folder = config.fetch_model()
    model_label = f"{config.model}@sha256:{checkpoint.content_hash(folder)[:16]}"
    # One run at a time on an output: a second is refused (LeaseHeld names the first), else both would write every
    # row that neither had yet.
    retry_store_errors()  # Ray Data's own retries of manifest and shard reads and of the output's writes
    with Lease(fs, f"{root.rstrip('/')}/{META}", run_id, config.lease_ttl_s):
        mark_output(fs, root, "s2t transcribe")
        join_segments(fs, root)  # what a run killed after its write left unjoined
        # Error rows to do again leave the output first (so that none is there twice), files cut short too.
        drop_errors(fs, root, config.redo_reasons())
        footers_before = footers(fs, root)
        # One set of the output's ids drops both the rows done and the segments of long recordings done; rows are
        # dropped before tar shards are read where the manifest knows them (NeMo).
        drop_done, ids_before = done_filter(fs, root, list(footers_before))
        block_rows = manifest.block_rows(config.rows_per_block)
        # The manifest's ids before the work (the summary counts against them): an id more than one manifest file
        # holds gets its file's label, in every run the same.
        manifest_ids, shared, shared_count = manifest.ids(block_rows, arrow_filesystem(manifest.fs))
        if shared_count:
            log.warning(
                "%d ids are held by more than one manifest file: each such row's id gets its file's label "
                "(<file>/<id>)",
                shared_count,
            )
        rows = manifest.dataset(
            block_rows, arrow_filesystem(manifest.fs), drop_done=drop_done, shared=shared
        ).map_batches(with_run_id, fn_kwargs=dict(run_id=run_id), batch_format="pyarrow", batch_size=None)
        # Blocks of rows_per_block rows again after the read tasks (which merge theirs) and the filter: the unit
        # the actor pools share out (a streaming split, not a shuffle).
        rows = rows.repartition(target_num_rows_per_block=block_rows)
        fs.makedirs(root, exist_ok=True)
        segments_done = any(holds_segments(metadata) for metadata in footers_before.values())
        # Counted at the write, against the manifest's rows and those the output held (a task: no wait here).
        with Progress(run_id, ray.remote(start_counts).remote(manifest_ids, ids_before), config.progress_s) as progress:
            dataset = counted(
                transcription_dataset(
                    rows, config, folder, model_label, drop_done=drop_done if segments_done else None
                ),
                progress.name,
            )
            write_output(dataset, fs, root, config.rows_per_file)
        join_segments(fs, root)

        written = footers(fs, root)
        out = rows_dataset(fs, root, list(written), summary_columns(written)) if written else None
        summary = corpus_summary(
            manifest_ids, out, run_id, output_ids=ids_after_run(fs, root, footers_before, ids_before, written)
        )
        summary["ids_in_several_files"] = shared_count
        wall_s = time.time() - started
        summary.update(
            wall_s=wall_s,
            rtfx=summary["audio_hours_this_run"] * 3600 / wall_s if wall_s > 0 else None,
            manifest=config.manifest,
            output=config.output,
            model=model_label,
            run_id=run_id,
            # (s, rows, audio s) of this run, as lists: what json gives back. `s2t report` plots it.
            throughput=[list(point) for point in progress.last["timeline"]],
        )
        with fs.open(f"{root.rstrip('/')}/{SUMMARY}", "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def check_inputs(config: TranscribeConfig) -> tuple[Manifest, fsspec.AbstractFileSystem, str]:
    """The manifest and the output folder, checked on the driver before any work (and before Ray starts, from the
    command line): ManifestError or OutputError say in one line what cannot work."""
    tarred = TarredAudio(config.tarred_audio, config.options_for(config.tarred_audio)) if config.tarred_audio else None
    manifest = Manifest(config.manifest, config.options_for(config.manifest), tarred_audio=tarred)
    fs, root = output_filesystem(config.output, config.options_for(config.output))
    check_output(fs, root, config.output, adopt=config.adopt_output)
    return manifest, fs, root


def done_filter(fs, root: str, files: list[str]):
    """-> (a function from rows to those rows less the ids `files` of the output already hold, the digest set of
    those ids: their sorted digests in the object store, read once here; pipeline/ids.py says why not a join)."""
    if not files:
        return (lambda rows: rows), None
    listed = digest_set(rows_dataset(fs, root, files, ["id"]))
    return (
        lambda rows: rows.map_batches(
            drop_listed, fn_kwargs=dict(listed=listed), batch_format="pyarrow", batch_size=None
        )
    ), listed


def ids_after_run(fs, root: str, before: dict, before_ids, after: dict):
    """The digest set of the output's ids after the run: those read before it and those of the files it added, so
    that no file is read twice; None (all read again) where a file there before is gone (rewritten by a join)."""
    if before_ids is None or any(path not in after for path in before):
        return None
    added = [path for path in after if path not in before]
    return union(before_ids, digest_set(rows_dataset(fs, root, added, ["id"]))) if added else before_ids


def summary_columns(written: dict[str, pq.FileMetaData]) -> list[str]:
    """The output's columns the summary reads (those every file has): translation references sit in text_<lang>
    columns (as in the demo corpus), else in the manifest's text."""
    names = set.intersection(*(set(metadata.schema.to_arrow_schema().names) for metadata in written.values()))
    wanted = {"id", "error", "duration_s", "text", "tgt_lang", "reference", "run_id"}
    return sorted(n for n in names if n in wanted or n.startswith("text_"))


def transcription_dataset(rows, config: TranscribeConfig, folder: str, model_label: str, drop_done=None):
    """The stages over manifest rows: long recordings cut into segments (tasks), then CPU feature actors feeding the
    generation actor pool, or (`feature_stage` "fused") generation actors that compute their own features.

    folder: the checkpoint, fetched locally (the feature actors need only its preprocessor config).
    rows: a Ray Dataset of manifest rows.
    drop_done: Dataset -> the Dataset less the segments already in the output (not to be done again).
    """
    import ray

    pool_size = dict(
        min_size=config.generation_actors,
        max_size=max(config.generation_actors, config.max_generation_actors or config.generation_actors),
    )
    # Actors that read audio take CALLS_PER_ACTOR batches at once: one reads while another computes.
    reading = dict(max_concurrent_calls_per_actor=CALLS_PER_ACTOR, enable_true_multi_threading=True)
    features, generation = config.feature_options(folder), config.generation_options(model_label)
    dataset = rows.map_batches(
        split_long_audio,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs=dict(
            max_segment_s=config.max_segment_s,
            max_duration_s=config.max_duration_s,
            storage_options=features.storage_options,
            io_concurrency=config.io_concurrency,
            row_retry=config.row_retry(),
        ),
    )
    if drop_done is not None:
        dataset = drop_done(dataset)
    generation_cpus, feature_cpus = actor_cpus(config, pool_size["max_size"], ray.cluster_resources().get("CPU", 0))
    generation_options = dict(
        batch_format="pyarrow",
        batch_size=generation_batch_size(config),
        num_gpus=config.num_gpus,
        num_cpus=generation_cpus,
    )
    stage = feature_stage(config)
    if stage == "fused":
        return dataset.map_batches(
            TranscribeAudio,
            fn_constructor_args=(features, generation),
            compute=ray.data.ActorPoolStrategy(**pool_size, **reading),
            **generation_options,
        )
    return dataset.map_batches(
        DecodeAudio if stage == "device" else ComputeFeatures,
        batch_format="pyarrow",
        batch_size=config.feature_batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.feature_actors, **reading),
        num_cpus=feature_cpus,
        fn_constructor_args=(features,),
    ).map_batches(
        GenerateFromAudio if stage == "device" else GenerateText,
        fn_constructor_args=(generation, config.vad) if stage == "device" else (generation,),
        compute=ray.data.ActorPoolStrategy(**pool_size),
        **generation_options,
    )


def feature_stage(config: TranscribeConfig) -> str:
    """Where features are computed: "device", "separate" or "fused" (see `TranscribeConfig.feature_stage`)."""
    if config.feature_stage != "auto":
        return config.feature_stage
    return "device" if config.num_gpus > 0 else "fused"


def actor_cpus(config: TranscribeConfig, generation_actors: int, cluster_cpus: float) -> tuple[float, float]:
    """(CPUs each generation actor reserves, each feature actor): as configured where the pools at their largest
    leave TASK_CPUS of the cluster to the read, split and write tasks; else scaled down to leave them that. Actors
    that reserve every CPU leave the manifest's read task none, and the job waits on itself forever."""
    features = 0.0 if feature_stage(config) == "fused" else config.feature_actors * config.feature_cpus
    wanted = generation_actors * config.generation_cpus + features
    room = max(cluster_cpus - TASK_CPUS, cluster_cpus / 2)
    if not cluster_cpus or wanted <= room:
        return config.generation_cpus, config.feature_cpus
    scale = room / wanted
    log.warning(
        "the actor pools would reserve %g of the cluster's %g CPUs, leaving the read and write tasks "
        "none: each actor reserves %.3g of its CPUs instead (the cores are shared, not added)",
        wanted,
        cluster_cpus,
        scale,
    )
    return config.generation_cpus * scale, config.feature_cpus * scale


GPU_BATCH_SIZE = 768  # rows a generation call with GPUs: four of GPU_MAX_FRAMES' batches of 10 s rows


def generation_batch_size(config: TranscribeConfig) -> int:
    return config.batch_size or (GPU_BATCH_SIZE if config.num_gpus > 0 else 64)


def summary_line(summary: dict) -> str:
    errors = ", ".join(f"{n} {reason}" for reason, n in summary["errors_by_reason"].items()) or "none"
    if summary["rows_error"]:
        errors += f": {summary['rows_error'] - summary['rows_retryable']} final, {summary['rows_retryable']} retryable"
    quality = f", WER {summary['wer']:.2f} %" if summary.get("wer") is not None else ""
    quality += "".join(f", BLEU {lang} {score:.1f}" for lang, score in summary.get("bleu", {}).items())
    return (
        f"{summary['rows_in']} rows in, {summary['rows_ok']} ok, {summary['rows_error']} errors ({errors}); "
        f"{summary['rows_this_run']} done in this run, {summary['audio_hours_this_run'] * 3600:.0f} s of audio in "
        f"{summary['wall_s']:.1f} s (RTFx {summary['rtfx'] or 0:.1f}){quality}"
    )
