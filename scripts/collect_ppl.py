"""Collect every perplexity run under a folder into one markdown table (one row per run).

    python scripts/collect_ppl.py outputs/baselines > table.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser  # noqa: E402
from harness.runner import run_main  # noqa: E402


def rows(folder: Path):
    for path in sorted(folder.rglob("run.json")):
        run = json.loads(path.read_text())
        if not run.get("complete") or "ppl" not in (run.get("results") or {}):  # finished perplexity runs only
            continue
        args, res, pol = run["args"], run["results"], run.get("policy", {})
        extra = {k: v for k, v in pol.items() if k not in ("method", "cache_size", "start_size", "num_layers")}
        yield {
            "method": args["method"], "budget": res.get("max_cache_len") or "all",
            "cache_size": args.get("cache_size", 0) if args["method"] != "full" else float("inf"),
            "settings": ", ".join(f"{k}={v}" for k, v in extra.items()), "ppl": res["ppl"],
            "tokens": res["tokens_scored"], "tok/s": res["tokens_per_s"],
            "KV MiB": res["peak_kv_bytes"] / 2 ** 20, "data": args["dataset_name"], "model": args["model_name_or_path"],
        }


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    table = sorted(rows(args.folder), key=lambda r: (r["cache_size"], r["ppl"]))
    if not table:
        print(f"error: no completed runs under {args.folder}", file=sys.stderr)
        return 2
    print("| model | data | method | max cache | settings | tokens | ppl | tok/s | peak KV MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['data']} | {r['method']} | {r['budget']} | {r['settings']} | {r['tokens']} | "
              f"{r['ppl']:.3f} | {r['tok/s']:.1f} | {r['KV MiB']:.2f} |")
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
