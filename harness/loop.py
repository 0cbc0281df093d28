"""The one prediction loop of the prompt benchmarks (``longbench/``, ``ruler/``, ``niah/``).

A benchmark declares what is its own: for every method, the result folder (:class:`~harness.runner.Run` and
what ``run.json`` adds) and its :class:`Part` s, each one records file: the rows with a stable id, the prompt
and answer budget of a row, the cache budget of a prompt, the record of an answer. :func:`run_benchmark`
does the rest once for all of them: longest-first batching (:func:`harness.generation.answer_all`),
resume from the records already written, sharding over ``torchrun`` ranks and the merge, the progress bar,
appending each record as it comes, ``run.json`` and the closing lines.

Example
-------
>>> part = Part("hotpotqa", rows, JsonlStore("_id"), prompt=lambda row: (ids_of(row), 32),
...             record=lambda row, answer: {"_id": row["_id"], "pred": answer.text}, budget=lambda n: spec)
>>> run_benchmark(args, Benchmark(open_run, parts=lambda method: [part], scorer="eval.py"), model, tokenizer)
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable, List, Optional, Sequence

from . import records
from .generation import answer_all, read_record
from .records import CsvResults, JsonlResults, merge_shards, read_csv, read_jsonl, shard, shard_path, write_csv
from .runner import progress


class JsonlStore:
    """A part's records as JSONL lines keyed by the field ``key`` (:class:`~harness.records.JsonlResults`).

    A records store answers ``open(path)`` (an append-only file with ``done``, ``append`` and ``close``),
    ``id(row)`` (a row's or a record's id), ``ids(path)`` (the ids already in a file, read only) and
    ``merge(path, world, order)`` (the ``world`` shards into ``path``, in ``order`` of ids).
    """

    def __init__(self, key: str):
        self.key = key

    def open(self, path: Path) -> JsonlResults:
        return JsonlResults(path, key=self.key)

    def id(self, row: dict) -> Hashable:
        return row[self.key]

    def ids(self, path: Path) -> set:
        return {row.get(self.key) for row in read_jsonl(path)}

    def merge(self, path: Path, world: int, order: List) -> None:
        merge_shards(path, world, key=self.key, order=order)


class CsvStore:
    """A part's records as rows of a CSV file (:class:`~harness.records.CsvResults`): ``opener(path)`` opens one,
    ``key(row)`` is the id of a row and of its record (both hold the fields it reads)."""

    def __init__(self, opener: Callable[[Path], CsvResults], key: Callable[[dict], Hashable]):
        self.opener, self.id = opener, key

    def open(self, path: Path) -> CsvResults:
        return self.opener(path)

    def ids(self, path: Path) -> set:
        return {self.id(row) for row in read_csv(path)}

    def merge(self, path: Path, world: int, order: List) -> None:
        shards = [part for part in (shard_path(path, r, world) for r in range(world)) if part != path]
        with self.opener(path) as out:  # the rows merged before; a row cut short by a kill is dropped
            rows, columns = {self.id(row): row for row in out.rows}, out.columns
        for part in (p for p in shards if p.exists()):
            with self.opener(part) as f:
                for row in f.rows:
                    rows.setdefault(self.id(row), row)
        position = {k: i for i, k in enumerate(order)}
        write_csv(path, columns, sorted(rows.values(), key=lambda r: position.get(self.id(r), len(position))))
        for part in (p for p in shards if p.exists()):
            part.unlink()


@dataclass
class Part:
    """One records file of a run and how each of its rows is asked and recorded.

    Parameters
    ----------
    name : shown on the progress bar after the method (a dataset, a task, a NIAH mode).
    rows : the rows, in the order of the finished file; each has a stable id (``store.id(row)``).
    store : how the records are written, read back and merged (:class:`JsonlStore`).
    prompt : ``prompt(row) -> (input_ids [1, T], max_new_tokens)``; called as each batch is due.
    record : ``record(row, answer) -> dict``, the line written for an :class:`~harness.generation.Answer`.
    budget : ``budget(prompt_tokens) -> BudgetSpec``, the cache of one row.
    file : the records file's name in the run folder (default ``{name}.jsonl``).
    stop, min_new_tokens : the stop token ids, and how many tokens come before any stop token may.
    longest_first : batch the rows longest prompt first (all prompts are built at once), then rewrite the
        finished file in row order; ``False``: rows in their order, prompts built as they are due.
    skipped : the bad data rows left out under ``--skip_bad_rows`` (``None``: the flag is off).
    """

    name: str
    rows: Sequence[dict]
    store: object
    prompt: Callable
    record: Callable
    budget: Callable
    file: Optional[str] = None
    stop: Sequence[int] = ()
    min_new_tokens: int = 0
    longest_first: bool = True
    skipped: Optional[List[str]] = None


@dataclass
class Benchmark:
    """What a benchmark declares for :func:`run_benchmark`.

    Parameters
    ----------
    open_run : ``open_run(method) -> (Run, info)``: the method's result folder and what ``run.json`` records.
    parts : ``parts(method) -> iterable of Part``, taken one at a time (data is read as a part is due).
    scorer : the scoring command named in the closing line (``longbench/eval.py --path``); with it the run
        records its ``skipped_rows`` per part and notes them.
    finish : ``finish(method, folder, reads) -> dict``, results added to the finished ``run.json`` (rank 0;
        ``reads`` are this invocation's ``read_fraction`` s under ``--read``).
    report : ``report(method, folder)``, after ``run.json`` is complete (rank 0): plots, summaries.
    """

    open_run: Callable
    parts: Callable[[str], Iterable[Part]]
    scorer: Optional[str] = None
    finish: Optional[Callable] = None
    report: Optional[Callable] = None


def answer_cost(answer) -> dict:
    """The cost fields that end a JSONL record: seconds (and the prefill's part of them), peak and final KV bytes,
    rows in the batch, and under ``--read`` the share of the cache read (:func:`~harness.generation.read_record`)."""
    return {"seconds": round(answer.seconds, 3), "prefill_seconds": round(getattr(answer, "prefill_seconds", 0.0), 3),
            "peak_kv_bytes": answer.peak_kv_bytes,
            "final_kv_bytes": answer.final_kv_bytes, "batch_rows": answer.batch_rows, **read_record(answer)}


def run_benchmark(args, benchmark: Benchmark, model, tokenizer, answer: Callable = answer_all) -> None:
    """Every method of ``args.methods`` through every part of ``benchmark``.

    ``answer`` is :func:`~harness.generation.answer_all` or a stand-in with its signature (tests).
    ``args`` gives ``methods``, ``rank``, ``world``, ``batch_size`` and ``prefill_chunk_size``.
    """
    for method in args.methods:
        run, info = benchmark.open_run(method)
        run.start(**info)
        reads, skipped = [], {}
        for part in benchmark.parts(method):
            reads += run_part(args, part, method, run.folder, model, tokenizer, answer)
            if part.skipped:
                skipped[part.name] = part.skipped
        close_run(args, benchmark, method, run, info, reads, skipped)


def run_part(args, part: Part, method: str, folder: Path, model, tokenizer, answer: Callable) -> List[float]:
    """Answer and record this rank's rows of ``part`` not yet recorded; the ``read_fraction`` s of its answers."""
    final, reads = folder / (part.file or f"{part.name}.jsonl"), []
    with sharded(part.store, final, part.rows, args.rank, args.world) as (todo, out):
        requests = (part.prompt(row) for row in todo)
        answers = answer(model, tokenizer, requests, part.budget, args.batch_size, part.stop,
                         min_new_tokens=part.min_new_tokens, prefill_chunk_size=args.prefill_chunk_size,
                         longest_first=part.longest_first)
        for i, res in progress(answers, f"{method} {part.name}", args.rank, total=len(todo)):
            out.append(part.record(todo[i], res))
            reads.extend(read_record(res).values())
    if part.longest_first and args.world == 1:  # batches wrote their records longest prompt first
        part.store.merge(final, 1, [part.store.id(row) for row in part.rows])
    return reads


@contextmanager
def sharded(store, final: Path, rows: Sequence[dict], rank: int, world: int):
    """``(todo, out)``: this rank's rows not yet recorded in its shard (nor, with several ranks, in an earlier
    merge into ``final``), and the shard's open records file. When every rank is done, rank 0 merges the
    shards into ``final`` in row order; an exception leaves the shards for the rerun to resume."""
    with store.open(shard_path(final, rank, world)) as out:
        finished = set(out.done) | (store.ids(final) if world > 1 else set())
        yield [row for row in shard(rows, rank, world) if store.id(row) not in finished], out
    if world > 1 and records.barrier() and rank == 0:  # looked up here: tests stand in for the barrier
        store.merge(final, world, [store.id(row) for row in rows])


def close_run(args, benchmark: Benchmark, method: str, run, info: dict, reads: List[float],
              skipped: dict) -> None:
    """Mark the run complete with its results, then the benchmark's report and the closing lines (rank 0)."""
    results = benchmark.finish(method, run.folder, reads) if benchmark.finish and args.rank == 0 else {}
    if benchmark.scorer is not None:
        results = {**results, "skipped_rows": {name: len(rows) for name, rows in skipped.items()}}
    run.finish(**info, **results)
    if args.rank > 0:
        return
    if benchmark.report is not None:
        benchmark.report(method, run.folder)
    if benchmark.scorer is None:
        return
    if skipped:
        listed = "; ".join(f"{name}: {', '.join(rows[:5])}" + (" ..." if len(rows) > 5 else "")
                           for name, rows in skipped.items())
        print(f"note: --skip_bad_rows left out {sum(map(len, skipped.values()))} bad rows ({listed})",
              file=sys.stderr)
    print(f"[{method}] predictions in {run.folder}; score them with: python {benchmark.scorer} {run.folder}")


__all__ = ["Benchmark", "CsvStore", "JsonlStore", "Part", "answer_cost", "run_benchmark", "run_part", "sharded"]
