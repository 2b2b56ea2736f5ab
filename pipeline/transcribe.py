"""The corpus transcription job: manifest -> CPU feature actors -> generation actor pool -> Parquet, plus a summary.

    read_manifest -> from_arrow -> map_batches(ComputeFeatures) -> map_batches(GenerateText) -> write_parquet

Resuming is an id anti-join: rows whose id the output already holds are not read again, so re-running the same
command after a crash writes only what is missing. A Parquet file cut short by the crash is unreadable; it is removed
and its rows are done again, so nothing is lost and nothing doubled.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from s2t_model import FeatureExtractor, checkpoint
from s2t_model.batching import CPU_MAX_FRAMES

from . import scoring
from .config import JobConfig
from .longform import join_segments, split_long_audio
from .manifest import read_manifest
from .stages import ComputeFeatures, GenerateText, TranscribeAudio

log = logging.getLogger(__name__)
SUMMARY = "_summary.json"


class TranscribeConfig(JobConfig):
    manifest: str = Field(description="manifest (NeMo .jsonl, fairseq .tsv, .csv, .parquet) or glob of audio files, "
                                      "any fsspec URL")
    output: str = Field(description="Parquet dataset folder, any fsspec URL")
    model: str = Field(description="Speech2Text checkpoint folder, any fsspec URL")
    tgt_lang: str | None = Field(None, description="target language tag for every row (default: the row's "
                                                   "tgt_lang column when the model has that tag, else none: ASR)")
    num_beams: int = Field(5, ge=1)
    max_new_tokens: int | None = Field(None, description="default: the model's max_length - 1")
    max_frames: int | None = Field(None, ge=1, description="padded feature frames per generation batch (fairseq max_tokens; default: 24,000 on a CPU, 192,000 on a GPU)")
    batch_size: int = Field(64, ge=1, description="rows handed to a generation actor at a time")
    feature_batch_size: int = Field(32, ge=1, description="rows handed to a feature actor at a time")
    feature_actors: int = Field(2, ge=1, description="most CPU feature actors")
    feature_cpus: float = Field(1.0, gt=0, description="CPUs each feature actor reserves")
    generation_actors: int = Field(1, ge=1, description="fewest generation actors")
    max_generation_actors: int | None = Field(None, description="most generation actors (default: the fewest)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generation actor (0: CPU actors)")
    generation_cpus: float = Field(1.0, gt=0, description="CPUs each generation actor reserves")
    feature_stage: Literal["auto", "separate", "fused"] = Field(
        "auto", description="separate: CPU feature actors feed the generation actors; fused: each generation actor "
                            "computes its own features; auto: separate with GPUs (they keep GPUs fed), fused on CPUs "
                            "only (no two stages competing for the same cores)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    cuda_graphs: bool = Field(True, description="on a GPU, decode with CUDA graphs (false: eagerly)")
    min_duration_s: float = Field(0.1, ge=0)
    max_duration_s: float = Field(4 * 3600.0, gt=0, description="longest recording, in seconds")
    max_segment_s: float = Field(20.0, gt=0, description="longer recordings are cut at pauses into segments this long")
    rows_per_file: int = Field(10000, ge=1, description="rows per Parquet file (the last ones may have fewer)")
    rows_per_block: int = Field(256, ge=1, description="manifest rows per Ray Data block")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, Ceph, ...); AWS_* variables work too")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for every URL")

    def storage(self) -> dict:
        options = dict(self.storage_options)
        if self.s3_endpoint_url:
            options.setdefault("client_kwargs", {})["endpoint_url"] = self.s3_endpoint_url
        return options

    def options_for(self, uri: str) -> dict | None:
        """Storage options only for URLs of a protocol that takes them (s3fs' are no use to the local filesystem)."""
        return self.storage() if "://" in uri and not uri.startswith("file://") else None


def run(config: TranscribeConfig) -> dict:
    """Run the job to completion (or resume it) and return its summary, also written as <output>/_summary.json."""
    started = time.time()
    manifest = read_manifest(config.manifest, config.options_for(config.manifest))
    folder = checkpoint.local_folder(config.model, config.options_for(config.model))
    model_label = f"{config.model}@sha256:{checkpoint.content_hash(folder)[:16]}"
    fs, root = fsspec.core.url_to_fs(config.output, **(config.options_for(config.output) or {}))
    join_segments(fs, root)  # what a run killed after its write left unjoined
    done = existing_ids(fs, root)
    todo = manifest.filter(pc.invert(pc.is_in(manifest["id"], value_set=pa.array(done, pa.string()))))
    log.info("%d manifest rows, %d already in %s, %d to do", manifest.num_rows, len(done), config.output, todo.num_rows)

    if todo.num_rows:
        fs.makedirs(root, exist_ok=True)
        dataset = transcription_dataset(todo, config, folder, model_label, done_segments=segment_ids(done))
        dataset.write_parquet(root, filesystem=arrow_filesystem(fs), min_rows_per_file=config.rows_per_file)
        join_segments(fs, root)

    summary = summarize(fs, root, manifest, todo, time.time() - started)
    summary.update(manifest=config.manifest, output=config.output, model=model_label)
    with fs.open(f"{root.rstrip('/')}/{SUMMARY}", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def transcription_dataset(rows: pa.Table, config: TranscribeConfig, folder: str, model_label: str,
                          done_segments: frozenset = frozenset()):
    """The stages over manifest rows: long recordings cut into segments (tasks), then CPU feature actors feeding the
    generation actor pool, or (`fused_features`) generation actors that compute their own features.

    folder: the checkpoint, fetched locally (the feature actors need only its preprocessor config).
    done_segments: ids of segments already in the output, not to be done again.
    """
    import ray

    blocks = [rows.slice(i, config.rows_per_block) for i in range(0, rows.num_rows, config.rows_per_block)]
    generation_pool = ray.data.ActorPoolStrategy(
        min_size=config.generation_actors,
        max_size=max(config.generation_actors, config.max_generation_actors or config.generation_actors),
    )
    audio_options = config.options_for(config.manifest) or config.storage() or None
    features = dict(
        feature_config=FeatureExtractor.from_pretrained(folder).to_dict(),
        min_duration_s=config.min_duration_s,
        max_duration_s=config.max_duration_s,
        storage_options=audio_options,
        max_frames=config.max_frames or CPU_MAX_FRAMES,  # feature actors run on CPUs
    )
    generation = dict(
        model_uri=config.model,
        model_label=model_label,
        device="cuda" if config.num_gpus > 0 and config.device == "auto" else config.device,
        dtype=config.dtype,
        cuda_graphs=config.cuda_graphs,
        storage_options=config.options_for(config.model),
        tgt_lang=config.tgt_lang,
        num_beams=config.num_beams,
        max_new_tokens=config.max_new_tokens,
        max_frames=config.max_frames,
    )
    dataset = ray.data.from_arrow(blocks).map_batches(
        split_long_audio,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs=dict(max_segment_s=config.max_segment_s, max_duration_s=config.max_duration_s,
                       storage_options=audio_options, done=done_segments),
    )
    generation_options = dict(batch_format="pyarrow", batch_size=config.batch_size, compute=generation_pool,
                              num_gpus=config.num_gpus, num_cpus=config.generation_cpus)
    if fused_features(config):
        return dataset.map_batches(TranscribeAudio, fn_constructor_kwargs=dict(features=features, generation=generation),
                                   **generation_options)
    return dataset.map_batches(
        ComputeFeatures,
        batch_format="pyarrow",
        batch_size=config.feature_batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.feature_actors),
        num_cpus=config.feature_cpus,
        fn_constructor_kwargs=features,
    ).map_batches(GenerateText, fn_constructor_kwargs=generation, **generation_options)


def fused_features(config: TranscribeConfig) -> bool:
    """Whether the generation actors compute their own features (see `TranscribeConfig.feature_stage`)."""
    return config.feature_stage == "fused" or (config.feature_stage == "auto" and config.num_gpus == 0)


def segment_ids(ids: list[str]) -> frozenset:
    return frozenset(i for i in ids if "~" in i)


def arrow_filesystem(fs: fsspec.AbstractFileSystem):
    import pyarrow.fs

    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def output_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.find(root) if p.endswith(".parquet"))


def existing_ids(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Ids the output already holds."""
    return [i for _, table in scan_output(fs, root, ["id"]) for i in table.column("id").to_pylist()]


def scan_output(fs: fsspec.AbstractFileSystem, root: str, wanted) -> list[tuple[str, pa.Table]]:
    """(path, its columns that `wanted` names) for every output file; `wanted` is a list of names or a predicate.

    A file a killed run left half-written has no readable footer: it is removed, and its rows count as not done,
    so they are done again."""
    accept = wanted if callable(wanted) else set(wanted).__contains__
    tables = []
    for path in output_files(fs, root):
        try:
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                tables.append((path, parquet.read(columns=[c for c in parquet.schema_arrow.names if accept(c)])))
        except (pa.ArrowInvalid, OSError) as error:
            log.warning("removing %s, left unfinished by an earlier run (%s); its rows are done again", path, error)
            fs.rm(path)
    return tables


def read_output(fs: fsspec.AbstractFileSystem, root: str, wanted) -> pa.Table:
    """The output's columns that `wanted` names (a list or a predicate), from every file."""
    tables = [table for _, table in scan_output(fs, root, wanted)]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({"id": pa.array([], pa.string())})


def summarize(fs, root: str, manifest: pa.Table, todo: pa.Table, wall_s: float) -> dict:
    """Counts over the manifest's rows as the output now holds them, and speed over the rows this run did."""
    ids = manifest.column("id").to_pylist()
    # Translation references sit in text_<lang> columns (as in the demo corpus), else in the manifest's text.
    columns = {"id", "error", "duration_s", "text", "tgt_lang", "reference"}
    out = read_output(fs, root, lambda name: name in columns or name.startswith("text_"))
    out = out.filter(pc.is_in(out["id"], value_set=pa.array(ids, pa.string())))
    rows = out.to_pylist()
    errors: dict[str, int] = {}
    for row in rows:
        if row["error"]:
            reason = row["error"].split(":", 1)[0]
            errors[reason] = errors.get(reason, 0) + 1
    ok = [row for row in rows if not row["error"]]
    this_run = set(todo.column("id").to_pylist())
    audio_s = sum(row["duration_s"] or 0.0 for row in ok)
    run_audio_s = sum(row["duration_s"] or 0.0 for row in ok if row["id"] in this_run)
    summary = {
        "rows_in": len(ids),
        "rows_out": len(rows),
        "rows_missing": len(set(ids) - {row["id"] for row in rows}),
        "rows_duplicated": len(rows) - len({row["id"] for row in rows}),
        "rows_ok": len(ok),
        "rows_error": len(rows) - len(ok),
        "errors_by_reason": dict(sorted(errors.items())),
        "rows_this_run": len(this_run),
        "audio_hours": audio_s / 3600,
        "audio_hours_this_run": run_audio_s / 3600,
        "wall_s": wall_s,
        "rtfx": run_audio_s / wall_s if wall_s > 0 else None,
    }
    asr = [row for row in ok if row["tgt_lang"] is None]
    summary["wer"] = scoring.wer([row["reference"] for row in asr], [row["text"] for row in asr])
    bleu = {}
    for lang in sorted({row["tgt_lang"] for row in ok} - {None}):
        rows_lang = [row for row in ok if row["tgt_lang"] == lang]
        references = [row.get(f"text_{lang}") or row["reference"] for row in rows_lang]
        result = scoring.bleu(references, [row["text"] for row in rows_lang])
        if result:
            bleu[lang], summary["bleu_signature"] = round(result[0], 2), result[1]
    summary["bleu"] = bleu
    return summary


def summary_line(summary: dict) -> str:
    errors = ", ".join(f"{n} {reason}" for reason, n in summary["errors_by_reason"].items()) or "none"
    quality = f", WER {summary['wer']:.2f} %" if summary.get("wer") is not None else ""
    quality += "".join(f", BLEU {lang} {score:.1f}" for lang, score in summary.get("bleu", {}).items())
    return (
        f"{summary['rows_in']} rows in, {summary['rows_ok']} ok, {summary['rows_error']} errors ({errors}); "
        f"{summary['rows_this_run']} done in this run, {summary['audio_hours_this_run'] * 3600:.0f} s of audio in "
        f"{summary['wall_s']:.1f} s (RTFx {summary['rtfx'] or 0:.1f}){quality}"
    )
