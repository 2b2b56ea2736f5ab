"""Checkpoint folders: fetching them from any fsspec URL, reading and writing their weights.

A checkpoint is a transformers folder (config.json, model.safetensors or pytorch_model.bin, tokenizer and
preprocessor files). Remote folders (s3://, gs://, hf://, ...) are copied once into a local cache and read from there.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import fsspec
import torch
from safetensors.torch import load_file, save_file
from torch import nn

SAFETENSORS = "model.safetensors"
PICKLE = "pytorch_model.bin"
TIED_HEAD = "lm_head.weight"
EMBED_TOKENS = "model.decoder.embed_tokens.weight"


def cache_root() -> str:
    return os.environ.get("S2T_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "s2t"))


def local_folder(uri: str, storage_options: dict | None = None) -> str:
    """The local folder holding checkpoint `uri`, copying a remote one into the cache first."""
    uri = str(uri)
    if os.path.isdir(uri):
        return uri
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        if os.path.isdir(root):
            return root
        raise FileNotFoundError(f"{uri}: no such checkpoint folder")
    try:
        names = {os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such checkpoint folder") from None
    if "config.json" not in names:
        raise FileNotFoundError(f"{uri}: no config.json, so this is not a Speech2Text checkpoint folder")
    weights = SAFETENSORS if SAFETENSORS in names else PICKLE  # never fetch both
    wanted = sorted(n for n in names if n.endswith((".json", ".model")) or n == weights)
    folder = os.path.join(cache_root(), hashlib.sha256(uri.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    for name in wanted:
        remote, local = f"{root.rstrip('/')}/{name}", os.path.join(folder, name)
        if os.path.exists(local) and os.path.getsize(local) == fs.size(remote):
            continue
        partial = f"{local}.{uuid.uuid4().hex}.partial"  # several actors may fetch the same checkpoint at once
        try:
            fs.get(remote, partial)
        except BaseException:
            if os.path.exists(partial):  # a body cut short: a fetch again starts this file over, leaves no litter
                os.remove(partial)
            raise
        os.replace(partial, local)
    return folder


def content_hash(folder: str) -> str:
    """sha256 over the checkpoint's files (names and bytes): which weights and vocabulary produced an output."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if (
            os.path.isfile(path)
            and not name.endswith(".partial")
            and name.endswith((".json", ".model", ".safetensors", ".bin"))
        ):
            digest.update(name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint folder: model.safetensors when present, else pytorch_model.bin without unpickling
    code."""
    path = os.path.join(folder, SAFETENSORS)
    if os.path.exists(path):
        return load_file(path)
    path = os.path.join(folder, PICKLE)
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no {SAFETENSORS} or {PICKLE}")


def load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load transformers-named weights into `module` (which may live on the meta device), checking every key."""
    tied = module.config.tie_word_embeddings
    # Sinusoidal position tables are recomputed, never loaded (older checkpoints carry stale ones).
    state = {k: v for k, v in state_dict.items() if ".embed_positions." not in k}
    if tied and EMBED_TOKENS in state:
        state[TIED_HEAD] = state[EMBED_TOKENS]
    expected = module.state_dict()
    for key, param in expected.items():
        if key not in state:
            raise KeyError(f"{source}: checkpoint has no weight {key!r} (the model expects shape {tuple(param.shape)})")
        if state[key].shape != param.shape:
            raise ValueError(
                f"{source}: weight {key!r} has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(param.shape)} in the model built from config.json"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise KeyError(f"{source}: checkpoint has weights this model does not know: {unexpected[:5]}")
    module.load_state_dict(state, assign=True)
    if tied:  # assign=True replaced both parameters by separate tensors; make them one again
        module.lm_head.weight = module.model.decoder.embed_tokens.weight


def save_weights(module: nn.Module, folder: str, dtype: torch.dtype | None = None) -> None:
    """model.safetensors, in `dtype` when given (float16 halves a checkpoint that is shipped, for one)."""
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in module.state_dict().items()}
    if module.config.tie_word_embeddings:
        del state[TIED_HEAD]  # safetensors stores a tensor once; transformers re-ties the head on load
    save_file(state, os.path.join(folder, SAFETENSORS), metadata={"format": "pt"})
