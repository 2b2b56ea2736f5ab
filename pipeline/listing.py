"""What a manifest URI names: one file, or the files of a glob or brace pattern, and their kind by extension.

Manifest extensions (.jsonl, .json, .tsv, .csv, .parquet, .arrow) make manifest shards, .tar (.tar.gz, .tgz)
WebDataset shards, anything else a glob of audio files (pipeline/manifest.py refuses a mix).
"""

from __future__ import annotations

import posixpath

from .rows import ManifestError

MANIFEST_SUFFIXES = ("jsonl", "json", "tsv", "csv", "parquet", "arrow")  # arrow: `datasets`' save_to_disk
TAR_SUFFIXES = ("tar", "tgz")  # .tar.gz is "tar" to suffix_of


def is_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[{") or "_OP_" in uri


def suffix_of(path: str) -> str:
    name = posixpath.basename(path).lower().removesuffix(".gz")
    return name.rsplit(".", 1)[-1] if "." in name else ""


def kind_of(path: str) -> str:
    suffix = suffix_of(path)
    return "manifest" if suffix in MANIFEST_SUFFIXES else "webdataset" if suffix in TAR_SUFFIXES else "audio"


def expand(fs, path: str, uri: str) -> list[str]:
    """The files a glob or brace pattern names, sorted; ManifestError when none."""
    import braceexpand

    # NeMo writes `{` and `}` as _OP_ and _CL_ in its shard lists.
    pattern = path.replace("_OP_", "{").replace("_CL_", "}")
    files = sorted(
        {
            f
            for each in braceexpand.braceexpand(pattern)
            for f in (fs.glob(each) if any(c in each for c in "*?[") else [each] if fs.exists(each) else [])
        }
    )
    if not files:
        raise ManifestError(f"{uri}: the pattern matches no files")
    return files
