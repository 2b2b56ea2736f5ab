"""Sets of ids at corpus scale: a dataset's ids as one sorted array of 128-bit digests in Ray's object store.

    resume:  output ids -> digest_set (ObjectRef);  manifest blocks -> map_batches(drop_listed) -> rows still to do
    summary: digest_set(manifest ids), digest_set(output ids) -> compare (one task) -> missing, doubled, unlisted

The driver holds the references (one per block while a set is built), never an id. A set takes 16 bytes per id
(160 MB at 10 M ids) and is shared zero-copy by the workers of a node. 128 bits, because a false match would drop a
row without a word: at 10 M ids on each side the chance of any is ~1e-24.

Chosen over Ray Data's hash-shuffle anti-join and group-by (`Dataset.join(..., join_type="left_anti")`,
`groupby("id")`) by measurement: those move every manifest row and output id through shuffle aggregators; this
reads each side once and moves no rows (`s2t bench scale --resume join|digests` compares the two; figures in the
README). And over Ray's CheckpointConfig (beta), which keeps a second record of ids beside the output (ours is the
output itself, so earlier runs' files and files removed after a crash stay right) and cannot follow a row whose id
changes (a long recording's segments).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

DIGEST = np.dtype([("hi", "u8"), ("lo", "u8")])


def digests(ids: list[str]) -> np.ndarray:
    """Ids -> (N,) array of their 128-bit blake2b digests as (hi, lo) uint64 pairs."""
    raw = b"".join(hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids)
    return np.frombuffer(raw, dtype=[("hi", ">u8"), ("lo", ">u8")]).astype(DIGEST)


def keys_of(batch: pa.Table, on: tuple[str, ...]) -> list[str]:
    """Each row's key: its id, or (a backfill's pairs) its values of `on` joined by a unit separator."""
    columns = [batch[name].cast(pa.string()).to_pylist() for name in on]
    return columns[0] if len(on) == 1 else ["\x1f".join(map(str, values)) for values in zip(*columns)]


def block_digests(batch: pa.Table, on: tuple[str, ...] = ("id",)) -> dict[str, np.ndarray]:
    found = digests(keys_of(batch, on))
    return {"hi": found["hi"], "lo": found["lo"]}


def digest_set(rows, on: tuple[str, ...] = ("id",)):
    """A dataset -> the ObjectRef of its keys' (`on`'s) sorted digests (computed on the cluster)."""
    import ray

    parts = (
        rows.select_columns(list(on))
        .map_batches(block_digests, fn_kwargs=dict(on=on), batch_format="pyarrow")
        .to_numpy_refs()
    )
    return ray.remote(num_cpus=1)(sorted_digests).remote(*parts)  # the task holds them all, not the driver


def sorted_digests(*parts: dict[str, np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if "hi" in p]  # an empty block may skip the map and keep its own columns
    found = np.empty(sum(len(p["hi"]) for p in parts), dtype=DIGEST)
    for name in ("hi", "lo"):
        found[name] = np.concatenate([p[name] for p in parts]) if parts else []
    return in_order(found)


def in_order(found: np.ndarray) -> np.ndarray:
    # lexsort on the two fields: twice as fast as sorting the structured array by its fields
    return found[np.lexsort((found["lo"], found["hi"]))]


def union(*sets):
    """ObjectRefs of digest sets -> the ObjectRef of one set of them all (repeats kept: it counts rows)."""
    import ray

    return ray.remote(num_cpus=1)(merged).remote(*sets)


def merged(*sets: np.ndarray) -> np.ndarray:
    return in_order(np.concatenate(sets))


def lookup(wanted: np.ndarray, listed: np.ndarray) -> np.ndarray:
    """(N,) int: where each digest of `wanted` is in the sorted array `listed` (its first place), -1 where absent."""
    index = np.full(len(wanted), -1, dtype=np.int64)
    if not len(listed) or not len(wanted):
        return index
    left = np.searchsorted(listed["hi"], wanted["hi"], side="left")
    right = np.searchsorted(listed["hi"], wanted["hi"], side="right")
    hit = (right - left == 1) & (listed["lo"][np.minimum(left, len(listed) - 1)] == wanted["lo"])
    index[hit] = left[hit]
    for i in np.flatnonzero(right - left > 1):  # repeated ids, or ids sharing their first 64 bits
        match = np.flatnonzero(listed["lo"][left[i] : right[i]] == wanted["lo"][i])
        if match.size:
            index[i] = left[i] + match[0]
    return index


def drop_listed(batch: pa.Table, listed, on: tuple[str, ...] = ("id",)) -> pa.Table:
    """Rows less those whose key is in `listed` (the ObjectRef of a `digest_set` on the same `on`)."""
    import ray

    if not batch.num_rows:
        return batch
    keep = lookup(digests(keys_of(batch, on)), ray.get(listed)) < 0
    return batch if keep.all() else batch.filter(pa.array(keep))


def shared_ids(found) -> tuple[object, int]:
    """The ObjectRef of a digest set -> (the ObjectRef of the digests in it more than once, how many those are)."""
    import ray

    listed, count = ray.remote(num_returns=2)(more_than_once).remote(found)
    return listed, ray.get(count)


def more_than_once(found: np.ndarray) -> tuple[np.ndarray, int]:
    ids, times = distinct(found)
    return ids[times > 1], int((times > 1).sum())


def qualified(batch: pa.Table, listed: np.ndarray, label: str) -> pa.Table:
    """The batch with `<label>/` before each id in `listed` (ids more than one manifest file holds: their file's
    label makes each row's id its own)."""
    if not len(listed) or not batch.num_rows:
        return batch
    ids = batch["id"].cast(pa.string()).to_pylist()
    hit = lookup(digests(ids), listed) >= 0
    if not hit.any():
        return batch
    named = pa.array([f"{label}/{i}" if h else i for i, h in zip(ids, hit)], pa.string())
    return batch.set_column(batch.column_names.index("id"), "id", named)


def distinct(found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sorted digest array -> (its distinct digests, how many times each is there)."""
    if not len(found):
        return found, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], found[1:] != found[:-1]]))
    return found[starts], np.diff(np.append(starts, len(found)))


def compare(manifest: np.ndarray, output: np.ndarray) -> tuple[dict[str, int], np.ndarray]:
    """Sorted digests of the manifest's ids and the output's -> (counts, the digests of output ids the manifest
    does not list). Counts: n_in (manifest rows), n_out (output rows of listed ids), missing (manifest rows without
    an output row), duplicated (output rows beyond one per manifest row), unlisted (output rows of unlisted ids)."""
    ids_in, times_in = distinct(manifest)
    ids_out, times_out = distinct(output)
    # How many rows each distinct id has on the other side (the appended 0 is what index -1, absent, picks).
    in_for_out = np.append(times_in, 0)[lookup(ids_out, ids_in)]
    out_for_in = np.append(times_out, 0)[lookup(ids_in, ids_out)]
    listed = in_for_out > 0
    counts = {
        "n_in": int(times_in.sum()),
        "n_out": int(times_out[listed].sum()),
        "missing": int(np.maximum(times_in - out_for_in, 0).sum()),
        "duplicated": int(np.maximum(times_out - in_for_out, 0)[listed].sum()),
        "unlisted": int(times_out[~listed].sum()),
    }
    return counts, ids_out[~listed]


class SharedIds:
    """Ids more than one manifest file holds (the ObjectRef of their digests; each file numbers the ids repeated
    within it itself) and each file's label: a read task puts the label before such an id, so that every row keeps an
    id of its own, the same in every run."""

    def __init__(self, listed, labels: dict[str, str]):
        self.listed, self.labels = listed, labels

    def named(self, blocks: Iterable[pa.Table], path: str) -> Iterator[pa.Table]:
        import ray

        listed = ray.get(self.listed)
        for block in blocks:
            yield qualified(block, listed, self.labels[path])
