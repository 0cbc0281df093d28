"""Throughput at batch 1, 4 and 8: streaming perplexity (``ppl/run.py --batch_size``) or LongBench answers
(``longbench/pred.py --batch_size``).

``--task ppl`` (default): each batch size streams ``batch x --steps`` scored tokens of the corpus as
``batch`` consecutive chunks (the protocol of ``ppl/run.py --batch_size``), one token of each chunk per
forward pass, and reports tokens/s, its ratio to batch 1, and the peak KV bytes, per method.

``--task longbench``: writes ``--num_samples`` LongBench-synthetic samples per task
(``longbench/synthetic.py``), runs ``longbench/pred.py`` on them at each batch size, and reports
samples/s (samples over the summed generation time of the records, model loading left out), its ratio
to batch 1, the peak KV bytes of a batch, and whether the answers equal batch 1's.

Both write JSON beside the printed table.

    python scripts/bench_batch.py                                   # embedded SmolLM2-135M, pg-essays, CPU
    python scripts/bench_batch.py --batches 1,8 --steps 100 --methods lacache
    python scripts/bench_batch.py --task longbench                  # 16 samples of 1500 tokens, budget 0.25
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.data import load_texts  # noqa: E402
from harness.flags import ArgumentParser, at_least_one, int_list, parse_methods  # noqa: E402
from harness.models import device_arg, load_model  # noqa: E402
from harness.runlog import run_record, write_json  # noqa: E402
from harness.runner import check_output_file, run_main  # noqa: E402
from harness.streaming import check_batchable, split_streams, stream_perplexity_batched, stream_tokens  # noqa: E402
from lacache_core import build_policy  # noqa: E402


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("ppl", "longbench"), default="ppl")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset_name", default="pg-essays")
    p.add_argument("--methods", default="full,streamingllm,lacache")
    p.add_argument("--batches", default="1,4,8", help="batch sizes (streams at once)")
    p.add_argument("--steps", type=int, default=300, help="tokens each stream scores")
    p.add_argument("--cache_size", type=int, default=256)
    p.add_argument("--span", type=int, default=8)
    p.add_argument("--overlap", type=int, default=4)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--num_samples", type=int, default=8, help="--task longbench: samples per synthetic task")
    p.add_argument("--max_length", type=int, default=1500, help="--task longbench: prompt tokens")
    p.add_argument("--budget", type=float, default=0.25, help="--task longbench: cache as a fraction of max_length")
    p.add_argument("--output", default=None,
                   help="JSON results (default outputs/bench/bench_batch.json, bench_batch_longbench.json)")
    args = p.parse_args(argv)
    batches = int_list(args, "batches", 1, "batch sizes")
    at_least_one(args, "steps", "cache_size", "span", "num_samples", "max_length")
    methods = parse_methods(args.methods, "--methods")
    if args.output is None:
        args.output = f"outputs/bench/bench_batch{'' if args.task == 'ppl' else '_' + args.task}.json"
    check_output_file(args.output)
    if args.task == "longbench":
        return bench_longbench(args, methods, batches)
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


def bench_longbench(args, methods, batches) -> int:
    from longbench import pred, synthetic

    root = Path(args.output).with_suffix("")
    data = root / "data"
    if synthetic.main(["--output_dir", str(data), "--num_samples", str(args.num_samples)]) != 0:
        return 2
    datasets = ["passage_retrieval_en", "passage_count"]
    common = ["--model", "smollm2-135m-instruct", "--model_name_or_path", args.model, "--data_dir", str(data),
              "--datasets", ",".join(datasets), "--max_length", str(args.max_length), "--budget", str(args.budget),
              "--span", str(args.span), "--overlap", str(args.overlap), "--device", args.device, "--dtype", args.dtype,
              "--attn_implementation", args.attn_implementation, "--method", ",".join(methods)]
    rows = []
    for batch in batches:
        out = root / f"bs{batch}"
        if pred.main(common + ["--output_dir", str(out), "--batch_size", str(batch)]) != 0:
            return 2
        for folder in sorted((out / "pred").iterdir()):
            method = json.loads((folder / "run.json").read_text(encoding="utf-8"))["method"]
            records = [json.loads(line) for d in datasets
                       for line in (folder / f"{d}.jsonl").read_text(encoding="utf-8").splitlines()]
            seconds = sum(r["seconds"] for r in records)
            rows.append({"method": method, "batch": batch, "samples": len(records), "seconds": seconds,
                         "samples_per_s": len(records) / seconds,
                         "peak_kv_bytes": max(r["peak_kv_bytes"] * r["batch_rows"] for r in records),
                         "answers": {r["_id"]: r["pred"] for r in records}})
    one = {r["method"]: r for r in rows if r["batch"] == 1}
    print("\n| method | batch | samples/s | vs batch 1 | peak KV MiB of a batch | answers equal to batch 1 |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        base = one.get(r["method"])
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"] if base else None
        r["equal_to_batch_1"] = sum(r["answers"][k] == v for k, v in base["answers"].items()) if base else None
        speedup = f"{r['speedup']:.2f}x" if base else "-"
        equal = f"{r['equal_to_batch_1']} of {len(base['answers'])}" if base else "-"
        print(f"| {r['method']} | {r['batch']} | {r['samples_per_s']:.3f} | {speedup} | "
              f"{r['peak_kv_bytes'] / 2**20:.2f} | {equal} |")
    write_json(Path(args.output), run_record(vars(args), rows=rows))
    print(f"results: {args.output}")
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
