"""A result's identity: the complete setting that decides its numbers, and a short hash of it.

A setting is a JSON-able dict with the model (its name and a fingerprint of its files), the data,
the method with every hyper-parameter, the cache and generation settings, and the seed. Result
folders end in :func:`digest` of it, so two settings never share a folder, and ``run.json``
records it whole, so a folder can be checked against the command that resumes it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

#: Files whose bytes decide a model's outputs (weights, config, tokenizer).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TEXT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model")
#: Bytes hashed at each end of a weights file: enough to tell checkpoints apart, fast for 100 GB.
EDGE_BYTES = 1 << 20


def normalise(setting: dict) -> dict:
    """The setting as it reads back from ``run.json`` (tuples become lists, keys strings)."""
    return json.loads(json.dumps(setting, sort_keys=True, default=str))


def digest(setting: dict, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(normalise(setting), sort_keys=True).encode()).hexdigest()[:length]


def differences(old: dict, new: dict, prefix: str = "") -> List[str]:
    """``"method.kernel_size: 5 -> 7"`` for every leaf that differs between two settings."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def _hash_file(path: Path, whole: bool) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if whole or size <= 2 * EDGE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    return f"{size}:{h.hexdigest()[:16]}"


def folder_fingerprint(folder: Path) -> Dict[str, str]:
    """Per file of a model folder: its size and a hash (whole for config and tokenizer files, the first
    and last MiB for weights)."""
    out = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and (path.name in TEXT_FILES or path.suffix in WEIGHT_SUFFIXES):
            out[path.name] = _hash_file(path, whole=path.suffix not in WEIGHT_SUFFIXES)
    return out


def model_folder(name_or_path: str) -> Optional[Path]:
    """Where the files of a model are: the local folder, the embedded model's converted folder, or the
    hub snapshot in the local cache (``None`` when it cannot be found without the network)."""
    from .models import resolve_model_path

    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not cached, no huggingface_hub, a name that is no repository: no files to hash
        return None


def model_identity(name_or_path: str, model=None) -> dict:
    """``{"name", "fingerprint"}`` of a model. Without its files (a hub name not in the local cache),
    the fingerprint is the hash of the loaded model's config."""
    folder = model_folder(name_or_path)
    if folder is not None:
        return {"name": name_or_path, "fingerprint": digest(folder_fingerprint(folder), 16)}
    config = getattr(model, "config", None)
    text = config.to_json_string() if config is not None else name_or_path
    return {"name": name_or_path, "fingerprint": "config:" + hashlib.sha256(text.encode()).hexdigest()[:16]}
