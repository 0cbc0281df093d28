"""Score RULER predictions: ``summary.csv`` / ``summary.md`` per run, ``comparison.md`` across runs.

A run folder holds ``{task}.jsonl`` prediction files (lines ``{"index", "pred", "outputs", "length"}``,
as ``ruler/pred.py`` writes them) and a ``run.json`` (``model``, ``method``, ``budget``, ``span``,
``overlap``, ``max_length``). Scores follow RULER: ``string_match_part`` for ``qa_1``/``qa_2``,
``string_match_all`` otherwise, in percent. Where ``run.json``'s method is one the LaCache paper
reports (``streamingllm``, ``lacache``), ``summary.md`` shows the paper's Table 5 value beside ours.

Example::

    python ruler/eval.py --pred_dir outputs/ruler/pred/lacache outputs/ruler/pred/streamingllm
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import paper  # noqa: E402
from lacache_core.errors import ConfigError  # noqa: E402
from harness.flags import ArgumentParser  # noqa: E402
from harness.records import read_json_object, read_text  # noqa: E402
from harness.runner import check_output_folder, run_main  # noqa: E402
from ruler.metrics import metric_for  # noqa: E402
from ruler.tasks import TASK_NAMES  # noqa: E402

PAPER_NOTE = ("paper: LaCache Table 5 (LongChat-7b-v1.5-32k, 50% KV budget, 16K context, 100 samples per task); "
              "comparable only in that setting")



def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred_dir", nargs="+", required=True, help="run folder(s) with {task}.jsonl predictions")
    p.add_argument("--output_dir", default=None,
                   help="where comparison.md goes (default: the run folders' common parent); written when several "
                        "runs are given or this flag is set")
    args = p.parse_args(argv)
    for d in args.pred_dir:
        if not Path(d).is_dir():
            raise ConfigError(f"--pred_dir {d}: not a directory")
    if args.output_dir is not None:
        check_output_folder(args.output_dir)
    return args


def read_predictions(path: Path):
    """``(preds, refs)`` of one ``{task}.jsonl``."""
    preds, refs = [], []
    for num, line in enumerate(read_text(path, "--pred_dir: ").split("\n"), 1):  # as open() iterates: "\n" only
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"--pred_dir: {path} line {num} is not JSON") from None
        if not isinstance(row, dict) or "pred" not in row or "outputs" not in row:
            raise ConfigError(f"--pred_dir: {path} line {num} lacks 'pred' or 'outputs'")
        preds.append(row["pred"] or "")
        refs.append(list(row["outputs"]))
    return preds, refs


def score_run(run_dir: Path) -> Dict[str, dict]:
    """``{task: {"score", "n"}}`` for the known tasks that have a non-empty prediction file, in paper order."""
    scores = {}
    for task in TASK_NAMES:
        path = run_dir / f"{task}.jsonl"
        if path.exists():
            preds, refs = read_predictions(path)
            if preds:
                scores[task] = {"score": metric_for(task)(preds, refs), "n": len(preds)}
    return scores


def average(scores: Dict[str, dict]) -> Optional[float]:
    return statistics.mean(s["score"] for s in scores.values()) if scores else None


def read_run_info(run_dir: Path) -> dict:
    return read_json_object(run_dir / "run.json", "--pred_dir: ")


def paper_scores(info: dict) -> Optional[Dict[str, float]]:
    method = str(info.get("method", "")).lower()
    table = paper.ruler()
    return table.get(method)


def run_label(run_dir: Path, info: dict) -> str:
    if not info.get("method"):
        return run_dir.name
    label = str(info["method"])
    if info.get("budget") is not None and info["method"] != "full":
        label += f" b{info['budget']}"
    if info["method"] == "lacache":
        label += f" s{info.get('span')} o{info.get('overlap')}"
    return label


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def write_summary(run_dir: Path, scores: Dict[str, dict], info: dict) -> str:
    avg = average(scores)
    with open(run_dir / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "score", "n"])
        for task, s in scores.items():
            w.writerow([task, f"{s['score']:.2f}", s["n"]])
        w.writerow(["avg", _fmt(avg), sum(s["n"] for s in scores.values())])
    ref = paper_scores(info)
    head = "| task | score | n |" + (f" paper ({info['method']}) |" if ref else "")
    lines = [f"# RULER: {run_dir.name}", ""]
    setting = ", ".join(f"{k} {info[k]}" for k in ("model", "method", "budget", "span", "overlap", "max_length")
                        if info.get(k) is not None)
    if setting:
        lines += [setting, ""]
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for task, s in scores.items():
        lines.append(f"| {task} | {s['score']:.2f} | {s['n']} |" + (f" {_fmt(ref.get(task))} |" if ref else ""))
    lines.append(f"| avg ({len(scores)} tasks) | {_fmt(avg)} | {sum(s['n'] for s in scores.values())} |"
                 + (f" {_fmt(ref.get('avg'))} |" if ref else ""))
    if ref:
        lines += ["", PAPER_NOTE + "; the paper's avg is over all 13 tasks."]
    text = "\n".join(lines) + "\n"
    (run_dir / "summary.md").write_text(text)
    return text


def comparison_table(runs: List[tuple]) -> str:
    """Markdown: rows = tasks + average, columns = runs (then the paper's columns for their methods)."""
    tasks = [t for t in TASK_NAMES if any(t in scores for _, scores, _ in runs)]
    labels = [label for label, _, _ in runs]
    refs = {}
    for _, _, info in runs:
        ref = paper_scores(info)
        if ref is not None:
            refs[f"paper {str(info['method']).lower()}"] = ref
    head = "| task | " + " | ".join(labels + list(refs)) + " |"
    lines = [head, "|" + "---|" * (len(labels) + len(refs) + 1)]
    for task in tasks:
        cells = [_fmt(scores[task]["score"]) if task in scores else "-" for _, scores, _ in runs]
        cells += [_fmt(ref.get(task)) for ref in refs.values()]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    cells = [_fmt(average({t: s for t, s in scores.items() if t in tasks})) for _, scores, _ in runs]
    cells += [_fmt(ref.get("avg")) for ref in refs.values()]
    lines.append("| avg | " + " | ".join(cells) + " |")
    notes = []
    if any(len(scores) != len(tasks) for _, scores, _ in runs):
        notes.append("avg is over the tasks each run has; '-' marks a task a run lacks.")
    if refs:
        notes.append(PAPER_NOTE + "; its avg is over all 13 tasks.")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def main(argv=None) -> int:
    """Score the runs; raises :class:`ConfigError` for bad settings (``__main__`` prints it, exit 2)."""
    args = parse_args(argv)
    runs = []
    for d in args.pred_dir:
        run_dir = Path(d)
        scores = score_run(run_dir)
        if not scores:
            raise ConfigError(f"--pred_dir {d}: no prediction files named after a task ({', '.join(TASK_NAMES)}).jsonl")
        info = read_run_info(run_dir)
        print(write_summary(run_dir, scores, info))
        runs.append((run_label(run_dir, info), scores, info))
    labels = [label for label, _, _ in runs]
    if len(set(labels)) < len(labels):  # same method and budget twice: fall back to folder names
        runs = [(Path(d).name, s, i) for d, (_, s, i) in zip(args.pred_dir, runs)]
    if len(runs) > 1 or args.output_dir:
        out = Path(args.output_dir or os.path.commonpath([str(Path(d).resolve().parent) for d in args.pred_dir]))
        out.mkdir(parents=True, exist_ok=True)
        table = comparison_table(runs)
        (out / "comparison.md").write_text("# RULER comparison\n\n" + table)
        print(table)
        print(f"comparison: {out / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
