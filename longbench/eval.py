"""Score LongBench predictions, as LongBench's eval.py, with the LaCache paper's numbers beside ours.

A prediction folder holds one ``{dataset}.jsonl`` per dataset (lines with ``pred``, ``answers``,
``all_classes`` and ``length``) and the ``run.json`` that ``longbench/pred.py`` writes. Every
dataset file present is scored; ``result.json`` (dataset -> score, plus ``average``) and
``result.md`` (ours | paper | diff) are written into the folder.

Examples
--------
Official flags: ``--model`` names a run folder ``{output_dir}/pred/RUN_NAME`` (``pred_e`` with
``--e``), as ``longbench/pred.py`` prints it::

    python longbench/eval.py --model RUN_NAME
    python longbench/eval.py --model RUN_NAME --e

Folders directly; with several, one table of all of them goes to ``{output_dir}/comparison.md``::

    python longbench/eval.py --path outputs/longbench/pred/run_a outputs/longbench/pred/run_b
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser  # noqa: E402
from harness.records import read_text  # noqa: E402

from lacache_core.errors import ConfigError  # noqa: E402
from harness.runner import check_output_folder, run_main  # noqa: E402
from longbench.config import DATASETS, METRICS  # noqa: E402
from longbench.metrics import BUCKETS, score, score_e  # noqa: E402

#: run.json ``model`` -> the model name of ``harness.paper.longbench``
PAPER_MODELS = {
    "llama2-7b-chat-4k": "llama2-7b-chat",
    "llama2-13b-chat-4k": "llama2-13b-chat",
    "smollm2-1.7b-instruct": "smollm2-1.7b-instruct",
}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="run name: scores {output_dir}/pred/NAME (official flag; pred_e/NAME with --e)")
    p.add_argument("--e", action="store_true", help="LongBench-E: scores by length bucket 0-4k / 4-8k / 8k+")
    p.add_argument("--output_dir", default="outputs/longbench",
                   help="where pred/ and pred_e/ live, and where comparison.md goes (default outputs/longbench)")
    p.add_argument("--path", nargs="+", default=[], metavar="FOLDER",
                   help="prediction folder(s) to score directly; several also write {output_dir}/comparison.md")
    args = p.parse_args(argv)
    check_output_folder(args.output_dir)
    return args


# ----------------------------------------------------------------------------------- reading
def prediction_folders(args) -> List[tuple]:
    """``(flag, folder)`` for each folder to score, checked to exist (ConfigError naming the flag)."""
    if args.model is None and not args.path:
        raise ConfigError("give --model NAME (a run under --output_dir) or --path FOLDER [FOLDER ...]")
    folders = []
    if args.model is not None:
        folder = Path(args.output_dir) / ("pred_e" if args.e else "pred") / args.model
        if not folder.is_dir():
            raise ConfigError(f"--model {args.model}: no prediction folder {folder} "
                              f"(looked under --output_dir {args.output_dir})")
        folders.append(("--model", folder))
    for path in args.path:
        if not Path(path).is_dir():
            raise ConfigError(f"--path {path}: no such folder")
        folders.append(("--path", Path(path)))
    return folders


def read_run(folder: Path) -> dict:
    """The folder's run.json (empty without one: then there is no paper column)."""
    path = folder / "run.json"
    if not path.exists():
        return {}
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err


def read_predictions(path: Path, need_length: bool) -> dict:
    """Predictions, answers, lengths and the class list of one ``{dataset}.jsonl``.

    As LongBench, ``all_classes`` is taken from the last line (it is the same on every line).
    """
    preds, answers, lengths, all_classes = [], [], [], None
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not a JSON line ({err.msg})") from err
        if not isinstance(row.get("pred"), str) or not isinstance(row.get("answers"), list):
            raise ConfigError(f"{path}:{number}: needs a string 'pred' and a list 'answers'")
        if need_length and not isinstance(row.get("length"), int):
            raise ConfigError(f"{path}:{number}: --e needs an integer 'length'")
        preds.append(row["pred"])
        answers.append(row["answers"])
        lengths.append(row.get("length"))
        all_classes = row.get("all_classes")
    return {"predictions": preds, "answers": answers, "lengths": lengths, "all_classes": all_classes}


# ----------------------------------------------------------------------------------- scoring
def _mean(values: List[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return round(sum(values) / len(values), 2) if values else float("nan")


def score_folder(folder: Path, e: bool, flag: str) -> dict:
    """Score every ``{dataset}.jsonl`` of ``folder``.

    Returns
    -------
    dict
        ``scores`` (dataset -> score, or -> bucket dict with ``e``; LongBench's dataset order, then
        ``average``: the mean over datasets, per bucket with ``e``) and ``skipped`` (file -> why).
    """
    scores, skipped = {}, {}
    files = {p.stem: p for p in sorted(folder.glob("*.jsonl"))}
    for stem, path in files.items():
        if stem not in METRICS:  # e.g. a pred.py shard "hotpotqa.rank0-of-8.jsonl"
            skipped[path.name] = "not a LongBench dataset name"
    for dataset in (d for d in DATASETS if d in files):
        data = read_predictions(files[dataset], need_length=e)
        if not data["predictions"]:
            skipped[files[dataset].name] = "no predictions"
            continue
        if METRICS[dataset] == "classification" and not data["all_classes"]:
            raise ConfigError(f"{files[dataset]}: {dataset} needs the class list 'all_classes'")
        try:
            if e:
                scores[dataset] = score_e(dataset, data["predictions"], data["answers"], data["lengths"],
                                          data["all_classes"])
            else:
                scores[dataset] = score(dataset, data["predictions"], data["answers"], data["all_classes"])
        except (ImportError, ValueError) as err:  # a missing metric package, a malformed answer
            raise ConfigError(f"{files[dataset]}: {err}") from err
    if not scores:
        raise ConfigError(f"{flag} {folder}: no LongBench prediction files ({{dataset}}.jsonl) with predictions")
    if e:
        average = {b: _mean([s[b] for s in scores.values()]) for b in BUCKETS}
    else:
        average = _mean(list(scores.values()))
    return {"scores": {**scores, "average": average}, "skipped": skipped}


def paper_reference(run: dict):
    """``(paper model, column, {dataset: score})`` of the paper entry matching run.json, or None."""
    model = PAPER_MODELS.get(run.get("model"))
    method = run.get("method")
    if model is None or method is None:
        return None
    if method == "full":
        column = "full"
    elif run.get("budget") is None:
        return None
    else:
        column = f"{method}_{float(run['budget']):g}"
    from harness.paper import longbench
    numbers = longbench(model).get(column)
    return (model, column, numbers) if numbers else None


# ----------------------------------------------------------------------------------- writing
def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _jsonable(value):
    """NaN (an empty LongBench-E bucket) as null, so result.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def describe(run: dict) -> str:
    if not run:
        return "no run.json"
    keys = ("model", "method", "budget", "span", "overlap")
    return ", ".join(f"{k} {run[k]}" for k in keys if run.get(k) is not None)


def result_markdown(folder: Path, run: dict, result: dict, e: bool) -> str:
    """``result.md``: our score, the paper's and the difference, one row per dataset scored."""
    scores = result["scores"]
    datasets = [d for d in scores if d != "average"]
    lines = [f"# LongBench{'-E' if e else ''}: {folder.name}", "", describe(run), ""]
    if e:
        lines += ["| dataset | " + " | ".join(BUCKETS) + " |", "|---|" + "---|" * len(BUCKETS)]
        for name in datasets + ["average"]:
            lines.append(f"| {name} | " + " | ".join(_fmt(scores[name][b]) for b in BUCKETS) + " |")
        lines += ["", "The paper reports no LongBench-E numbers."]
    else:
        ref = paper_reference(run)
        paper = ref[2] if ref else {}
        lines += ["| dataset | ours | paper | diff |", "|---|---|---|---|"]
        for name in datasets:
            lines.append(_row(name, scores[name], paper.get(name)))
        # The paper's average covers all 21 datasets; on a subset, average its numbers over the
        # same datasets so that the diff compares like with like.
        same = all(d in paper for d in DATASETS) and set(datasets) == set(DATASETS)
        subset = [paper[d] for d in datasets if d in paper]
        paper_avg = paper.get("average") if same else (_mean(subset) if len(subset) == len(datasets) else None)
        lines.append(_row("average", scores["average"], paper_avg))
        lines.append("")
        if ref:
            lines.append(f"paper: LaCache paper, {ref[0]}, column {ref[1]}"
                         + ("" if same or paper_avg is None else
                            f"; its average here is over the same {len(datasets)} datasets "
                            f"(reported 21-dataset average {_fmt(paper.get('average'))})"))
        else:
            lines.append("paper: no LaCache paper number for this model/method/budget")
    if result["skipped"]:
        lines += ["", "skipped: " + ", ".join(f"{k} ({v})" for k, v in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def _row(name: str, ours: float, paper: Optional[float]) -> str:
    diff = "" if paper is None or math.isnan(ours) else f"{ours - paper:+.2f}"
    return f"| {name} | {_fmt(ours)} | {_fmt(paper)} | {diff} |"


def comparison_markdown(entries: List[dict], e: bool) -> str:
    """One table of several runs: rows datasets, columns runs (then the matching paper columns)."""
    labels = [entry["folder"].name for entry in entries]
    if len(set(labels)) < len(labels):  # same run name under different roots
        labels = [str(entry["folder"]) for entry in entries]
    papers: Dict[str, dict] = {}
    if not e:
        for entry in entries:
            ref = paper_reference(entry["run"])
            if ref:
                papers.setdefault(f"paper {ref[0]} {ref[1]}", ref[2])
    datasets = [d for d in DATASETS if any(d in entry["result"]["scores"] for entry in entries)]
    header = labels + list(papers)
    lines = [f"# LongBench{'-E' if e else ''} comparison", "",
             "| dataset | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]

    def cell(value):
        if value is None:
            return ""
        return " / ".join(_fmt(value[b]) for b in BUCKETS) if isinstance(value, dict) else _fmt(value)

    for name in datasets:
        cells = [cell(entry["result"]["scores"].get(name)) for entry in entries]
        cells += [_fmt(numbers.get(name)) for numbers in papers.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [cell(entry["result"]["scores"]["average"]) for entry in entries]
    cells += [_fmt(_mean([numbers[d] for d in datasets])) if all(d in numbers for d in datasets) else ""
              for numbers in papers.values()]
    lines.append("| average | " + " | ".join(cells) + " |")
    lines.append("")
    if e:
        lines.append("cells: " + " / ".join(BUCKETS))
    lines.append("average: each column's mean over the datasets it has (paper columns: over the rows shown)")
    lines += [f"- {label}: {entry['folder']} ({describe(entry['run'])})" for label, entry in zip(labels, entries)]
    return "\n".join(lines) + "\n"


def _run(argv=None) -> int:
    """Score the folders named by ``--model`` / ``--path``; raise ConfigError for a bad flag."""
    args = parse_args(argv)
    entries = []
    for flag, folder in prediction_folders(args):
        run = read_run(folder)
        result = score_folder(folder, args.e, flag)
        (folder / "result.json").write_text(
            json.dumps(_jsonable(result["scores"]), ensure_ascii=False, indent=4) + "\n", encoding="utf-8")
        table = result_markdown(folder, run, result, args.e)
        (folder / "result.md").write_text(table, encoding="utf-8")
        entries.append({"folder": folder, "run": run, "result": result, "table": table})
    if len(entries) == 1:
        print(entries[0]["table"], end="")
        print(f"results in {entries[0]['folder'] / 'result.json'} and result.md")
        return 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("comparison_e.md" if args.e else "comparison.md")
    table = comparison_markdown(entries, args.e)
    path.write_text(table, encoding="utf-8")
    print(table, end="")
    print(f"results in each folder's result.json / result.md; comparison in {path}")
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
