"""Collect every result folder the table scripts wrote into one results page, beside the paper's numbers.

    python scripts/make_tables.py --root outputs/smoke outputs/central --out RESULTS.md

For each root it looks for the folders the scripts write (``table1/``, ``table2/``, ``pg19/``,
``central/``, ``table3/``, ``table4/``, ``ablation_overlap/``, ``niah/``, ``table5/``) and writes one
markdown table per paper table: our value, the paper's value and the difference where the paper
reports the same model and setting, with the model, budget, ladder settings, library versions and
run dates. Plots are copied to ``--assets`` (committed with the page) and linked.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser  # noqa: E402
from harness.runner import check_output_file, check_output_folder, run_main  # noqa: E402
from lacache_core.errors import ConfigError  # noqa: E402

from harness import paper  # noqa: E402
from harness.plots import running_ppl_plot  # noqa: E402
from longbench.eval import PAPER_MODELS  # noqa: E402  (LongBench model name -> the paper's)

TRAINED_CONTEXT = 8192  # SmolLM2's; only runs longer than this get the "past the trained context" table

PPL_MODELS = {"Llama-2-7b-hf": "Llama2-7B", "Llama-2-7b-chat-hf": "Llama2-7B-Chat", "Llama-2-13b-hf": "Llama2-13B",
              "Meta-Llama-3-8B": "Llama3-8B"}
METHOD_LABELS = {"full": "full", "streamingllm": "StreamingLLM", "lacache": "LaCache"}


# ------------------------------------------------------------------------------------------ helpers
def fmt(x, digits=2) -> str:
    return "" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def cell(ours: Optional[float], ref: Optional[float], digits=2) -> str:
    """``ours / paper (diff)``, or just ``ours`` when the paper has no such number."""
    if ours is None:
        return "-"
    if ref is None or not isinstance(ref, float):
        return fmt(ours, digits)
    return f"{fmt(ours, digits)} / {fmt(ref, digits)} ({ours - ref:+.{digits}f})"


def provenance(records: List[dict]) -> str:
    """One line: the library versions and the date range of the runs."""
    versions = {}
    for r in records:
        for k in ("transformers", "torch"):
            if k in r.get("versions", {}):
                versions.setdefault(k, set()).add(r["versions"][k])
    dates = sorted(r["date"][:10] for r in records if r.get("date"))
    v = ", ".join(f"{k} {'/'.join(sorted(s))}" for k, s in versions.items())
    when = f"{dates[0]}" + (f" to {dates[-1]}" if dates and dates[-1] != dates[0] else "") if dates else "?"
    return f"_Libraries: {v or '?'}; runs dated {when}._"


class Assets:
    """Copies plots next to the results page so the links survive ``outputs/`` being ignored by git."""

    def __init__(self, folder: Path, page: Path):
        self.folder, self.page = folder, page

    def link(self, png: Path, name: str) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / name
        shutil.copyfile(png, target)
        rel = Path(target).resolve().relative_to(self.page.resolve().parent)
        return f"![{name}]({rel.as_posix()})"


# ------------------------------------------------------------------------------------------ perplexity
def ppl_runs(folder: Path) -> List[dict]:
    runs = []
    for path in sorted(folder.rglob("run.json")):
        run = json.loads(path.read_text())
        if run.get("complete") and "ppl" in (run.get("results") or {}):  # a perplexity run, finished
            run["folder"] = path.parent
            runs.append(run)
    return runs


def ppl_section(title: str, folder: Path, table: Optional[str], assets: Assets, tag: str) -> List[str]:
    runs = ppl_runs(folder)
    if not runs:
        return []
    ref = paper.perplexity(table) if table else {}
    lengths = sorted({k for r in runs for k in r["results"]["checkpoints"]}, key=lambda k: int(k[:-1]))
    lines = [f"### {title}", "",
             "Cells: ours / paper (difference) where the paper reports the same model and cache; "
             "lengths are scored tokens (1K = 1024).", "",
             "| model | data | method | cache | ladder | " + "".join(f"{k} | " for k in lengths)
             + "all tokens | tok/s | peak KV MiB |",
             "|" + "---|" * (8 + len(lengths))]
    order = {"full": 0, "streamingllm": 1, "lacache": 2}
    runs.sort(key=lambda r: (r["args"]["model_name_or_path"], -(r["args"]["cache_size"] if r["args"]["method"] != "full"
                                                               else 10 ** 9), order.get(r["args"]["method"], 9)))
    for r in runs:
        a, res = r["args"], r["results"]
        model = Path(a["model_name_or_path"]).name
        method = a["method"]
        cache = "all" if method == "full" else a["cache_size"]
        label = f"{PPL_MODELS.get(model, model)} " + (
            "full" if method == "full" else f"{METHOD_LABELS.get(method, method)} ({cache})")
        if table == "Table 2":
            label = "full" if method == "full" else METHOD_LABELS.get(method, method)
        paper_row = ref.get(label, {}) if model in PPL_MODELS else {}
        pol = r.get("policy") or a  # the resolved hyper-parameters (args hold None for "the method's default")
        ladder = f"S{pol.get('span')} O{pol.get('overlap')}" if method == "lacache" else ""
        cells = [cell(res["checkpoints"].get(k), paper_row.get(k)) for k in lengths]
        lines.append(f"| {model} | {Path(a['dataset_name']).name} | {method} | {cache} | {ladder} | "
                     + "".join(f"{c} | " for c in cells) + f"{res['ppl']:.2f} ({res['tokens_scored']}) | "
                     f"{res['tokens_per_s']:.1f} | {res['peak_kv_bytes'] / 2 ** 20:.1f} |")
    lines += ["", provenance(runs), ""]
    long_runs = [r for r in runs if r["results"]["tokens_scored"] > TRAINED_CONTEXT]
    if long_runs:  # the claim past the trained context: perplexity of the tokens beyond it, and one plot
        curves = {}
        lines += [f"Perplexity of the tokens past position {TRAINED_CONTEXT} (the embedded model's trained "
                  "context):", "", "| method | cache | ppl, tokens 1..8192 | ppl, tokens 8193.. |", "|---|---|---|---|"]
        for r in long_runs:
            nlls = [float(x) for x in (r["folder"] / "nlls.txt").read_text().split()]
            cache = "all" if r["args"]["method"] == "full" else r["args"]["cache_size"]
            curves[f"{r['args']['method']} ({cache})"] = nlls
            lines.append(f"| {r['args']['method']} | {cache} | {running_ppl(nlls[:TRAINED_CONTEXT]):.2f} | "
                         f"{running_ppl(nlls[TRAINED_CONTEXT:]):.2f} |")
        png = running_ppl_plot(curves, Path(assets.folder) / f"{tag}_long.png", f"{folder}", window=512,
                               marker=TRAINED_CONTEXT)
        if png is not None:
            rel = png.resolve().relative_to(assets.page.resolve().parent)
            lines += ["", f"![{tag}_long.png]({rel.as_posix()})"]
        lines.append("")
    plots = sorted(folder.rglob("comparison.png"))
    for png in plots:
        lines.append(assets.link(png, f"{tag}_{png.parent.name}_comparison.png"))
    return lines + [""]


def running_ppl(nlls: List[float]) -> float:
    return math.exp(sum(nlls) / len(nlls)) if nlls else float("nan")


# ------------------------------------------------------------------------------------------ LongBench
def longbench_section(title: str, folder: Path) -> List[str]:
    runs = []
    for result in sorted((folder / "pred").glob("*/result.json")):
        run = json.loads((result.parent / "run.json").read_text()) if (result.parent / "run.json").exists() else {}
        runs.append((result.parent.name, run, json.loads(result.read_text())))
    if not runs:
        return []
    datasets = [d for d in runs[0][2] if d != "average"]
    for _, _, scores in runs[1:]:
        datasets += [d for d in scores if d != "average" and d not in datasets]
    header = []
    refs = []
    for name, run, _ in runs:
        method, budget = run.get("method", "?"), run.get("budget")
        column = "full" if method == "full" else f"{method}_{budget}"
        model = PAPER_MODELS.get(run.get("model", ""))
        refs.append(paper.longbench(model).get(column, {}) if model else {})
        ladder = f" S{run.get('span')} O{run.get('overlap')}" if method == "lacache" else ""
        header.append(f"{run.get('model', name)} {method}" + ("" if method == "full" else f" {budget}") + ladder)
    lines = [f"### {title}", "", "Cells: ours / paper (difference) where the paper reports the same model, method "
             "and budget.", "", "| dataset | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    for d in datasets + ["average"]:
        row = []
        for (_, _, scores), ref in zip(runs, refs):
            ref_value = ref.get(d)
            if d == "average" and len(datasets) < 21 and ref:  # the paper's average is over all 21 datasets
                vals = [ref.get(x) for x in datasets]
                ref_value = sum(vals) / len(vals) if all(isinstance(v, float) for v in vals) else None
            row.append(cell(scores.get(d), ref_value))
        lines.append(f"| {d} | " + " | ".join(row) + " |")
    lines += ["", "(average: over the datasets shown; the paper column averages the paper's numbers for the same "
              "datasets)", "", provenance([r for _, r, _ in runs]), ""]
    return lines


# ------------------------------------------------------------------------------------------ NIAH
def niah_section(folder: Path, assets: Assets, tag: str) -> List[str]:
    runs = []
    for results in sorted(folder.glob("*/results.csv")):
        with open(results, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        run = json.loads((results.parent / "run.json").read_text()) if (results.parent / "run.json").exists() else {}
        runs.append((results.parent, run, rows))
    if not runs:
        return []
    needle = paper.table("Needle")
    lines = ["### Needle / passkey retrieval (Figs. 8-9)", "",
             "| run | lengths | cells x tests | average score | paper (same model and budget) |", "|---|---|---|---|---|"]
    for folder_, run, rows in runs:
        args = run.get("args", run)
        avg = sum(float(r["score"]) for r in rows) / len(rows)
        lengths = sorted({int(r["context_length"]) for r in rows})
        ref = ""
        model = str(args.get("model_name") or args.get("model_name_or_path") or "")
        method = args.get("method", "")
        for row in needle[1:]:
            same_model = ("Llama-3.2-3B" in model and row[0].startswith("Llama3.2-3B")) or (
                "longchat" in model.lower() and row[0].startswith("LongChat"))
            col = {"streamingllm": 2, "lacache": 3}.get(str(method).split(",")[0])
            if same_model and col and f"{int(float(args.get('budget', 0)) * 100)}%" == row[1]:
                ref = fmt(row[col])
        lines.append(f"| {folder_.name} | {', '.join(map(str, lengths))} | {len(rows)} | {avg:.2f} | {ref} |")
    lines += ["", provenance([r for _, r, _ in runs]), ""]
    for folder_, _, _ in runs:
        if (folder_ / "heatmap.png").exists():
            lines.append(assets.link(folder_ / "heatmap.png", f"{tag}_{folder_.name}_heatmap.png"))
    return lines + [""]


# ------------------------------------------------------------------------------------------ RULER
def ruler_section(folder: Path) -> List[str]:
    runs = []
    for summary in sorted(folder.glob("pred/*/summary.csv")):
        with open(summary, newline="") as f:
            scores = {r["task"]: float(r["score"]) for r in csv.DictReader(f)}
        run = json.loads((summary.parent / "run.json").read_text()) if (summary.parent / "run.json").exists() else {}
        runs.append((summary.parent.name, run, scores))
    if not runs:
        return []
    ref_all = paper.ruler()
    tasks = [t for t in next(iter(ref_all.values())) if t != "avg"]
    present = [t for t in tasks if any(t in s for _, _, s in runs)]
    header = [f"{run.get('method', name)}" + (f" {run.get('budget')}" if run.get("budget") else "")
              + (f" @ {run['max_length']} tokens" if run.get("max_length") else "") for name, run, _ in runs]
    lines = ["### Table 5: RULER", "", "Cells: ours / paper (difference); the paper's numbers are LongChat-7b-v1.5-32k "
             "at 16K with a 50% budget, so the difference means something only for that setting.", "",
             "| task | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    for t in present + ["average"]:
        row = []
        for name, run, scores in runs:
            ref = ref_all.get(run.get("method", ""), {})
            same = "longchat" in str(run.get("model", "")).lower() and run.get("budget") == 0.5
            if t == "average":
                vals = [scores[x] for x in present if x in scores]
                ours = sum(vals) / len(vals) if vals else None
                ref_vals = [ref[x] for x in present if x in ref]
                ref_v = sum(ref_vals) / len(ref_vals) if ref_vals and same else None
            else:
                ours, ref_v = scores.get(t), ref.get(t) if same else None
            row.append(cell(ours, ref_v))
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    lines += ["", provenance([r for _, r, _ in runs]), ""]
    return lines


# ------------------------------------------------------------------------------------------ page
SECTIONS = [
    ("table1", lambda f, a, t: ppl_section("Table 1: WikiText-2 perplexity", f, "Table 1", a, t)),
    ("table2", lambda f, a, t: ppl_section("Table 2: cache of 80 tokens", f, "Table 2", a, t)),
    ("pg19", lambda f, a, t: ppl_section("PG-19 (Figs. 5-6, no numbers in the paper)", f, None, a, t)),
    ("central", lambda f, a, t: ppl_section("Beyond the trained context: full vs StreamingLLM vs LaCache", f, None, a, t)),
    ("table3", lambda f, a, t: longbench_section("Table 3: LongBench", f)),
    ("table4", lambda f, a, t: longbench_section("Table 4: LongBench, SmolLM2", f)),
    ("ablation_overlap", lambda f, a, t: longbench_section("Table 6: overlap ablation", f)),
    ("niah", lambda f, a, t: niah_section(f, a, t)),
    ("table5", lambda f, a, t: ruler_section(f)),
]


def build(roots: List[Path], out: Path, assets_dir: Path) -> str:
    assets = Assets(assets_dir, out)
    lines = ["# Results", "", "Generated by `scripts/make_tables.py` from the result folders below; every number "
             "comes from a run record in that folder. Runs on the embedded SmolLM2-135M (`--smoke`) check the "
             "pipeline end to end and show the methods' ordering in miniature; they are not the paper's models, "
             "so their paper columns stay empty.", ""]
    found = 0
    for root in roots:
        for name, section in SECTIONS:
            folder = root / name
            if not folder.is_dir():
                continue
            body = section(folder, assets, f"{root.name}_{name}")
            if body:
                found += 1
                lines += [f"## {name} ({folder})", ""] + body
    if not found:
        raise ConfigError(f"--root {' '.join(map(str, roots))}: no result folders ({', '.join(n for n, _ in SECTIONS)})")
    return "\n".join(lines) + "\n"


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", nargs="+", type=Path, default=[Path("outputs")], help="result roots the scripts wrote")
    p.add_argument("--out", type=Path, default=Path("RESULTS.md"))
    p.add_argument("--assets", type=Path, default=Path("docs/results"), help="where plots are copied for the page")
    args = p.parse_args(argv)
    check_output_file(args.out, "--out")
    check_output_folder(args.assets, "--assets")
    args.out.write_text(build(args.root, args.out, args.assets))
    print(f"wrote {args.out} (plots in {args.assets})")
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
