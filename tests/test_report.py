"""`s2t report` on a real job's output (two manifest files, a missing file, a translated language), its page opened
in headless Chromium (Debian's `chromium`; skipped without it): the sections are there, the plots are PNG images
Chromium draws, and the figures per manifest file and per duration bucket are jiwer's over those rows."""

import base64
import io
import json
import re
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import demo_rows

from pipeline import scoring
from pipeline.report import report
from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_MODEL

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ["summary", "errors", "by-duration", "by-file", "confidence", "lowest", "worst", "throughput"]


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args], capture_output=True, timeout=120
    )


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_report_page_opens_in_chromium_with_its_sections_plots_and_figures(ray_session, tmp_path):
    from PIL import Image

    rows = demo_rows(14)
    rows[9]["audio_filepath"] = str(tmp_path / "gone.flac")  # an error in the second file: missing
    (tmp_path / "shards").mkdir()
    for name, part in [("a", rows[:8]), ("b", rows[8:])]:
        (tmp_path / "shards" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    output = tmp_path / "out"
    run(
        TranscribeConfig(
            manifest=str(tmp_path / "shards" / "*.jsonl"),
            output=str(output),
            model=DEMO_MODEL,
            num_beams=1,
            rows_per_block=4,
            batch_size=4,
        )
    )
    page = report(str(output))
    assert page == f"{output}/_report.html"

    dom = chromium("--dump-dom", f"file://{page}").stdout.decode()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in dom, anchor
    # Errors by reason, with the failed row as the example.
    errors = dom[dom.index('<section id="errors">') : dom.index('<section id="by-duration">')]
    assert re.search(r"<td>missing</td><td>1</td><td>" + re.escape(rows[9]["id"]), errors), errors

    # WER by manifest file: jiwer's over each file's rows as the output holds them.
    table = pa.concat_tables([pq.read_table(p) for p in output.glob("*.parquet")], promote_options="default")
    by_id = {r["id"]: r for r in table.to_pylist()}
    by_file = dom[dom.index('<section id="by-file">') : dom.index('<section id="confidence">')]
    for name, part in [("a", rows[:8]), ("b", rows[8:])]:
        done = [by_id[r["id"]] for r in part if not by_id[r["id"]]["error"]]
        wer = scoring.wer([r["reference"] for r in done], [r["text"] for r in done])
        cells = re.search(rf"<tr><td>{name}</td><td>(\d+)</td><td>[\d.]+</td><td>([\d.]+)</td>", by_file)
        assert cells, (name, by_file)
        assert int(cells.group(1)) == len(part)
        assert float(cells.group(2)) == pytest.approx(wer, abs=1e-3)
    # By duration: the buckets' rows add up to the output's.
    by_duration = dom[dom.index('<section id="by-duration">') : dom.index('<section id="by-file">')]
    counts = [int(n) for n in re.findall(r"<tr><td>[\d.]+(?:-[\d.]+)? s\+?</td><td>(\d+)</td>", by_duration)]
    assert sum(counts) == len(rows)

    # The plots: PNG data URIs that decode, one per chart; Chromium draws the page with them.
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) == 4  # by duration, by file, confidence, throughput
    for data in images:
        picture = Image.open(io.BytesIO(base64.b64decode(data)))
        assert picture.format == "PNG" and picture.width > 300 and picture.height > 150
    shot = tmp_path / "shot.png"
    chromium("--window-size=1200,4000", f"--screenshot={shot}", f"file://{page}")
    drawn = Image.open(shot).convert("L")
    # Not a blank page: the plots' bars and lines darken a good share of it.
    histogram = drawn.histogram()
    assert sum(histogram[:200]) > 0.02 * drawn.width * drawn.height
