"""Perplexity against the KV bytes held (and, with ``--read``, read per step) of every finished perplexity run
under a folder: a markdown table and a plot of perplexity against peak KV MiB.

    python scripts/memory_frontier.py outputs/equal_memory --markdown table.md --plot frontier.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser  # noqa: E402
from harness.runner import check_output_file, run_main  # noqa: E402


def label(run: dict) -> str:
    """``LaCache 1024, KIVI-4, Quest 256``: the method, its budget, and the storage and read options."""
    args, cache = run["args"], run["setting"]["cache"]
    name = "full" if args["method"] == "full" else f"{args['method']} {args['cache_size']}"
    if cache.get("quant"):
        quant = cache["quant"]
        name += f", KIVI-{quant['bits']}" + (" post-RoPE" if quant.get("key_order") == "post_rope" else "") + \
            (", KIVI's schedule" if quant.get("schedule") == "reference" else "")
    if cache.get("read"):
        name += f", Quest {cache['read']['token_budget']}"
    return name


def rows(folder: Path, layers: int):
    for path in sorted(folder.rglob("run.json")):
        run = json.loads(path.read_text())
        res = run.get("results") or {}
        if not run.get("complete") or "ppl" not in res:
            continue
        slots = res.get("max_cache_len") or res["tokens_scored"]
        yield {"cache": label(run), "slots": slots, "peak KV MiB": res["peak_kv_bytes"] / 2 ** 20,
               "bytes per slot and layer": res["peak_kv_bytes"] / (slots * layers),
               "read per step MiB": res.get("read_bytes_per_step", float("nan")) / 2 ** 20,
               "read share": res.get("read_fraction", float("nan")), "ppl": res["ppl"], "tok/s": res["tokens_per_s"]}


def markdown(table) -> str:
    cols = list(table[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = [f"{v:,.0f}" if k in ("slots", "bytes per slot and layer") else
                 ("-" if v != v else f"{v:.3f}" if k in ("ppl", "read share") else f"{v:.2f}") if isinstance(v, float)
                 else str(v) for k, v in row.items()]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import ScalarFormatter

    # points are numbered in memory order and named in the legend: full names beside the points overlapped
    # where several caches hold about the same memory at about the same perplexity
    fig, ax = plt.subplots(figsize=(11, 6))
    for i, row in enumerate(table, 1):
        marker = "s" if "Quest" in row["cache"] else ("^" if "KIVI" in row["cache"] else "o")
        ax.scatter(row["peak KV MiB"], row["ppl"], marker=marker, s=40, label=f"{i}  {row['cache']}")
        ax.annotate(str(i), (row["peak KV MiB"], row["ppl"]), fontsize=7, textcoords="offset points",
                    xytext=(4, 4 if i % 2 else -10))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("peak KV MiB held (log)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity at the memory held (o fp32, ^ KIVI, s Quest reads)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--layers", type=int, default=30, help="decoder layers of the model (bytes per slot; default 30)")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--plot", type=Path, help="and the plot here (PNG)")
    args = p.parse_args(argv)
    if args.layers < 1:
        print(f"error: --layers must be >= 1, got {args.layers}", file=sys.stderr)
        return 2
    for flag in ("markdown", "plot"):
        if getattr(args, flag) is not None:
            check_output_file(getattr(args, flag), f"--{flag}")
    table = sorted(rows(args.folder, args.layers), key=lambda r: r["peak KV MiB"])
    if not table:
        print(f"error: no completed perplexity runs under {args.folder}", file=sys.stderr)
        return 2
    text = markdown(table)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot:
        plot(table, args.plot)
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
