"""Append-only JSONL (and CSV) result files that survive interruption, and data-parallel sharding.

Every harness that produces one record per sample writes it with :class:`JsonlResults`: the line
is appended and flushed as soon as it exists, a rerun skips the ids already written, and a line
cut short by a kill is dropped on reopening, so no sample is lost or written twice.

Data parallelism follows ``torchrun``/``accelerate launch``: each process reads ``RANK`` and
``WORLD_SIZE`` from the environment, takes every ``WORLD_SIZE``-th sample into its own shard file,
and the shards are merged into the one result file once all ranks are done.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable, List, Optional, Set, Tuple

from lacache_core.errors import ConfigError


def read_text(path: Path, what: str = "") -> str:
    """The UTF-8 text of ``path``, or a one-line :class:`ConfigError` (prefixed with ``what``, the flag that
    named the file) when it is a folder, unreadable, or binary."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what}{path}: not a UTF-8 text file (non-text bytes)") from None
    except OSError as err:
        raise ConfigError(f"{what}{path}: cannot read it ({err.strerror})") from None


def read_jsonl(path: Path, what: str = "", skipped: Optional[List[str]] = None) -> List[dict]:
    """All records of ``path`` (a missing file reads as empty).

    Only a last line without its newline (a write cut short by a kill) that does not parse is
    dropped; any other line that is not a JSON object is a one-line :class:`ConfigError` naming the
    file and the line (prefixed with ``what``, e.g. the flag that named the file), or, when a
    ``skipped`` list is given (``--skip_bad_rows``), noted there as ``"file:line"`` and left out.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = read_text(path, what).split("\n")  # the last item is "" when the file ends in a newline
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: cut off
                continue
            row = None
        if not isinstance(row, dict):
            if skipped is None:
                hint = " (--skip_bad_rows leaves such rows out)" if what else ""  # data files only, not results
                raise ConfigError(f"{what}{path}:{number}: not a JSON object{hint}")
            skipped.append(f"{path.name}:{number}")
            continue
        rows.append(row)
    return rows


def read_json_object(path: Path, what: str = "", hint: str = "") -> dict:
    """The JSON object in ``path`` (``{}`` when there is no file); anything else is a one-line
    :class:`ConfigError` naming ``what`` (the flag that led to the file) and the file."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        value = json.loads(read_text(path, what))
    except json.JSONDecodeError:
        raise ConfigError(f"{what}{path} is not valid JSON{hint}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}{path} is not a JSON object{hint}")
    return value


def complete_rows(rows: List[dict], fields, where: str, skipped: Optional[List[str]] = None) -> List[dict]:
    """The rows that have every one of ``fields``; a row without one is a one-line :class:`ConfigError`
    (``where`` names the file), or with a ``skipped`` list (``--skip_bad_rows``) noted and left out."""
    good = []
    for i, row in enumerate(rows, 1):
        missing = [f for f in fields if f not in row]
        if not missing:
            good.append(row)
        elif skipped is None:
            raise ConfigError(f"{where}: row {i} has no {', '.join(map(repr, missing))} field "
                              "(--skip_bad_rows leaves such rows out)")
        else:
            skipped.append(f"{where} row {i}")
    return good


class AppendOnlyFile:
    """Base of the results files: opened for appending, every record flushed and fsynced as it is written,
    so a kill loses at most the record being written (which the reader then drops)."""

    def _open(self, path: Path, **kwargs) -> None:
        self._file = open(path, "a", encoding="utf-8", **kwargs)

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class JsonlResults(AppendOnlyFile):
    """One JSONL file of results keyed by ``key`` (e.g. ``"_id"``), opened for appending.

    Example
    -------
    >>> out = JsonlResults(folder / "hotpotqa.jsonl")
    >>> for sample in samples:
    ...     if sample["_id"] in out.done: continue
    ...     out.append({"_id": sample["_id"], "pred": ...})
    """

    def __init__(self, path: Path, key: str = "_id"):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_line()
        self.done: Set = {row.get(key) for row in read_jsonl(self.path)}
        self._open(self.path)

    def _drop_partial_line(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-write: keep only whole lines
            self.path.write_bytes(data[:data.rfind(b"\n") + 1])

    def append(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._sync()
        self.done.add(row.get(self.key))


class CsvResults(AppendOnlyFile):
    """A CSV file of results under the header ``columns``, opened for appending, one flushed row per record (the
    CSV twin of :class:`JsonlResults`).

    On opening, a row cut short by a kill (no final newline, or an unterminated quoted field) is dropped;
    ``rows`` are the records already there (strings, as read back), ``done`` their ids (``key(row)``). A file
    with another header is a one-line :class:`ConfigError` naming ``what`` it should be.
    """

    def __init__(self, path: Path, columns: List[str], key, what: str = "a results file"):
        self.path, self.columns, self.key, self.what = Path(path), list(columns), key, what
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = self._read_complete()
        self.done = {key(r) for r in self.rows}
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._open(self.path, newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if fresh:
            self._writer.writerow(self.columns)
            self._sync()

    def _read_complete(self) -> List[dict]:
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        if not text:
            return []
        rows, damaged = [], False
        try:
            for row in csv.reader(io.StringIO(text, newline=""), strict=True):
                rows.append(row)  # noqa: PERF402 (keep the rows read before a csv.Error)
        except csv.Error:
            damaged = True  # the last record ends inside a quoted field: cut off
        if not text.endswith("\n") and rows and not damaged:
            rows.pop()  # the last record has no newline: cut off
            damaged = True
        if not rows or rows[0] != self.columns:
            raise ConfigError(f"--output_dir: {self.path} is not {self.what} (header {self.columns})")
        records = [dict(zip(self.columns, r)) for r in rows[1:] if len(r) == len(self.columns)]
        if damaged or len(records) != len(rows) - 1:
            write_csv(self.path, self.columns, records)
        return records

    def append(self, row: dict) -> None:
        self._writer.writerow([row[c] for c in self.columns])
        self._sync()
        self.rows.append({c: str(row[c]) for c in self.columns})
        self.done.add(self.key(row))


def read_csv(path: Path) -> List[dict]:
    """The rows of a CSV file with a header, as strings (a missing file reads as empty)."""
    if not Path(path).exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, columns: List[str], rows: List[dict]) -> None:
    """Replace ``path`` with the header ``columns`` and ``rows`` (written beside it, then moved over it)."""
    tmp = Path(path).with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        w.writerows([r[c] for c in columns] for r in rows)
    tmp.replace(path)


def rank_and_world() -> Tuple[int, int]:
    """This process's data-parallel rank and the number of ranks (``torchrun``/``accelerate`` env vars)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(items: Iterable, rank: int, world: int) -> list:
    """Every ``world``-th item starting at ``rank`` (a deterministic split, whatever the item count)."""
    return [item for i, item in enumerate(items) if i % world == rank]


def shard_path(path: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its part of ``path`` (``path`` itself when ``world == 1``)."""
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}")


def merge_shards(path: Path, world: int, key: str = "_id", order: Optional[List] = None) -> int:
    """Merge the ``world`` shard files of ``path`` into ``path`` (ids already there are kept once).

    Returns the number of records in ``path`` afterwards. Shards are removed once merged, so
    calling this twice is harmless.
    """
    path = Path(path)
    rows = {row.get(key): row for row in read_jsonl(path)}
    shards = [shard_path(path, r, world) for r in range(world)]
    for part in shards:
        for row in read_jsonl(part):
            rows.setdefault(row.get(key), row)
    ranked = list(rows.values())
    if order is not None:
        position = {k: i for i, k in enumerate(order)}
        ranked.sort(key=lambda row: position.get(row.get(key), len(position)))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ranked), encoding="utf-8")
    tmp.replace(path)
    for part in shards:
        if part != path and part.exists():
            part.unlink()
    return len(ranked)


def barrier() -> bool:
    """Wait for every rank when ``torch.distributed`` is set up (returns ``False`` when it is not)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return True
    return False


def init_distributed() -> Tuple[int, int]:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on GPU); returns ``(rank, world)``."""
    import torch
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


def local_device(device: str) -> str:
    """``cuda`` becomes this rank's GPU (``LOCAL_RANK``) under data parallelism."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device
