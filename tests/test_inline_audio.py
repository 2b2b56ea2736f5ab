"""Rows that carry their audio's bytes (`audio_bytes`: tar members, Parquet cells) are transcribed from those
bytes, exactly as from the file; the bytes never reach the generation actors or the output."""

import pyarrow as pa
from helpers import demo_rows

from pipeline.rows import SCHEMA
from pipeline.stages import FeatureOptions, GenerationOptions, TranscribeAudio
from s2t_model import DEMO_MODEL, DecodingOptions, FeatureExtractor


def transcribe(rows: list[dict], with_bytes: dict[int, bytes]) -> list[dict]:
    table = pa.Table.from_pylist(
        [
            {
                "id": r["id"],
                "audio": r["audio_filepath"] if i not in with_bytes else f"shard.tar/{r['id']}.flac",
                "offset_s": 0.0,
                "duration_s": None,
                "reference": r["text"],
                "tgt_lang": None,
                "error": None,
            }
            for i, r in enumerate(rows)
        ],
        schema=SCHEMA,
    )
    table = table.append_column("audio_bytes", pa.array([with_bytes.get(i) for i in range(len(rows))], pa.binary()))
    stage = TranscribeAudio(
        FeatureOptions(
            feature_config=FeatureExtractor.from_pretrained(DEMO_MODEL).to_dict(),
            min_duration_s=0.1,
            max_duration_s=60.0,
        ),
        GenerationOptions(model_uri=DEMO_MODEL, model_label="demo", decoding=DecodingOptions(num_beams=1)),
    )
    out = stage(table)
    assert "audio_bytes" not in out.column_names
    return out.to_pylist()


def test_rows_carrying_their_audio_bytes_are_transcribed_from_them():
    rows = demo_rows(4)
    data = {i: open(r["audio_filepath"], "rb").read() for i, r in enumerate(rows) if i % 2}
    data[2] = b""  # an empty member
    from_files = transcribe(rows, {})
    from_bytes = transcribe(rows, data)
    for i in (1, 3):
        assert from_bytes[i]["error"] is None and from_bytes[i]["text"] == from_files[i]["text"]
        assert from_bytes[i]["duration_s"] == from_files[i]["duration_s"]
        assert from_bytes[i]["audio"] == f"shard.tar/{rows[i]['id']}.flac"
    assert from_bytes[0]["text"] == from_files[0]["text"]  # rows without bytes still read their file
    assert from_bytes[2]["error"] == f"empty: shard.tar/{rows[2]['id']}.flac: zero bytes of audio"
