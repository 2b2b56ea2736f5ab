"""`s2t bench pipeline`'s corpus: the demo clips repeated to the asked duration, every id distinct, no Ray needed."""

import json
import os

import pytest

from bench import pipeline as bench_pipeline
from jobs import cli
from pipeline.manifest import read_manifest
from s2t_model import DEMO_CORPUS


def demo_seconds() -> tuple[int, float, float]:
    with open(os.path.join(DEMO_CORPUS, "manifest.jsonl")) as f:
        durations = [json.loads(line)["duration"] for line in f if line.strip()]
    return len(durations), sum(durations), max(durations)


@pytest.mark.parametrize("hours", [0.01, 0.05, 0.2])
def test_corpus_holds_the_asked_audio_with_distinct_ids(tmp_path, hours):
    path, seconds = bench_pipeline.build_corpus(str(tmp_path / "corpus"), hours)
    rows = [json.loads(line) for line in open(path)]
    _, _, longest = demo_seconds()
    total = sum(row["duration"] for row in rows)
    assert total == pytest.approx(seconds)
    assert hours * 3600 <= total < hours * 3600 + longest  # at least the hours asked, at most one clip more
    assert len({row["id"] for row in rows}) == len(rows)
    # The job reads it as it is: no id renamed by the manifest reader, every audio file there, nothing copied.
    table = read_manifest(path)
    assert table.column("id").to_pylist() == [row["id"] for row in rows]
    assert table.column("error").null_count == len(rows)
    assert all(
        os.path.isfile(audio) and audio.startswith(os.path.abspath(DEMO_CORPUS))
        for audio in set(table.column("audio").to_pylist())
    )
    assert os.listdir(tmp_path / "corpus") == ["manifest.jsonl"]


def test_an_hour_repeats_every_clip(tmp_path):
    count, seconds, _ = demo_seconds()
    path, total = bench_pipeline.build_corpus(str(tmp_path), 1.0)
    rows = [json.loads(line) for line in open(path)]
    assert total >= 3600 and len(rows) >= int(3600 / seconds) * count
    clips = {row["audio_filepath"] for row in rows}
    assert len(clips) == count


def test_the_command_is_registered():
    args = cli.build_parser().parse_args(["bench", "pipeline", "--hours", "0.05", "--generation-cpus", "1"])
    assert args.run is bench_pipeline.main and args.hours == 0.05 and args.generation_cpus == 1.0
