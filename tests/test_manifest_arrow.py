"""Manifest JSONL blocks are parsed by Arrow when they can be; the rows must be exactly those of the row-by-row
path (json.loads and `normalise`), which still handles every block with an odd line. The reference here is that
path, forced for the whole file."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.records as records
from pipeline.manifest import Manifest
from pipeline.records import read_blocks
from pipeline.rows import IdNumbering


def lines(*records) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in records) + b"\n"


PLAIN = lines(
    *(
        {"id": f"utt-{i}", "audio_filepath": f"/corpus/{i}.flac", "duration": 1.5 + i, "text": f"words {i}"}
        for i in range(10)
    )
)
NEMO = lines(
    {"audio_filepath": "audio/a.wav", "duration": 3, "offset": 0, "text": "one", "speaker": 7, "score": 0.5},
    {"audio_filepath": "audio/a.wav", "duration": 2.25, "offset": 3.5, "text": "", "sentence": "two", "lang": "en"},
    {"audio_filepath": "s3://bucket/b.flac", "duration": 1.0, "text": "three", "verified": True, "score": 1},
    {"audio_filepath": "/abs/c.wav", "duration": 4.0, "tgt_lang": "de", "model": "x", "error": None, "speaker": None},
    {"audio": "d.wav", "id": "17", "duration": 1, "tgt_text": "vier", "text": "four"},
    {"audio_filepath": "", "path": "e.wav", "id": "", "duration": 0.5, "offset": -0.0},
)
REPEATS = lines(
    *(
        {"id": i, "audio_filepath": f"/x/{n}.wav"}
        for n, i in enumerate(["x", "x", "x#2", "y", "x", "z", "y#2", "y", "x#3", "w"])
    )
)
INT_IDS = lines(*({"id": i % 4, "audio": f"{i}.wav", "offset": i} for i in range(6)))
ODD = b"\xef\xbb\xbf" + lines(
    {"id": "a", "audio_filepath": "a.wav", "duration": 1.0},
    b"",
    b"   ",
    {"id": "b", "audio_filepath": "b.wav", "duration": "1.5"},
    b"{not json",
    b"[1, 2]",
    {"id": "c", "audio_filepath": "c.wav", "duration": -1},
    {"id": "d", "audio_filepath": "d.wav", "duration": 0},
    {"id": "e", "audio_filepath": "e.wav", "offset": True},
    {"id": "f", "text": "no audio"},
    {"id": "g", "audio_filepath": "g.wav", "meta": {"speaker": 1}},
    {"id": "h", "audio_filepath": "h.wav", "recorded": "2020-01-01"},
    b"\xff\xfe not utf-8",
    {"id": "i", "audio_filepath": "i.wav", "duration": 1e12},
    {"id": 1.5, "audio_filepath": "j.wav"},
    {"id": "k", "audio_filepath": "k.wav", "duration": 2.0},
    {"id": "k", "audio_filepath": "k2.wav", "duration": 2.0},
    b'{"id": "l", "audio_filepath": "l.wav", "id": "m"}',
    {"id": "n", "audio_filepath": "n.wav", "manifest_model": "a", "model": "b"},
    {"id": 17, "audio_filepath": "o.wav", "text": 5},
).replace(b"\n", b"\r\n", 3)


def read(data: bytes, base: str | None, rows_per_block: int) -> list[tuple[pa.Schema, list[dict]]]:
    return [
        (table.schema, table.to_pylist())
        for table in read_blocks(io.BytesIO(data), "/manifests/part.jsonl", rows_per_block, base)
    ]


@pytest.mark.parametrize(
    "data", [PLAIN, NEMO, REPEATS, INT_IDS, ODD], ids=["plain", "nemo", "repeated-ids", "int-ids", "odd-lines"]
)
@pytest.mark.parametrize("base", ["/corpus/root", "s3://bucket/corpus/", None])
@pytest.mark.parametrize("rows_per_block", [1, 3, 256])
def test_arrow_blocks_give_the_rows_of_the_row_by_row_path(monkeypatch, data, base, rows_per_block):
    fast = read(data, base, rows_per_block)
    monkeypatch.setattr(records, "_json_table", lambda *args: None)
    slow = read(data, base, rows_per_block)
    assert fast == slow


@pytest.mark.parametrize("data", [PLAIN, NEMO, REPEATS, INT_IDS], ids=["plain", "nemo", "repeated-ids", "int-ids"])
def test_clean_blocks_take_the_arrow_path(monkeypatch, data):
    taken = []
    original = records._json_table
    monkeypatch.setattr(records, "_json_table", lambda *args: taken.append(original(*args)) or taken[-1])
    read(data, "/corpus", 4)
    assert taken and all(table is not None for table in taken)


def test_repeated_ids_are_numbered_in_file_order():
    assert IdNumbering().number_all(["x", "x", "x#2", "y", "x", "x#3"]) == ["x", "x#2", "x#2#2", "y", "x#3", "x#3#2"]


def test_rows_carrying_their_audio_come_in_smaller_blocks(tmp_path):
    """Blocks of 1,024 manifest rows (~200 bytes a row), 256 for rows with their audio's bytes (tar members, Parquet
    audio cells); an explicit --rows-per-block wins."""
    (tmp_path / "m.jsonl").write_bytes(PLAIN)
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for name, data in [("a.wav", b"RIFF"), ("a.json", b'{"id": "a"}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    audio = pa.array([{"bytes": b"RIFF", "path": "a.wav"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"audio": audio, "text": ["one"]}), tmp_path / "test-00000.parquet")
    pq.write_table(pa.table({"audio": ["a.wav"], "text": ["one"]}), tmp_path / "plain.parquet")
    blocks = {
        name: Manifest(str(tmp_path / name)).block_rows(None)
        for name in ["m.jsonl", "shard-000.tar", "test-00000.parquet", "plain.parquet"]
    }
    assert blocks == {"m.jsonl": 1024, "shard-000.tar": 256, "test-00000.parquet": 256, "plain.parquet": 1024}
    assert Manifest(str(tmp_path / "m.jsonl")).block_rows(64) == 64
