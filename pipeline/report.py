"""`s2t report OUT`: one static HTML page about a job's output, to open from disk (plots embedded as PNG data URIs).

    output files -> block_figures (Ray Data read tasks: each block's sums and its few candidate rows)
                 -> merged (one task) -> the page: summary, errors by reason with examples, WER/BLEU by duration
                    bucket and by manifest file, confidence histogram with the flagged share, lowest-confidence and
                    worst rows (reference vs output), throughput over the last run (its _summary.json)

As pipeline/summary.py does, the driver gets sums by name and a few rows, never the output: WER and BLEU per group
are summed sufficient statistics (summary.block_sums on each group's rows), equal to jiwer's and sacrebleu's.
"""

from __future__ import annotations

import base64
import html
import io
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from s2t_model.speech2text import MIN_AVG_LOGPROB

from . import scoring
from .ids import digests, lookup
from .reasons import reason_word
from .summary import block_sums, figures

DURATION_EDGES = [0.0, 2.0, 5.0, 10.0, 20.0, 60.0]  # seconds: the buckets [0, 2), [2, 5), ..., [60, inf)
CONFIDENCE_EDGES = np.linspace(-3.0, 0.0, 31)  # mean log-probability per token; lower ones go in the first bin
TOP = 10  # rows shown per list; examples per error reason: EXAMPLES
EXAMPLES = 3
FIGURES = pa.schema([("name", pa.string()), ("value", pa.float64()), ("row", pa.string())])
COLUMNS = {"id", "error", "duration_s", "text", "tgt_lang", "reference", "run_id", "avg_logprob", "low_confidence"}
SHOWN = ("id", "duration_s", "tgt_lang", "reference", "text", "avg_logprob", "error")


def bucket_labels() -> list[str]:
    edges = DURATION_EDGES + [None]
    return [f"{a:g}-{b:g} s" if b is not None else f"{a:g} s +" for a, b in zip(edges, edges[1:])]


def prefixed(prefix: str, sums: pa.Table) -> pa.Table:
    names = pc.binary_join_element_wise(pa.scalar(prefix), sums["name"], "")
    return pa.table({"name": names, "value": sums["value"], "row": pa.nulls(len(sums), pa.string())}, schema=FIGURES)


def block_figures(batch: pa.Table, files=None) -> pa.Table:
    """A block of output rows -> (name, value, row) rows: the summary's sums overall ("all|name"), per duration bucket
    ("bucket:<i>|name") and per manifest file ("file:<label>|name"); confidence bins ("conf:<i>"), "scored" and
    "flagged"; and candidate rows as JSON (name "lowest", "worst", "example:<reason>", value their score).
    files: (the ObjectRefs of the manifest's sorted id digests and of each one's file number, the files' labels)
    or None."""
    import ray

    parts = [prefixed("all|", block_sums(batch))]
    duration = pc.fill_null(batch["duration_s"], 0.0).to_numpy(zero_copy_only=False)
    bucket = np.digitize(duration, DURATION_EDGES[1:])
    for i in np.unique(bucket):
        parts.append(prefixed(f"bucket:{i}|", block_sums(batch.filter(pa.array(bucket == i)))))
    if files is not None:
        listed, numbers, labels = ray.get(files[0]), ray.get(files[1]), files[2]
        where = lookup(digests(batch["id"].cast(pa.string()).to_pylist()), listed)
        names = np.asarray(labels + ["(not in the manifest)"], dtype=object)
        file_of = names[np.where(where >= 0, numbers[np.maximum(where, 0)] if len(numbers) else -1, -1)]
        for label in np.unique(file_of):
            parts.append(prefixed(f"file:{label}|", block_sums(batch.filter(pa.array(file_of == label)))))
    extra: dict[str, float] = {}
    ok = (
        pc.fill_null(pc.equal(batch["error"], ""), True)
        if "error" in batch.column_names
        else pa.chunked_array([pa.array([True] * batch.num_rows)])
    )
    if "avg_logprob" in batch.column_names:
        scores = batch["avg_logprob"].to_numpy(zero_copy_only=False).astype(np.float64)
        scores = scores[np.isfinite(scores)]
        counts, _ = np.histogram(np.clip(scores, CONFIDENCE_EDGES[0], CONFIDENCE_EDGES[-1]), CONFIDENCE_EDGES)
        extra.update({f"conf:{i}": float(n) for i, n in enumerate(counts) if n})
        extra["scored"] = float(len(scores))
    if "low_confidence" in batch.column_names:
        extra["flagged"] = float(pc.sum(pc.fill_null(batch["low_confidence"], False)).as_py() or 0)
    parts.append(
        pa.table(
            {"name": list(extra), "value": list(extra.values()), "row": pa.nulls(len(extra), pa.string())},
            schema=FIGURES,
        )
    )
    parts.append(candidates(batch, ok))
    return pa.concat_tables(parts)


def candidates(batch: pa.Table, ok) -> pa.Table:
    """The block's few rows worth showing: lowest confidence, worst WER (ASR rows with a reference), and the first
    rows of each error reason."""
    shown = batch.select([c for c in SHOWN if c in batch.column_names])
    found: list[tuple[str, float, dict]] = []
    if "avg_logprob" in batch.column_names:
        scored = shown.filter(pc.and_(ok, pc.is_valid(batch["avg_logprob"])))
        order = np.argsort(scored["avg_logprob"].to_numpy(zero_copy_only=False))[:TOP]
        found += [("lowest", row["avg_logprob"], row) for row in scored.take(pa.array(order)).to_pylist()]
    if {"reference", "text"} <= set(batch.column_names):
        asr = shown.filter(pc.and_(ok, pc.and_(pc.is_null(batch["tgt_lang"]), pc.is_valid(batch["reference"]))))
        rates = []
        for row in asr.to_pylist():
            edits, words = scoring.wer_counts(row["reference"], row["text"])
            rates.append((edits / max(words, 1), edits, row))
        rates.sort(key=lambda r: (-r[0], -r[1]))
        found += [("worst", rate, dict(row, wer=100 * rate)) for rate, edits, row in rates[:TOP] if edits]
    if not pc.all(ok).as_py():
        taken: dict[str, int] = {}
        for row in shown.filter(pc.invert(ok)).to_pylist():
            reason = reason_word(row["error"])
            if taken.get(reason, 0) < EXAMPLES:
                taken[reason] = taken.get(reason, 0) + 1
                found.append((f"example:{reason}", 0.0, row))
    return pa.table(
        {
            "name": [f[0] for f in found],
            "value": [float(f[1]) for f in found],
            "row": [json.dumps(f[2], default=str) for f in found],
        },
        schema=FIGURES,
    )


def merged(*parts: pa.Table) -> dict:
    """The blocks' figures -> {"sums": {name: value}, "rows": {kind: [rows]}} (one task: a few rows a block)."""
    table = pa.concat_tables([FIGURES.empty_table(), *[p for p in parts if "name" in p.column_names]])
    sums_rows = table.filter(pc.is_null(table["row"]))
    by_name = sums_rows.group_by("name").aggregate([("value", "sum")])
    rows: dict[str, list] = {}
    listed = table.filter(pc.is_valid(table["row"]))
    for name, value, row in zip(*(listed[c].to_pylist() for c in ("name", "value", "row"))):
        rows.setdefault(name, []).append((value, json.loads(row)))
    for name, found in rows.items():
        if name == "lowest":
            found.sort(key=lambda f: f[0])
        elif name == "worst":
            found.sort(key=lambda f: -f[0])
        rows[name] = [row for _, row in found[: TOP if not name.startswith("example:") else EXAMPLES]]
    return {"sums": dict(zip(by_name["name"].to_pylist(), by_name["value_sum"].to_pylist())), "rows": rows}


def manifest_files(manifest_uri: str | None, storage_options: dict | None):
    """(the ObjectRefs of the manifest's id digests, sorted, and of each one's file number; the files' labels) for a
    manifest of several files (each read by a Ray Data read task, with its path), else None."""
    if not manifest_uri:
        return None
    import ray

    from .manifest import Manifest, ManifestDatasource
    from .output import arrow_filesystem

    try:
        manifest = Manifest(manifest_uri, storage_options)
    except Exception:  # a manifest moved or gone since the run: the page goes without the per-file table
        return None
    if len(manifest.files) < 2 or manifest.kind in ("audio", "webdataset") or manifest.tarred_audio is not None:
        return None
    labels = manifest.labels()
    order = sorted(manifest.files)
    read = ray.data.read_datasource(
        ManifestDatasource(
            manifest.files,
            filesystem=arrow_filesystem(manifest.fs),
            rows_per_block=manifest.block_rows(None),
            bases={f: manifest.base(f) for f in manifest.files},
            urls={f: manifest.url(f) for f in manifest.files},
            with_audio=False,
            include_paths=True,
        ),
        override_num_blocks=len(manifest.files),
    )
    parts = (
        read.select_columns(["id", "path"])
        .map_batches(id_files, fn_kwargs=dict(order=order), batch_format="pyarrow")
        .to_numpy_refs()
    )
    listed, numbers = ray.remote(num_returns=2)(sorted_files).remote(*parts)
    return listed, numbers, [labels[path] for path in order]


def id_files(batch: pa.Table, order: list[str]) -> dict[str, np.ndarray]:
    found = digests(batch["id"].cast(pa.string()).to_pylist())
    position = {path: i for i, path in enumerate(order)}
    files = [position.get(p, position.get(posixpath.normpath(p), -1)) for p in batch["path"].to_pylist()]
    return {"hi": found["hi"], "lo": found["lo"], "file": np.asarray(files, dtype=np.int64)}


def sorted_files(*parts: dict) -> tuple[np.ndarray, np.ndarray]:
    from .ids import DIGEST

    parts = [p for p in parts if "hi" in p]
    found = np.empty(sum(len(p["hi"]) for p in parts), dtype=DIGEST)
    for name in ("hi", "lo"):
        found[name] = np.concatenate([p[name] for p in parts]) if parts else []
    files = np.concatenate([p["file"] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.lexsort((found["lo"], found["hi"]))
    return found[order], files[order]


def compute(fs, root: str, files=None) -> dict:
    """The report's figures of the output under root (on Ray)."""
    import ray

    from .output import footers, rows_dataset

    written = footers(fs, root)
    if not written:
        return {"sums": {}, "rows": {}}
    names = set.intersection(
        *(
            set(m.schema.to_arrow_schema().names) | ({"tgt_lang"} if "tgt_lang=" in p else set())
            for p, m in written.items()
        )
    )
    columns = sorted(n for n in names if n in COLUMNS or n.startswith("text_"))
    rows = rows_dataset(fs, root, list(written), columns)
    parts = rows.map_batches(block_figures, fn_kwargs=dict(files=files), batch_format="pyarrow").to_arrow_refs()
    return ray.get(ray.remote(merged).remote(*parts))


def group_figures(sums: dict, prefix: str) -> dict[str, dict]:
    """{group: the summary's figures (WER, BLEU, errors) and its rows and audio} for names "<prefix><group>|..."."""
    groups: dict[str, dict] = {}
    for name, value in sums.items():
        if name.startswith(prefix):
            group, figure = name[len(prefix) :].split("|", 1)
            groups.setdefault(group, {})[figure] = value
    return {
        group: {**figures(s), "rows": int(s.get("n_out", 0)), "audio_s": s.get("audio_s", 0.0)}
        for group, s in groups.items()
    }


# ---- the page ----


def png(fig) -> str:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def quality_plot(groups: dict[str, dict], order: list[str], title: str) -> str | None:
    """WER (and BLEU per language) by group, as bars; None when no group has either."""
    langs = sorted({lang for g in groups.values() for lang in g["bleu"]})
    series = (
        [("WER %", [groups[k]["wer"] for k in order])] if any(groups[k]["wer"] is not None for k in order) else []
    ) + [(f"BLEU {lang}", [groups[k]["bleu"].get(lang) for k in order]) for lang in langs]
    if not series:
        return None
    fig, ax = plt().subplots(figsize=(8, 3.2))
    width = 0.8 / len(series)
    for j, (label, values) in enumerate(series):
        xs = [i + j * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(order))],
        [f"{k}\n{groups[k]['rows']:,} rows" for k in order],
        fontsize=8,
    )
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def confidence_plot(sums: dict, threshold: float | None) -> str | None:
    counts = [sums.get(f"conf:{i}", 0.0) for i in range(len(CONFIDENCE_EDGES) - 1)]
    if not any(counts):
        return None
    fig, ax = plt().subplots(figsize=(8, 3.2))
    ax.bar(CONFIDENCE_EDGES[:-1], counts, width=np.diff(CONFIDENCE_EDGES), align="edge", color="#4c72b0")
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"min_avg_logprob {threshold:g}: flagged below")
        ax.legend(fontsize=8)
    ax.set_xlabel("mean log-probability per token (the first bin holds all lower)")
    ax.set_ylabel("rows")
    ax.set_title("Confidence")
    return png(fig)


def throughput_plot(timeline: list) -> str | None:
    if not timeline or len(timeline) < 2:
        return None
    t, rows, audio = (np.asarray(c, dtype=float) for c in zip(*timeline))
    fig, (left, right) = plt().subplots(1, 2, figsize=(10, 3.2))
    left.plot(t, rows, color="#4c72b0", marker="." if len(t) < 20 else None)
    left.set_xlabel("seconds into the run")
    left.set_ylabel("rows done this run")
    left.set_title("Rows")
    rtfx = np.divide(audio, t, out=np.zeros_like(audio), where=t > 0)
    right.plot(t[1:], rtfx[1:], color="#55a868", marker="." if len(t) < 20 else None)
    right.set_xlabel("seconds into the run")
    right.set_ylabel("audio s / wall s so far")
    right.set_title("RTFx")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return png(fig)


def table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def section(anchor: str, title: str, *content: str | None) -> str:
    body = "".join(c for c in content if c)
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body or "<p>Nothing to show.</p>"}</section>'


def image(uri: str | None, alt: str) -> str | None:
    return f'<img src="{uri}" alt="{html.escape(alt)}">' if uri else None


def group_table(groups: dict[str, dict], order: list[str], label: str) -> str:
    langs = sorted({lang for g in groups.values() for lang in g["bleu"]})
    rows = [
        {
            label: k,
            "rows": groups[k]["rows"],
            "audio h": groups[k]["audio_s"] / 3600,
            "WER %": groups[k]["wer"],
            "errors": sum(groups[k]["errors_by_reason"].values()),
            **{f"BLEU {lang}": groups[k]["bleu"].get(lang) for lang in langs},
        }
        for k in order
    ]
    return table(rows, [label, "rows", "audio h", "WER %", *[f"BLEU {lang}" for lang in langs], "errors"])


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .5em;
vertical-align:top;text-align:left}th{background:#f4f4f4}img{max-width:100%}.figures td:first-child{font-weight:600}"""


def render(summary: dict, found: dict, threshold: float | None) -> str:
    sums, rows = found["sums"], found["rows"]
    overall = group_figures(sums, "all").get(
        "", {"errors_by_reason": {}, "wer": None, "bleu": {}, "rows": 0, "audio_s": 0.0}
    )
    facts = [
        ("output", summary.get("output")),
        ("manifest", summary.get("manifest")),
        ("model", summary.get("model")),
        ("last run", summary.get("run_id")),
        ("manifest rows", summary.get("rows_in")),
        ("output rows", overall["rows"]),
        ("rows ok", summary.get("rows_ok")),
        ("rows with an error", summary.get("rows_error")),
        ("rows missing", summary.get("rows_missing")),
        ("audio hours", overall["audio_s"] / 3600),
        ("WER %", overall["wer"]),
        *[(f"BLEU {lang}", score) for lang, score in overall["bleu"].items()],
        ("last run: wall s", summary.get("wall_s")),
        ("last run: RTFx", summary.get("rtfx")),
    ]
    summary_html = (
        '<table class="figures">'
        + "".join(f"<tr><td>{html.escape(k)}</td><td>{cell(v)}</td></tr>" for k, v in facts if v is not None)
        + "</table>"
    )

    reasons = overall["errors_by_reason"]
    error_rows = [
        {
            "reason": reason,
            "rows": n,
            "examples": "; ".join(f"{r['id']}: {r['error']}" for r in rows.get(f"example:{reason}", [])),
        }
        for reason, n in reasons.items()
    ]
    errors_html = table(error_rows, ["reason", "rows", "examples"]) if error_rows else "<p>No row failed.</p>"

    labels = bucket_labels()
    buckets = {labels[int(k)]: v for k, v in group_figures(sums, "bucket:").items()}
    bucket_order = [b for b in labels if b in buckets]
    files = group_figures(sums, "file:")
    file_order = sorted(files)

    scored, flagged = sums.get("scored", 0.0), sums.get("flagged", 0.0)
    share = (
        f"<p>{flagged:,.0f} of {scored:,.0f} rows with a score are flagged low_confidence "
        f"({100 * flagged / scored:.1f} %).</p>"
        if scored
        else None
    )
    shown = ["id", "duration_s", "avg_logprob", "reference", "text"]
    return "".join(
        [
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>s2t report</title>",
            f"<style>{STYLE}</style></head><body><h1>s2t report: {html.escape(str(summary.get('output', '')))}</h1>",
            section("summary", "Summary", summary_html),
            section("errors", "Errors by reason", errors_html),
            section(
                "by-duration",
                "WER and BLEU by duration",
                image(quality_plot(buckets, bucket_order, "By duration"), "WER and BLEU by duration bucket"),
                group_table(buckets, bucket_order, "duration") if buckets else None,
            ),
            section(
                "by-file",
                "WER and BLEU by manifest file",
                image(quality_plot(files, file_order, "By manifest file"), "WER and BLEU by manifest file")
                if len(files) > 1
                else "<p>The manifest is one file (or was not found): see the summary.</p>",
                group_table(files, file_order, "file") if len(files) > 1 else None,
            ),
            section("confidence", "Confidence", image(confidence_plot(sums, threshold), "confidence histogram"), share),
            section(
                "lowest", "Lowest-confidence rows", table(rows.get("lowest", []), shown) if rows.get("lowest") else None
            ),
            section(
                "worst",
                "Worst rows by WER",
                table(rows.get("worst", []), ["id", "duration_s", "wer", "reference", "text"])
                if rows.get("worst")
                else None,
            ),
            section(
                "throughput",
                "Throughput over the last run",
                image(throughput_plot(summary.get("throughput", [])), "throughput over the run"),
            ),
            "</body></html>",
        ]
    )


def report(
    output: str,
    html_path: str | None = None,
    manifest: str | None = None,
    storage_options: dict | None = None,
    threshold: float | None = MIN_AVG_LOGPROB,
) -> str:
    """Write the page for the output folder `output` (default: <output>/_report.html); returns where it went."""
    import fsspec

    from .output import SUMMARY, output_filesystem

    fs, root = output_filesystem(output, storage_options)
    summary_path = f"{root.rstrip('/')}/{SUMMARY}"
    summary = json.loads(fs.cat_file(summary_path)) if fs.exists(summary_path) else {"output": output}
    found = compute(fs, root, manifest_files(manifest or summary.get("manifest"), storage_options))
    page = render(summary, found, threshold)
    html_path = html_path or f"{output.rstrip('/')}/_report.html"
    with fsspec.open(html_path, "w", **(storage_options or {})) as f:
        f.write(page)
    return html_path
