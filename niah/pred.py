"""Needle in a haystack / passkey retrieval under a KV budget (the LaCache paper's Figs. 8-9 protocol).

For every context length (``interval, 2*interval, ..., max_tokens``), every depth and every test:
a prompt of at most that many tokens with the needle at that depth (see ``niah/haystack.py``), a
fresh cache of ``budget x prompt tokens`` slots (64 start tokens, as the official NIAH script), full
prefill then compaction (or ``--prefill_chunk_size`` chunks), greedy answer, score. ``passkey``
mode (default) is the paper's test: score 100 when the key's digits are in the answer. ``essays``
mode is Kamradt's Paul Graham haystack, scored by the share of the needle's content words found in
the answer (offline stand-in for the original GPT judge; see ``niah/haystack.py``).

Per method, ``{output_dir}/{model}__{mode}__{method}/`` gets ``results.csv``
(``context_length,depth,test,score,pred,prompt_tokens``, one row per test appended as it is
produced; a rerun skips the rows already there), ``run.json``, ``summary.md`` and ``heatmap.png``.

``--protocol clean`` (default) draws each test's key from ``(seed, length, depth, test)``, so any cell
can be recomputed alone, and fits prompts to the lengths in tokens. ``--protocol lacache`` builds the
prompts, keys, answer budgets and ``official.csv`` as the LaCache repository's script does (see
``niah/official.py``); ``scripts/niah.sh`` uses it to reproduce the paper.

Examples
--------
The paper's setting (Llama-3.2-3B-Instruct, 16K..128K, 11 depths, 50 tests per cell)::

    python niah/pred.py --model_name meta-llama/Llama-3.2-3B-Instruct --max_tokens 131072 --interval 16384 \\
        --num_tests 50 --enable_lacache --span 14 --overlap 0 --budget 0.5 --protocol lacache

Offline quick run on the embedded SmolLM2-135M-Instruct::

    python niah/pred.py --method full,streamingllm,lacache --max_tokens 1024 --interval 512 --num_tests 1 \\
        --depths 0,50,100 --budget 0.5 --span 14 --overlap 0
"""
from __future__ import annotations

import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import paper, records  # noqa: E402
from harness.flags import add_method_flags, hyperparameters, method_identity, method_tag, parser  # noqa: E402
from harness.generation import BudgetSpec, answer_all, budget_spec, encode_prompt, stop_token_ids  # noqa: E402
from harness.loop import Benchmark, CsvStore, Part, run_benchmark  # noqa: E402
from harness.runner import (Run, add_batch_flag, add_model_flags, add_official_method_flag, add_output_flags,  # noqa: E402
                            apply_official_method_flag, batch_setting,
                            batch_tag, check_batch_flags, check_budgets, check_run_flags, cli, load)
from lacache_core.errors import ConfigError  # noqa: E402
from niah import official  # noqa: E402
from niah.haystack import MODES, Prompt, build_prompt, depth_label, score  # noqa: E402
from niah.plot import average, cell_means, heatmap, length_label  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"
#: Leading tokens every method keeps in the official NIAH script ("reserved for questions/system instructions").
NIAH_START_SIZE = 64
DEFAULT_DEPTHS = [float(d) for d in range(0, 101, 10)]
MAX_NEW_TOKENS = {"passkey": 16, "essays": 64}
PROTOCOLS = ("clean", "lacache")
COLUMNS = ["context_length", "depth", "test", "score", "pred", "prompt_tokens"]
PAPER_NOTE = ("Paper (LaCache, Figs. 8-9, passkey averages only): other models, 16K..128K contexts and 50 tests per "
              "cell, so comparable in trend only.")



def parse_args(argv=None):
    p, g = parser(__doc__)
    add_model_flags(g["model"], names=("--model_name", "--model_name_or_path", "--model"))
    add_batch_flag(g["model"])
    d = g["data"]
    d.add_argument("--max_tokens", type=int, default=4096, help="largest context length in tokens (official: 4096)")
    d.add_argument("--interval", type=int, default=2948,
                   help="context lengths are interval, 2*interval, ... up to max_tokens (official default 2948)")
    d.add_argument("--num_tests", type=int, default=5, help="tests per (length, depth) cell (official: 5)")
    d.add_argument("--mode", choices=MODES, default="passkey",
                   help="passkey: the paper's test; essays: Paul Graham essays + San Francisco needle")
    d.add_argument("--depths", default=None,
                   help="comma list of needle depths in percent (default: 0,10,...,100, the official 11)")
    d.add_argument("--seed", type=int, default=1234, help="seed of the pass keys / starting essays")
    d.add_argument("--max_new_tokens", type=int, default=None, help="answer tokens (default: 16 passkey, 64 essays)")
    d.add_argument("--no_chat", action="store_true",
                   help="feed the raw prompt (default: wrapped in the tokenizer's chat template when it has one)")
    d.add_argument("--protocol", choices=PROTOCOLS, default="clean",
                   help="passkey construction. clean: prompts fitted to at most each length in tokens, whole "
                        "sentences, a key per cell, chat template; lacache: the LaCache repository's niah/pred.py "
                        "(filler sized in characters, ~3.75 per token; a key per test index; its wording; no chat "
                        "template; the key's token count as answer budget; its CSV), used by scripts/niah.sh")
    add_official_method_flag(g["method"])
    add_method_flags(g["method"], default_method=None, budget=0.5, defaults={"span": 14},
                     start_help=f"leading tokens kept by every method (default {NIAH_START_SIZE}, as the official "
                                "NIAH script)")
    add_output_flags(g["output"], "outputs/niah")
    return p.parse_args(argv)


def parse_depths(text) -> List[float]:
    if text is None:
        return list(DEFAULT_DEPTHS)
    try:
        depths = [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        depths = []
    if not depths or any(not 0 <= d <= 100 for d in depths):
        raise ConfigError(f"--depths must be a comma list of percentages in [0, 100], got {text!r}")
    return sorted(set(depths))


def validate(args) -> None:
    apply_official_method_flag(args)
    args.method = args.method or "full"
    check_run_flags(args)
    check_batch_flags(args)
    if args.max_tokens < 1:
        raise ConfigError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    if not 1 <= args.interval <= args.max_tokens:
        raise ConfigError(f"--interval must be in [1, --max_tokens={args.max_tokens}], got {args.interval}")
    if args.num_tests < 1:
        raise ConfigError(f"--num_tests must be >= 1, got {args.num_tests}")
    args.depth_list = parse_depths(args.depths)
    args.max_new_tokens_given = args.max_new_tokens is not None
    if args.max_new_tokens is None:
        args.max_new_tokens = MAX_NEW_TOKENS[args.mode]
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.start_size == NIAH_START_SIZE:
        args.start_size = None  # the default, spelled out: same results, same folder
    args.lengths = [args.interval * k for k in range(1, args.max_tokens // args.interval + 1)]
    if args.protocol == "lacache":
        validate_official(args)


def validate_official(args) -> None:
    """``--protocol lacache``: its grid, answer budget and prompt are fixed by the official script."""
    if args.mode != "passkey":
        raise ConfigError(f"--protocol lacache is the official passkey test; it cannot run --mode {args.mode}")
    fixed = [flag for flag, given in (("--depths", args.depths is not None), ("--no_chat", args.no_chat),
                                      ("--max_new_tokens", args.max_new_tokens_given)) if given]
    if fixed:
        raise ConfigError(f"{fixed[0]} cannot be used with --protocol lacache: the official script fixes the depths "
                          "(11 filler prefixes), the prompt (no chat template) and the answer budget (the key's tokens)")
    if official.garbage_chars(0, args.interval) == 0:
        raise ConfigError(f"--interval must be >= {official.min_interval()} with --protocol lacache, got "
                          f"{args.interval} (no filler; the official script divides by zero there)")
    args.cells = official.grid(args.max_tokens, args.interval)
    args.depth_list = sorted({c.depth for c in args.cells})


def start_size(args) -> int:
    return NIAH_START_SIZE if args.start_size is None else args.start_size


def model_label(name: str) -> str:
    return Path(name.rstrip("/")).name or name


def answer_tokens(args):
    return "key tokens + 1" if args.protocol == "lacache" else args.max_new_tokens


def open_run(args, method: str) -> Run:
    """The result folder of one method: readable name, the hash of the complete setting. The grid (lengths,
    depths, tests) is not part of it: rows are keyed by cell, so a wider rerun extends the same results."""
    mode = args.mode if args.protocol == "clean" else f"{args.mode}-{args.protocol}"
    ident = method_identity(args, method)
    if method != "full":
        ident["start_size"] = start_size(args)
    setting = {"model": args.model_identity, "data": {"mode": args.mode, "protocol": args.protocol},
               "method": ident,
               "generation": {"max_new_tokens": answer_tokens(args), "chat": not args.no_chat and args.protocol == "clean"},
               "cache": {"dtype": args.dtype, "attn_implementation": args.attn_implementation, **batch_setting(args)},
               "seed": args.seed}
    return Run(args.output_dir, f"{model_label(args.model_name_or_path)}__{mode}__{method_tag(args, method)}"
                                f"{batch_tag(args)}", setting, args, args.rank)


# ----------------------------------------------------------------------------------------- results file
def _key(length, depth, test):
    return int(length), depth_label(depth), int(test)


def row_key(row: dict) -> tuple:
    """The cell of a test (a grid row or a ``results.csv`` record): ``(context_length, depth label, test)``."""
    return _key(row["context_length"], row["depth"], row["test"])


class CsvResults(records.CsvResults):
    """``results.csv`` opened for appending, one flushed row per test; ``done`` holds the cells written
    (:func:`row_key`), and a row cut short by a kill is dropped on opening."""

    def __init__(self, path: Path):
        super().__init__(path, COLUMNS, row_key, "a NIAH results file")


# ----------------------------------------------------------------------------------------- summary
def summary_table(rows: List[dict]) -> str:
    """Markdown: mean score per context length (mean over depths of the cell means) and over all cells."""
    means = cell_means(rows)
    lines = ["| context length | mean prompt tokens | tests | score |", "|---:|---:|---:|---:|"]
    for length in sorted({k[0] for k in means}):
        cells = [v for k, v in means.items() if k[0] == length]
        mine = [r for r in rows if int(r["context_length"]) == length]
        tokens = statistics.mean(int(r["prompt_tokens"]) for r in mine)
        lines.append(f"| {length_label(length)} | {tokens:.0f} | {len(mine)} | {sum(cells) / len(cells):.2f} |")
    lines.append(f"| **all** | | {len(rows)} | **{average(means):.2f}** |")
    return "\n".join(lines)


def paper_table() -> str:
    rows = paper.table("Needle")
    out = ["| " + " | ".join(str(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in row) + " |" for row in rows[1:]]
    return "\n".join(out)


def write_summary(args, method: str, folder: Path, rows: List[dict]) -> str:
    budget = "full cache" if method == "full" else f"budget {args.budget:g} x prompt tokens, start {start_size(args)}"
    head = f"## NIAH {args.mode}: {model_label(args.model_name_or_path)}, {method_tag(args, method)} ({budget})"
    table = summary_table(rows)
    (folder / "summary.md").write_text(f"{head}\n\n{table}\n\n{PAPER_NOTE}\n\n{paper_table()}\n", encoding="utf-8")
    return f"{head}\n\n{table}"


# ----------------------------------------------------------------------------------------- run
def make_spec(args, method: str, prompt_tokens: int) -> BudgetSpec:
    """The cache of one prompt: ``budget x prompt_tokens`` slots (official NIAH), ``start_size`` sinks."""
    return budget_spec(args, method, prompt_tokens, start_size=NIAH_START_SIZE)


def make_prompt(args, tokenizer, length: int, depth: float, test: int, essays=None, guess=None):
    """``(Prompt, answer tokens)`` of one test under ``--protocol``."""
    if args.protocol == "lacache":
        cell = next(c for c in args.cells if c.length == length and depth_label(c.depth) == depth_label(depth))
        text, key = official.prompt(cell, test)
        ids = encode_prompt(tokenizer, text, chat=False)
        return Prompt(text, ids, key, 0), official.answer_budget(tokenizer, key)
    prompt = build_prompt(tokenizer, args.mode, length, depth, args.seed, test, chat=not args.no_chat,
                          essays=essays, guess=guess)
    return prompt, args.max_new_tokens


def grid_cells(args) -> list:
    """``(length, depth, test)`` of every test, in order."""
    if args.protocol == "lacache":
        return [(c.length, c.depth, t) for c in args.cells for t in range(args.num_tests)]
    return [(n, d, t) for n in args.lengths for d in args.depth_list for t in range(args.num_tests)]


def write_official_csv(args, method: str, folder: Path, rows: List[dict]) -> Dict[int, str]:
    """``official.csv`` as the LaCache script writes it: per cell, the mean prompt tokens (floor), the
    depth label and the number of tests passed. Returns the official heatmap label of each length."""
    sums = {}
    for r in rows:
        key = (int(r["context_length"]), depth_label(r["depth"]))
        tokens, passed = sums.get(key, (0, 0))
        sums[key] = (tokens + int(r["prompt_tokens"]), passed + int(float(r["score"]) > 0))
    labels = {}
    with open(folder / "official.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(official.CSV_COLUMNS)
        for cell in args.cells:
            if (cell.length, depth_label(cell.depth)) in sums:
                tokens, passed = sums[cell.length, depth_label(cell.depth)]
                writer.writerow((tokens // args.num_tests, cell.depth, passed))
                labels.setdefault(cell.length, official.column_label(tokens // args.num_tests, method))
    return labels


def run_info(args, method: str) -> dict:
    """What ``run.json`` records of one method's run besides its setting."""
    return dict(model=model_label(args.model_name_or_path), method=method, mode=args.mode, protocol=args.protocol,
                lengths=args.lengths, depths=args.depth_list, num_tests=args.num_tests,
                max_new_tokens=answer_tokens(args), chat=not args.no_chat and args.protocol == "clean",
                budget=None if method == "full" else args.budget,
                start_size=None if method == "full" else start_size(args), batch_size=args.batch_size,
                **hyperparameters(args, method))


class Sweep:
    """The NIAH grid for :func:`harness.loop.run_benchmark`: per method one part, ``results.csv`` (a row per
    test, keyed by its cell), then the scores in ``run.json``, ``official.csv``, the heatmap and the summary."""

    def __init__(self, args, model, tokenizer, essays):
        self.args, self.tokenizer, self.essays = args, tokenizer, essays
        self.stop = stop_token_ids(tokenizer, model)
        self.results: Dict[str, List[dict]] = {}  # method -> its rows, for the comparison table
        self.t0 = 0.0

    def benchmark(self) -> Benchmark:
        return Benchmark(self.open_run, self.parts, finish=self.finish, report=self.report)

    def open_run(self, method: str):
        self.t0 = time.perf_counter()
        return open_run(self.args, method), run_info(self.args, method)

    def parts(self, method: str) -> List[Part]:
        args, guesses = self.args, {}
        cells = [{"context_length": n, "depth": d, "test": t} for n, d, t in grid_cells(args)]

        def prompt(cell: dict):
            length = cell["context_length"]
            built, limit = make_prompt(args, self.tokenizer, length, cell["depth"], cell["test"], self.essays,
                                       guesses.get(length))
            guesses[length] = built.units
            cell["answer"] = built.answer  # what record() scores; the prompt itself need not stay in memory
            return built.input_ids, limit

        def record(cell: dict, res) -> dict:
            return {"context_length": cell["context_length"], "depth": depth_label(cell["depth"]),
                    "test": cell["test"], "score": f"{score(args.mode, res.text, cell['answer']):g}",
                    "pred": res.text, "prompt_tokens": res.prompt_tokens}

        # the grid goes length by length, so consecutive tests have prompts of about the same length; built as
        # each batch is due (longest_first=False): the grid's prompts together would not fit in memory
        return [Part(args.mode, cells, CsvStore(CsvResults, row_key), prompt, record, lambda n: make_spec(args, method, n),
                     file="results.csv", stop=self.stop, longest_first=False)]

    def finish(self, method: str, folder: Path, reads: List[float]) -> dict:
        wanted = {_key(*c) for c in grid_cells(self.args)}  # the file may hold other cells from a wider earlier run
        rows = [r for r in records.read_csv(folder / "results.csv") if row_key(r) in wanted]
        self.results[method] = rows
        extra = {"read_fraction": round(sum(reads) / len(reads), 6)} if reads else {}  # this invocation's answers
        return dict(average_score=average(cell_means(rows)), seconds=round(time.perf_counter() - self.t0, 1),
                    tests=len(rows), **extra)

    def report(self, method: str, folder: Path) -> None:
        args, rows = self.args, self.results[method]
        title = f"{model_label(args.model_name_or_path)} {args.mode}, {method_tag(args, method)}"
        labels = write_official_csv(args, method, folder, rows) if args.protocol == "lacache" else None
        depth_labels = {c.depth: official.row_label(c.depth) for c in args.cells} if args.protocol == "lacache" else None
        if heatmap(rows, folder / "heatmap.png", title, labels, depth_labels) is None:
            print("note: matplotlib is not installed; no heatmap.png (pip install matplotlib, then "
                  f"python niah/plot.py {folder / 'results.csv'})")
        print(write_summary(args, method, folder, rows))
        print(f"[{method}] results in {folder}")


def comparison(args, results) -> str:
    methods = list(results)
    lines = ["| context length | " + " | ".join(method_tag(args, m) for m in methods) + " |",
             "|---:|" + "---:|" * len(methods)]
    means = {m: cell_means(rows) for m, rows in results.items()}
    for length in args.lengths:
        vals = []
        for m in methods:
            cells = [v for k, v in means[m].items() if k[0] == length]
            vals.append(f"{sum(cells) / len(cells):.2f}" if cells else "-")
        lines.append(f"| {length_label(length)} | " + " | ".join(vals) + " |")
    lines.append("| **all** | " + " | ".join(f"**{average(means[m]):.2f}**" for m in methods) + " |")
    return "\n".join(lines)


def _main(args) -> int:
    essays = None
    if args.mode == "essays":
        from harness.data import pg_essays
        essays = pg_essays()
    model, tokenizer = load(args)
    # reject impossible budgets before the first test: the smallest prompt gets the smallest cache
    length, depth, _ = grid_cells(args)[0]
    first, _ = make_prompt(args, tokenizer, length, depth, 0, essays)
    check_budgets(args, model, first.tokens, lambda m, n: make_spec(args, m, n))
    sweep = Sweep(args, model, tokenizer, essays)
    run_benchmark(args, sweep.benchmark(), model, tokenizer, answer_all)
    if len(sweep.results) > 1:
        print(f"\n## average score per context length ({args.mode})\n\n{comparison(args, sweep.results)}")
    return 0


main = cli(parse_args, _main, validate)


if __name__ == "__main__":
    sys.exit(main())
