"""Audio in tar shards: WebDataset and NeMo tarred audio, built from the demo corpus here with tarfile, read from
local files and from the local S3 server, transcribed end to end; damaged shards, members that are not audio or not
there, and a resume after SIGKILL mid-shard."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import S3_CREDENTIALS
from helpers import demo_rows, killed_mid_job

from pipeline import scoring
from pipeline.shards import read_nemo_shard, webdataset_rows
from pipeline.transcribe import TranscribeConfig, run
from s2t_model import DEMO_MODEL

FAST = dict(batch_size=4, feature_batch_size=4, rows_per_file=4, rows_per_block=4, num_beams=1)


def write_tar(path, members: list[tuple[str, bytes]]) -> dict[str, tarfile.TarInfo]:
    """A tar of `members` (name, bytes) in order; returns each member's header (offsets) as tarfile wrote it."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def audio_bytes(row: dict) -> bytes:
    with open(row["audio_filepath"], "rb") as f:
        return f.read()


def webdataset_members(rows: list[dict], style: str) -> list[tuple[str, bytes]]:
    """Samples keyed `sample-<i>`: "json" gives id and text in <key>.json, "txt" the text in <key>.txt (ids then
    <shard stem>/<key>)."""
    members = []
    for i, row in enumerate(rows):
        key = f"sample-{i:03d}"
        members.append((f"{key}.flac", audio_bytes(row)))
        if style == "json":
            members.append((f"{key}.json", json.dumps({"id": row["id"], "text": row["text"], "speaker": i}).encode()))
        else:
            members.append((f"{key}.txt", row["text"].encode()))
    return members


def output_rows(folder) -> list[dict]:
    files = sorted(folder.rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pylist() if files else []


def s3_output_rows(fs, folder: str) -> list[dict]:
    tables = []
    for path in sorted(p for p in fs.find(folder) if p.endswith(".parquet")):
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="default").to_pylist()


def assert_transcribed(out: list[dict], references: dict[str, str]) -> None:
    """Each id of `references` once, without error, WER <= 10 % against the demo corpus' own texts."""
    good = {row["id"]: row for row in out if row["id"] in references}
    assert sorted(good) == sorted(references) and len(good) == sum(row["id"] in references for row in out)
    assert [(i, row["error"]) for i, row in good.items() if row["error"]] == []
    assert all(good[i]["reference"] == references[i] for i in references)
    ids = sorted(references)
    assert scoring.wer([references[i] for i in ids], [good[i]["text"] for i in ids]) <= 10.0
    assert all("audio_bytes" not in row for row in out)


# ---- reading shards, without Ray -------------------------------------------------------------------------------------


def shard_rows(path, with_audio=True, seekable=False) -> list[dict]:
    """The shard's rows, read as the job reads it: a stream (pyarrow's input stream), or for the summary's ids a
    seekable local file whose audio members are skipped by seeks."""
    with pa.OSFile(str(path)) if seekable else pa.input_stream(str(path)) as f:
        return [row for table in webdataset_rows(f, str(path), 2, with_audio) for row in table.to_pylist()]


def test_a_webdataset_shard_gives_one_row_per_sample_with_its_bytes(tmp_path):
    rows = demo_rows(4)
    members = webdataset_members(rows[:2], "json") + [
        (n.replace("sample-", "other-"), d) for n, d in webdataset_members(rows[2:], "txt")
    ]
    members.append(("README", b"not a field of any sample"))
    write_tar(tmp_path / "shard-000007.tar", members)
    read = shard_rows(tmp_path / "shard-000007.tar")
    assert [r["id"] for r in read] == [rows[0]["id"], rows[1]["id"], "shard-000007/other-000", "shard-000007/other-001"]
    assert [r["reference"] for r in read] == [r["text"] for r in rows]
    assert [r["audio_bytes"] for r in read] == [audio_bytes(r) for r in rows]
    assert read[0]["audio"] == f"{tmp_path}/shard-000007.tar/sample-000.flac" and read[0]["speaker"] == 0
    assert all(r["error"] is None for r in read)
    for seekable in (False, True):
        ids_only = shard_rows(tmp_path / "shard-000007.tar", with_audio=False, seekable=seekable)
        assert ids_only == [{k: v for k, v in r.items() if k != "audio_bytes"} for r in read]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_webdataset_shard_gives_what_precedes_the_break_and_one_error_row(tmp_path, damage):
    rows = demo_rows(5)
    path = tmp_path / "shard-000001.tar"
    headers = write_tar(path, webdataset_members(rows, "json"))
    data = bytearray(path.read_bytes())
    broken = headers["sample-003.flac"]
    if damage == "truncated":
        data = data[: broken.offset_data + broken.size // 2]
    else:  # bytes that are no tar header where sample 3 starts: tarfile alone would end the archive there quietly
        data[broken.offset : broken.offset + 512] = b"\x17" * 512
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            assert len(tar.getmembers()) == 6  # no error from tarfile: the break has to be watched for
    path.write_bytes(bytes(data))
    for with_audio, seekable in ((True, False), (False, False), (False, True)):  # the job's reads and the summary's
        read = shard_rows(path, with_audio, seekable)
        # Cut in sample 3's audio: samples 0-2 came whole. A bad header where sample 3 starts: sample 2 was still in
        # progress (a member of it might have followed), so it is lost with the rest.
        whole = 3 if damage == "truncated" else 2
        assert [r["id"] for r in read] == [r["id"] for r in rows[:whole]] + ["shard-000001/.damaged"]
        error = read[-1]["error"]
        assert error.startswith(f"{damage}: {path}: ") and f"sample sample-00{whole} and any after it are lost" in error
        assert (f"no tar header at byte {broken.offset}" if damage == "corrupt" else "sample-003.flac") in error


def test_a_file_that_is_no_tar_is_one_error_row(tmp_path):
    (tmp_path / "shard-9.tar").write_bytes(b"this is not a tar file\n" * 100)
    read = shard_rows(tmp_path / "shard-9.tar")
    assert [(r["id"], r["error"].split(":")[0]) for r in read] == [("shard-9/.damaged", "corrupt")]


def nemo_group(members: list[str], rows: list[dict] | None = None) -> pa.Table:
    rows = rows or [{} for _ in members]
    return pa.Table.from_pylist(
        [
            {
                "id": f"row-{i}",
                "audio": m,
                "offset_s": r.get("offset", 0.0),
                "duration_s": None,
                "reference": None,
                "tgt_lang": None,
                "error": None,
                "_shard": 0,
            }
            for i, (m, r) in enumerate(zip(members, rows))
        ]
    )


def test_nemo_rows_take_their_members_and_name_what_is_missing(tmp_path):
    import pyarrow.fs

    rows = demo_rows(3)
    path = tmp_path / "audio_0.tar"
    write_tar(
        path, [("a.flac", audio_bytes(rows[0])), ("b.flac", audio_bytes(rows[1])), ("c.flac", audio_bytes(rows[2]))]
    )
    tars = {0: (str(path), str(path))}
    group = nemo_group(["b.flac", "a.flac", "a-sub1.flac", "gone.flac"], [{}, {}, {"offset": 0.5}, {}])
    read = {
        r["id"]: r
        for t in read_nemo_shard(group, tars, pyarrow.fs.LocalFileSystem(), 2, "audio_0.tar")
        for r in t.to_pylist()
    }
    assert sorted(read) == ["row-0", "row-1", "row-2", "row-3"]
    assert read["row-0"]["audio_bytes"] == audio_bytes(rows[1]) and read["row-1"]["audio_bytes"] == audio_bytes(rows[0])
    # NeMo's `-sub1`: a second entry of the same file, not written again: the member a.flac, at the row's offset.
    assert read["row-2"]["audio_bytes"] == audio_bytes(rows[0]) and read["row-2"]["offset_s"] == 0.5
    assert read["row-3"]["error"] == f"missing: {path}: no member gone.flac in the tar"
    assert read["row-3"]["audio_bytes"] is None and read["row-0"]["audio"] == f"{path}/b.flac"

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut in b.flac
    read = {
        r["id"]: r
        for t in read_nemo_shard(nemo_group(["a.flac", "c.flac"]), tars, pyarrow.fs.LocalFileSystem(), 2, "audio_0.tar")
        for r in t.to_pylist()
    }
    assert read["row-0"]["error"] is None and read["row-0"]["audio_bytes"] == audio_bytes(rows[0])
    assert (
        read["row-1"]["error"].startswith(f"truncated: {path}: ")
        and "member c.flac not reached" in read["row-1"]["error"]
    )
    read = list(read_nemo_shard(nemo_group(["a.flac"]), {}, pyarrow.fs.LocalFileSystem(), 2, "audio_{0..3}.tar"))
    assert read[0].to_pylist()[0]["error"] == "missing: no tar of audio_{0..3}.tar has shard number 0 (a.flac)"


# ---- end to end ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webdataset_job(ray_session, tmp_path_factory):
    """One job over four local shards of 5 samples, killed (SIGKILL) mid-shard and run again to the end: two whole
    shards (json ids and references; .txt references), one cut short in its fifth sample, one with a sample whose
    .flac is text. -> the folder, the demo rows, the ids the killed run left, the second run's summary, the output.
    The killed run writes blocks of 2 rows a file: its first 2 files cannot hold a whole shard."""
    folder = tmp_path_factory.mktemp("webdataset")
    rows = demo_rows(20)
    write_tar(folder / "shard-000000.tar", webdataset_members(rows[0:5], "json"))
    write_tar(folder / "shard-000001.tar", webdataset_members(rows[5:10], "txt"))
    headers = write_tar(folder / "shard-000002.tar", webdataset_members(rows[10:15], "json"))
    cut = headers["sample-004.flac"]
    data = (folder / "shard-000002.tar").read_bytes()
    (folder / "shard-000002.tar").write_bytes(data[: cut.offset_data + 1000])
    members = webdataset_members(rows[15:20], "json")
    members[2] = ("sample-001.flac", b"this is not audio\n" * 50)
    write_tar(folder / "shard-000003.tar", members)
    pattern = str(folder / "shard-{000000..000003}.tar")
    intact = killed_mid_job(pattern, folder / "out", ray_session, files=2)
    summary = run(TranscribeConfig(manifest=pattern, output=str(folder / "out"), model=DEMO_MODEL, **FAST))
    return folder, rows, intact, summary, output_rows(folder / "out")


def test_webdataset_shards_end_to_end(webdataset_job):
    folder, rows, _, summary, out = webdataset_job
    references = {r["id"]: r["text"] for r in rows[0:5] + rows[10:14] + [rows[15]] + rows[17:20]}
    references.update({f"shard-000001/sample-{i:03d}": r["text"] for i, r in enumerate(rows[5:10])})
    assert_transcribed(out, references)
    errors = {row["id"]: row["error"] for row in out if row["error"]}
    assert sorted(errors) == sorted([rows[16]["id"], "shard-000002/.damaged"])
    assert errors[rows[16]["id"]].startswith(f"unreadable: {folder}/shard-000003.tar/sample-001.flac: ")
    assert errors["shard-000002/.damaged"].startswith(
        f"truncated: {folder}/shard-000002.tar: the tar breaks in member sample-004.flac"
    )
    assert len(out) == len(references) + 2
    assert (summary["rows_in"], summary["rows_out"], summary["rows_missing"], summary["rows_duplicated"]) == (
        len(out),
        len(out),
        0,
        0,
    )
    assert summary["errors_by_reason"] == {"truncated": 1, "unreadable": 1}
    by_id = {row["id"]: row for row in out}
    assert by_id[rows[0]["id"]]["audio"] == f"{folder}/shard-000000.tar/sample-000.flac"
    assert by_id[rows[0]["id"]]["speaker"] == 0  # a json field passed through


def nemo_dataset(folder, rows: list[dict], shards: int) -> list[dict]:
    """A NeMo tarred dataset as convert_to_tarred_audio_dataset.py writes it, of `rows` over `shards` tars:
    audio_<k>.tar, tarred_audio_manifest.json and sharded_manifests/manifest_<k>.json. Row 0's file is entered
    twice (its second entry `-sub1`, at an offset, not written again); rows[1] is sliced (`_<offset>_<duration>`
    naming, its offset moved to source_audio_offset); the last row's member is left out of its tar."""
    entries = [[] for _ in range(shards)]
    members = [[] for _ in range(shards)]
    for i, row in enumerate(rows):
        k = i % shards
        name = f"audio_{row['id'].replace('-', '_')}.flac"
        entry = {"audio_filepath": name, "duration": row["duration"], "text": row["text"], "shard_id": k}
        if i == 1:  # the member is the slice itself: read from its start, whatever source_audio_offset says
            entry.update(
                audio_filepath=f"{name[:-5]}_1_0_{str(row['duration']).replace('.', '_')}.flac", source_audio_offset=1.0
            )
            members[k].append((entry["audio_filepath"], audio_bytes(row)))
        elif i < len(rows) - 1:
            members[k].append((name, audio_bytes(row)))
        entries[k].append(entry)
        if i == 0:
            entries[k].append({**entry, "audio_filepath": name.replace(".flac", "-sub1.flac"), "offset": 0.0})
    (folder / "sharded_manifests").mkdir()
    for k in range(shards):
        write_tar(folder / f"audio_{k}.tar", members[k])
        (folder / "sharded_manifests" / f"manifest_{k}.json").write_text(
            "".join(json.dumps(e) + "\n" for e in entries[k])
        )
    everything = [e for shard in entries for e in shard]
    (folder / "tarred_audio_manifest.json").write_text("".join(json.dumps(e) + "\n" for e in everything))
    return everything


def test_nemo_tarred_audio_end_to_end(ray_session, tmp_path):
    rows = demo_rows(9)
    entries = nemo_dataset(tmp_path, rows, shards=3)
    summary = run(
        TranscribeConfig(
            manifest=str(tmp_path / "tarred_audio_manifest.json"),
            output=str(tmp_path / "out"),
            model=DEMO_MODEL,
            tarred_audio=str(tmp_path / "audio__OP_0..2_CL_.tar"),
            **FAST,
        )
    )
    out = output_rows(tmp_path / "out")
    assert len(out) == len(entries) == summary["rows_in"] == summary["rows_out"]  # one row per manifest line
    by_member = {row["audio"].rsplit("/", 1)[1]: row for row in out}
    missing = entries[-1]["audio_filepath"]
    assert (
        by_member.pop(missing)["error"]
        == f"missing: {tmp_path}/audio_{entries[-1]['shard_id']}.tar: no member {missing} in the tar"
    )
    assert [row for row in by_member.values() if row["error"]] == []
    references = {by_member[e["audio_filepath"]]["id"]: e["text"] for e in entries if e["audio_filepath"] != missing}
    assert_transcribed(list(by_member.values()), references)
    sliced = by_member[next(e["audio_filepath"] for e in entries if "source_audio_offset" in e)]
    assert sliced["source_audio_offset"] == 1.0 and sliced["offset_s"] == 0.0
    assert summary["rows_missing"] == summary["rows_duplicated"] == 0 and summary["errors_by_reason"] == {"missing": 1}


def test_webdataset_and_nemo_shards_on_s3(ray_session, s3_bucket, s3_endpoint, tmp_path):
    fs, bucket = s3_bucket
    rows = demo_rows(8)
    local = tmp_path / "shards"
    local.mkdir()
    write_tar(local / "shard-000000.tar", webdataset_members(rows[:3], "json"))
    write_tar(local / "shard-000001.tar", webdataset_members(rows[3:4], "txt"))
    nemo = tmp_path / "nemo"
    nemo.mkdir()
    entries = nemo_dataset(nemo, rows[4:], shards=2)
    fs.put(str(local) + "/", f"{bucket}/shards/", recursive=True)
    fs.put(str(nemo) + "/", f"{bucket}/nemo/", recursive=True)
    s3 = dict(s3_endpoint_url=s3_endpoint, storage_options=S3_CREDENTIALS, **FAST)

    summary = run(
        TranscribeConfig(
            manifest=f"s3://{bucket}/shards/shard-{{000000..000001}}.tar",
            output=f"s3://{bucket}/out-wds",
            model=DEMO_MODEL,
            **s3,
        )
    )
    out = s3_output_rows(fs, f"{bucket}/out-wds")
    assert_transcribed(out, {**{r["id"]: r["text"] for r in rows[:3]}, "shard-000001/sample-000": rows[3]["text"]})
    assert len(out) == 4 and summary["rows_in"] == 4 and summary["rows_missing"] == 0
    assert {row["audio"] for row in out} >= {f"s3://{bucket}/shards/shard-000000.tar/sample-000.flac"}

    # The sharded manifests this time: one per tar, as a NeMo brace list.
    summary = run(
        TranscribeConfig(
            manifest=f"s3://{bucket}/nemo/sharded_manifests/manifest__OP_0..1_CL_.json",
            tarred_audio=f"s3://{bucket}/nemo/audio_{{0..1}}.tar",
            output=f"s3://{bucket}/out-nemo",
            model=DEMO_MODEL,
            **s3,
        )
    )
    out = s3_output_rows(fs, f"{bucket}/out-nemo")
    assert len(out) == len(entries) == summary["rows_in"]
    missing = entries[-1]["audio_filepath"]
    assert [row["error"].split(":")[0] for row in out if row["error"]] == ["missing"]
    good = [row for row in out if not row["error"]]
    texts = {e["audio_filepath"]: e["text"] for e in entries}
    assert_transcribed(good, {row["id"]: texts[row["audio"].rsplit("/", 1)[1]] for row in good})
    assert all(row["audio"].startswith(f"s3://{bucket}/nemo/audio_") for row in out) and missing not in {
        row["audio"].rsplit("/", 1)[1] for row in good
    }


def test_resume_after_sigkill_mid_shard(webdataset_job):
    folder, rows, intact, summary, out = webdataset_job
    shard_of = {row["id"]: row["audio"].split(".tar")[0] for row in out}
    assert 0 < len(intact) < len(out), "the driver must be killed mid-job for this test to mean anything"
    assert any(
        0 < sum(shard_of[i] == shard for i in intact) < list(shard_of.values()).count(shard)
        for shard in set(shard_of.values())
    ), "some shard was partly done when the driver was killed"
    assert len(out) == len({row["id"] for row in out}) == summary["rows_in"]  # every sample exactly once
    assert summary["rows_this_run"] == len(out) - len(set(intact))
    assert summary["rows_missing"] == summary["rows_duplicated"] == 0


def test_what_a_pattern_names_is_decided_by_extension(tmp_path):
    from pipeline.manifest import Manifest
    from pipeline.rows import ManifestError
    from pipeline.shards import TarredAudio

    write_tar(tmp_path / "a-0.tar", [])
    (tmp_path / "a-1.jsonl").write_text(json.dumps({"audio_filepath": "x.flac", "shard_id": 0}) + "\n")
    assert Manifest(str(tmp_path / "a-0.tar")).kind == Manifest(str(tmp_path / "*.tar")).kind == "webdataset"
    with pytest.raises(ManifestError, match="both manifests .* and tar shards"):
        Manifest(str(tmp_path / "a-*"))
    tars = TarredAudio(str(tmp_path / "a-_OP_0..0_CL_.tar"))
    assert tars.paths == {0: (str(tmp_path / "a-0.tar"),) * 2}
    assert Manifest(str(tmp_path / "a-1.jsonl"), tarred_audio=tars).kind == "manifest"
    with pytest.raises(ManifestError, match="goes with a NeMo manifest"):
        Manifest(str(tmp_path / "a-0.tar"), tarred_audio=tars)
    (tmp_path / "plain.jsonl").write_text(json.dumps({"audio_filepath": "x.flac"}) + "\n")
    with pytest.raises(ManifestError, match="no shard_id in the first 1 lines"):
        Manifest(str(tmp_path / "plain.jsonl"), tarred_audio=tars)


class CountingFile(io.FileIO):
    """A local file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def test_the_summarys_read_of_a_local_shard_skips_its_audio(tmp_path):
    path = tmp_path / "shard-000000.tar"
    write_tar(path, webdataset_members(demo_rows(6), "json"))
    with CountingFile(path) as f:
        ids = [r["id"] for t in webdataset_rows(f, str(path), 4, with_audio=False) for r in t.to_pylist()]
    assert ids == [r["id"] for r in demo_rows(6)]
    assert f.read_bytes < path.stat().st_size / 10  # headers and json: the audio was seeked past


def test_nemo_rows_already_done_are_dropped_before_their_tars_are_read(ray_session, tmp_path):
    import pyarrow.fs

    from pipeline.manifest import Manifest
    from pipeline.shards import TarredAudio

    def no_audio_yet(batch: pa.Table) -> pa.Table:  # here, not at module level: Ray's workers cannot import tests
        assert "audio_bytes" not in batch.column_names, "a resume's filter must run before the tars are read"
        return batch.filter(pa.array([shard == 0 for shard in batch["shard_id"].to_pylist()]))

    rows = demo_rows(6)
    entries = nemo_dataset(tmp_path, rows, shards=2)
    manifest = Manifest(
        str(tmp_path / "tarred_audio_manifest.json"), tarred_audio=TarredAudio(str(tmp_path / "audio_{0..1}.tar"))
    )
    read = manifest.dataset(
        4, pyarrow.fs.LocalFileSystem(), drop_done=lambda rows: rows.map_batches(no_audio_yet, batch_format="pyarrow")
    ).take_all()
    assert sorted(r["audio"] for r in read) == sorted(
        f"{tmp_path}/audio_0.tar/{e['audio_filepath']}" for e in entries if e["shard_id"] == 0
    )
    assert all(r["error"] is None and r["audio_bytes"] for r in read)
