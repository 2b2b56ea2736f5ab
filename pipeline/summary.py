"""Corpus figures of a job's output, computed on the cluster: each block of output rows becomes its sums (rows ok,
audio seconds, word edits, BLEU n-gram counts, errors by reason, ...) as (name, value) rows, by Arrow in Ray Data's
read tasks; one task adds them up by name, and the driver gets one number per name. WER and BLEU come from those
summed sufficient statistics, equal to jiwer's and sacrebleu's corpus figures over the same rows.

Which rows count: the manifest's, as the output now holds them. The sorted id digests of both (pipeline/ids.py),
compared in one task, give the ids missing from the output, those written twice, and the rows of ids the manifest
does not list (an earlier run's, with another manifest), which the sums leave out.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from . import scoring
from .ids import compare, digest_set, drop_listed, sorted_digests
from .reasons import reason_of, reason_words

SUMS = pa.schema([("name", pa.string()), ("value", pa.float64())])


def block_sums(batch: pa.Table, run_id: str | None = None) -> pa.Table:
    """Output rows -> their sums, one (name, value) row per figure: n_out, ok, audio_s, run_rows, run_audio_s,
    wer_edits, wer_words, bleu:<lang>:<k>, error:<reason>. Counts by Arrow; only rows with a score to compute
    become Python objects."""
    error = column(batch, "error")
    ok = pc.fill_null(pc.equal(error, ""), True)  # no error, or an empty one
    seconds = pc.if_else(ok, pc.fill_null(column(batch, "duration_s", pa.float64()), 0.0), 0.0)
    this_run = (
        pc.fill_null(pc.equal(column(batch, "run_id"), run_id), False)
        if run_id is not None
        else pa.array([False] * batch.num_rows)
    )
    sums: dict[str, float] = {
        "n_out": batch.num_rows,
        "ok": pc.sum(ok).as_py() or 0,
        "audio_s": pc.sum(seconds).as_py() or 0.0,
        "run_rows": pc.sum(this_run).as_py() or 0,
        "run_audio_s": pc.sum(pc.if_else(this_run, seconds, 0.0)).as_py() or 0.0,
        "wer_edits": 0.0,
        "wer_words": 0.0,
    }
    reasons = reason_words(pc.filter(error, pc.invert(ok)))
    for counted in pc.value_counts(reasons).to_pylist():
        sums[f"error:{counted['values']}"] = counted["counts"]
    scored = batch.filter(ok)
    lang = column(scored, "tgt_lang")
    for row in scored.filter(pc.is_null(lang)).select(present(scored, ["reference", "text"])).to_pylist():
        edits, words = scoring.wer_counts(row.get("reference"), row.get("text"))
        sums["wer_edits"] += edits
        sums["wer_words"] += words
    by_lang: dict[str, list[dict]] = {}
    translated = scored.filter(pc.and_(pc.is_valid(lang), pc.is_valid(column(scored, "text"))))
    for row in translated.to_pylist():
        by_lang.setdefault(row["tgt_lang"], []).append(row)
    for lang, lang_rows in by_lang.items():
        # Translation references sit in text_<lang> columns (as in the demo corpus), else in the manifest's text.
        pairs = [(r.get(f"text_{lang}") or r.get("reference"), r["text"]) for r in lang_rows]
        pairs = [(ref, hyp) for ref, hyp in pairs if ref is not None]
        stats = scoring.bleu_stats([ref for ref, _ in pairs], [hyp for _, hyp in pairs])
        for k in range(scoring.BLEU_STATS):
            sums[f"bleu:{lang}:{k}"] = float(sum(row_stats[k] for row_stats in stats))
    return pa.table({"name": list(sums), "value": [float(v) for v in sums.values()]}, schema=SUMS)


def column(batch: pa.Table, name: str, type: pa.DataType = pa.string()) -> pa.ChunkedArray:
    """A column of the batch, or nulls when it has none (an output written before the column existed)."""
    return batch[name] if name in batch.column_names else pa.chunked_array([pa.nulls(batch.num_rows, type)])


def present(batch: pa.Table, names: list[str]) -> list[str]:
    return [name for name in names if name in batch.column_names]


def summed(dataset, run_id: str | None = None) -> dict[str, float]:
    """The sums of `block_sums` over a dataset of output rows: each block's few rows, added up by one task (a
    group-by's shuffle would start its aggregator actors for them: seconds on a small machine)."""
    import ray

    parts = dataset.map_batches(
        block_sums, fn_kwargs=dict(run_id=run_id), batch_format="pyarrow", batch_size=None
    ).to_arrow_refs()
    return ray.get(ray.remote(total).remote(*parts))  # one number per figure, not per output row


def total(*parts: pa.Table) -> dict[str, float]:
    parts = [part for part in parts if "name" in part.column_names]  # an empty block may skip the map
    by_name = pa.concat_tables([SUMS.empty_table(), *parts]).group_by("name").aggregate([("value", "sum")])
    return dict(zip(by_name["name"].to_pylist(), by_name["value_sum"].to_pylist()))


def figures(sums: dict[str, float]) -> dict:
    """Summed numbers -> the summary's quality and error fields."""
    bleu, signature = {}, None
    for lang in sorted({name.split(":")[1] for name in sums if name.startswith("bleu:")}):
        result = scoring.bleu_from_stats([sums.get(f"bleu:{lang}:{k}", 0) for k in range(scoring.BLEU_STATS)])
        if result:
            bleu[lang], signature = round(result[0], 2), result[1]
    found = {name.split(":", 1)[1]: int(n) for name, n in sums.items() if name.startswith("error:") and n}
    out = {
        "errors_by_reason": dict(sorted(found.items())),
        # Rows whose error is ours or the store's (unavailable, generation_failed): a rerun does them again.
        "rows_retryable": sum(n for reason, n in found.items() if not reason_of(reason).final),
        "wer": scoring.wer_from_counts(sums.get("wer_edits", 0), sums.get("wer_words", 0)),
        "bleu": bleu,
    }
    if signature:
        out["bleu_signature"] = signature
    return out


def corpus_summary(manifest_ids, output_rows, run_id: str, output_ids=None) -> dict:
    """Counts over the manifest's rows as the output now holds them, quality over those rows, and what this run did.

    manifest_ids: the digest set of the manifest's ids (`ids.digest_set`); output_rows: Dataset of the output (None
    when it has no file); output_ids: the digest set of output_rows' ids when the caller has it (else read here)."""
    import ray

    if output_ids is None:
        output_ids = digest_set(output_rows) if output_rows is not None else ray.put(sorted_digests())
    counts, unlisted = ray.remote(num_returns=2)(compare).remote(manifest_ids, output_ids)
    ids = ray.get(counts)
    if output_rows is not None and ids["unlisted"]:  # rows of ids the manifest does not have are not counted
        output_rows = output_rows.map_batches(drop_listed, fn_kwargs=dict(listed=unlisted), batch_format="pyarrow")
    sums = summed(output_rows, run_id) if output_rows is not None else {}
    return {
        "rows_in": ids["n_in"],
        "rows_out": ids["n_out"],
        "rows_missing": ids["missing"],
        "rows_duplicated": ids["duplicated"],
        "rows_ok": int(sums.get("ok", 0)),
        "rows_error": ids["n_out"] - int(sums.get("ok", 0)),
        "rows_this_run": int(sums.get("run_rows", 0)),
        "audio_hours": sums.get("audio_s", 0.0) / 3600,
        "audio_hours_this_run": sums.get("run_audio_s", 0.0) / 3600,
        **figures(sums),
    }


def run_summary(output_rows, run_id: str) -> dict:
    """The figures of the rows one run wrote (a backfill's summary): counts, errors and BLEU per language."""
    mine = (
        output_rows.map_batches(rows_of_run, fn_kwargs=dict(run_id=run_id), batch_format="pyarrow")
        if output_rows is not None
        else None
    )
    sums = summed(mine) if mine is not None else {}
    return {"rows": int(sums.get("n_out", 0)), **figures(sums)}


def rows_of_run(batch: pa.Table, run_id: str) -> pa.Table:
    return batch.filter(pc.equal(batch["run_id"], run_id))
