"""Throughput of streaming perplexity at batch 1, 4 and 8 (``ppl/run.py --batch_size``).

Each batch size streams ``batch x --steps`` scored tokens of the corpus as ``batch`` consecutive chunks
(the protocol of ``ppl/run.py --batch_size``), one token of each chunk per forward pass, and reports
tokens/s, its ratio to batch 1, and the peak KV bytes, per method. Writes JSON beside the printed table.

    python scripts/bench_batch.py                                   # embedded SmolLM2-135M, pg-essays, CPU
    python scripts/bench_batch.py --batches 1,8 --steps 100 --methods lacache
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.data import load_texts  # noqa: E402
from harness.flags import ArgumentParser, at_least_one, int_list, parse_methods  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.runlog import run_record, write_json  # noqa: E402
from harness.runner import run_main  # noqa: E402
from harness.streaming import check_batchable, split_streams, stream_perplexity_batched, stream_tokens  # noqa: E402
from lacache_core import build_policy  # noqa: E402


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset_name", default="pg-essays")
    p.add_argument("--methods", default="full,streamingllm,lacache")
    p.add_argument("--batches", default="1,4,8", help="batch sizes (streams at once)")
    p.add_argument("--steps", type=int, default=300, help="tokens each stream scores")
    p.add_argument("--cache_size", type=int, default=256)
    p.add_argument("--span", type=int, default=8)
    p.add_argument("--overlap", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--output", default="outputs/bench/bench_batch.json")
    args = p.parse_args(argv)
    batches = int_list(args, "batches", 1, "batch sizes")
    at_least_one(args, "steps", "cache_size", "span")
    methods = parse_methods(args.methods, "--methods")
    settings = dict(cache_size=args.cache_size, start_size=4, span=args.span, overlap=args.overlap)
    for method in methods:
        check_batchable(build_policy(method, **settings), max(batches), "--batches")
    model, tokenizer = load_model(args.model, args.dtype, args.device, args.attn_implementation)
    pairs = stream_tokens(tokenizer, load_texts(args.dataset_name, None, "test"), max(batches) * args.steps)
    # warm-up: the first passes of each shape are not what we measure
    stream_perplexity_batched(model, split_streams(pairs[:, :8], 1), build_policy("full"), desc="warm-up")
    rows = []
    for method in methods:
        for batch in batches:
            res = stream_perplexity_batched(model, split_streams(pairs[:, :batch * args.steps], batch),
                                            build_policy(method, **settings), desc=f"{method} x{batch}")
            rows.append({"method": method, "batch": batch, "tokens": res.scored, "seconds": res.seconds,
                         "tokens_per_s": res.tokens_per_s, "peak_kv_bytes": res.peak_kv_bytes, "ppl": res.ppl})
    one = {r["method"]: r["tokens_per_s"] for r in rows if r["batch"] == 1}
    print("\n| method | batch | tokens/s | vs batch 1 | peak KV MiB | ppl |\n|---|---|---|---|---|---|")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / one[r["method"]] if r["method"] in one else None
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        print(f"| {r['method']} | {r['batch']} | {r['tokens_per_s']:.1f} | {speedup} | "
              f"{r['peak_kv_bytes'] / 2**20:.2f} | {r['ppl']:.3f} |")
    write_json(Path(args.output), run_record(vars(args), rows=rows))
    print(f"results: {args.output}")
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
