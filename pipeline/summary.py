"""Corpus figures of a job's output, computed by Ray Data aggregations: each row becomes numbers (is it ok, its
audio seconds, its word edits, its BLEU n-gram counts, ...), Ray sums them on the cluster, and the driver gets one
row of totals. WER and BLEU come from those summed sufficient statistics, equal to jiwer's and sacrebleu's corpus
figures over the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from . import scoring
from .output import shuffle_partitions

ID_COUNTS = ("n_in", "n_out")


@dataclass(frozen=True)
class Keys:
    """What the per-row numbers are named after: the target languages and error reasons the output holds."""
    langs: tuple[str, ...]
    reasons: tuple[str, ...]

    def columns(self) -> list[str]:
        return (["n_out", "ok", "audio_s", "run_rows", "run_audio_s", "wer_edits", "wer_words"]
                + [f"bleu_{i}_{k}" for i in range(len(self.langs)) for k in range(scoring.BLEU_STATS)]
                + [f"error_{i}" for i in range(len(self.reasons))])


def reason(error: str | None) -> str | None:
    return None if error is None else error.split(":", 1)[0]


def keys_of(rows) -> Keys:
    """The languages and error reasons of an output dataset (a small aggregation: a few distinct pairs)."""
    pairs = rows.select_columns(["tgt_lang", "error"]).map_batches(
        lambda batch: pa.table({"tgt_lang": batch["tgt_lang"].cast(pa.string()),
                                "reason": pa.array([reason(e) for e in batch["error"].to_pylist()], pa.string())}),
        batch_format="pyarrow").groupby(["tgt_lang", "reason"], num_partitions=shuffle_partitions()).count().take_all()
    return Keys(langs=tuple(sorted({p["tgt_lang"] for p in pairs if p["tgt_lang"] is not None and p["reason"] is None})),
                reasons=tuple(sorted({p["reason"] for p in pairs if p["reason"] is not None})))


def row_numbers(batch: pa.Table, keys: Keys, run_id: str | None) -> pa.Table:
    """Output rows -> their numbers (see Keys.columns), one row each, keyed by id."""
    rows = batch.to_pylist()
    columns = {name: [0] * len(rows) for name in keys.columns()}
    columns["n_out"] = [1] * len(rows)
    columns["n_in"] = [0] * len(rows)
    by_lang: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        ok = not row.get("error")
        this_run = run_id is not None and row.get("run_id") == run_id
        seconds = (row.get("duration_s") or 0.0) if ok else 0.0
        columns["ok"][i], columns["audio_s"][i] = int(ok), seconds
        columns["run_rows"][i], columns["run_audio_s"][i] = int(this_run), seconds if this_run else 0.0
        if not ok:
            columns[f"error_{keys.reasons.index(reason(row['error']))}"][i] = 1
        elif row.get("tgt_lang") is None:
            columns["wer_edits"][i], columns["wer_words"][i] = scoring.wer_counts(row.get("reference"), row.get("text"))
        elif row["tgt_lang"] in keys.langs and row.get("text") is not None:
            by_lang.setdefault(keys.langs.index(row["tgt_lang"]), []).append(i)
    for lang, indexes in by_lang.items():
        name = keys.langs[lang]
        pairs = [(rows[i].get(f"text_{name}") or rows[i].get("reference"), rows[i]["text"]) for i in indexes]
        scored = [(i, ref, hyp) for i, (ref, hyp) in zip(indexes, pairs) if ref is not None]
        stats = scoring.bleu_stats([ref for _, ref, _ in scored], [hyp for _, _, hyp in scored])
        for (i, _, _), row_stats in zip(scored, stats):
            for k, value in enumerate(row_stats):
                columns[f"bleu_{lang}_{k}"][i] = value
    return pa.table({"id": batch["id"].cast(pa.string()), **{name: pa.array(values, pa.float64() if name.endswith("audio_s") else
                                                           pa.int64()) for name, values in columns.items()}})


def manifest_numbers(batch: pa.Table, keys: Keys) -> pa.Table:
    """Manifest rows -> one row each of zeros but n_in = 1, to be summed with the output's numbers by id."""
    zeros = {name: pa.array([0] * batch.num_rows, pa.float64() if name.endswith("audio_s") else pa.int64())
             for name in keys.columns()}
    return pa.table({"id": batch["id"].cast(pa.string()), **zeros, "n_in": pa.array([1] * batch.num_rows, pa.int64())})


def per_manifest_id(batch: pa.Table) -> pa.Table:
    """Sums by id -> only the manifest's ids, with how many of each are missing from the output or doubled."""
    batch = batch.filter(pc.greater(batch["n_in"], 0))
    difference = pc.subtract(batch["n_in"], batch["n_out"])
    return batch.append_column("missing", pc.max_element_wise(difference, 0)).append_column(
        "duplicated", pc.max_element_wise(pc.negate(difference), 0))


def totals(dataset, columns: list[str]) -> dict:
    from ray.data.aggregate import Sum

    result = dataset.aggregate(*[Sum(name) for name in columns]) if columns else {}
    return {name: result.get(f"sum({name})") or 0 for name in columns}


def figures(sums: dict, keys: Keys) -> dict:
    """Summed numbers -> the summary's quality and error fields."""
    bleu, signature = {}, None
    for i, lang in enumerate(keys.langs):
        result = scoring.bleu_from_stats([sums[f"bleu_{i}_{k}"] for k in range(scoring.BLEU_STATS)])
        if result:
            bleu[lang], signature = round(result[0], 2), result[1]
    found = {r: int(sums[f"error_{i}"]) for i, r in enumerate(keys.reasons) if sums[f"error_{i}"]}
    out = {"errors_by_reason": dict(sorted(found.items())),
           "wer": scoring.wer_from_counts(sums["wer_edits"], sums["wer_words"]), "bleu": bleu}
    if signature:
        out["bleu_signature"] = signature
    return out


def corpus_summary(manifest_ids, output_rows, run_id: str) -> dict:
    """Counts over the manifest's rows as the output now holds them, quality over those rows, and what this run did.

    manifest_ids: Dataset with the manifest's `id`; output_rows: Dataset of the output (None when it has no file).
    Every id is summed on the cluster (a hash group-by): the driver receives totals only."""
    keys = keys_of(output_rows) if output_rows is not None else Keys((), ())
    columns = keys.columns()
    numbers = manifest_ids.map_batches(manifest_numbers, fn_kwargs=dict(keys=keys), batch_format="pyarrow")
    if output_rows is not None:
        numbers = numbers.union(output_rows.map_batches(row_numbers, fn_kwargs=dict(keys=keys, run_id=run_id),
                                                        batch_format="pyarrow"))
    from ray.data.aggregate import Sum

    by_id = numbers.groupby("id", num_partitions=shuffle_partitions()).aggregate(*[Sum(name, alias_name=name) for name in [*ID_COUNTS, *columns]])
    sums = totals(by_id.map_batches(per_manifest_id, batch_format="pyarrow"),
                  [*ID_COUNTS, "missing", "duplicated", *columns])
    return {
        "rows_in": int(sums["n_in"]),
        "rows_out": int(sums["n_out"]),
        "rows_missing": int(sums["missing"]),
        "rows_duplicated": int(sums["duplicated"]),
        "rows_ok": int(sums["ok"]),
        "rows_error": int(sums["n_out"] - sums["ok"]),
        "rows_this_run": int(sums["run_rows"]),
        "audio_hours": sums["audio_s"] / 3600,
        "audio_hours_this_run": sums["run_audio_s"] / 3600,
        **figures(sums, keys),
    }


def run_summary(output_rows, run_id: str, langs: list[str]) -> dict:
    """The figures of the rows one run wrote (a backfill's summary): counts, errors and BLEU per language."""
    mine = output_rows.filter(lambda row: row["run_id"] == run_id) if output_rows is not None else None
    keys = keys_of(mine) if mine is not None else Keys((), ())
    keys = Keys(tuple(sorted(set(keys.langs) | set(langs))), keys.reasons)
    if mine is None:
        sums = dict.fromkeys(["n_out", *keys.columns()], 0)
    else:
        sums = totals(mine.map_batches(row_numbers, fn_kwargs=dict(keys=keys, run_id=run_id), batch_format="pyarrow"),
                      ["n_out", *keys.columns()])
    return {"rows": int(sums["n_out"]), **figures(sums, keys)}
