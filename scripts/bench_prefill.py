"""Bounded prefill: peak memory and quality of chunked vs whole-prompt prefill.

Each configuration runs in its own process (peak RSS is per process). The prompt is the first
``--prompt_tokens`` tokens of a corpus; quality is the perplexity of the next ``--eval_tokens``
tokens, decoded one by one after the prefill with the same cache.

    python scripts/bench_prefill.py --prompt_tokens 8192 --chunks 0,512,128
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser, at_least_one, int_list, parse_methods  # noqa: E402
from harness.runner import check_output_file, run_main  # noqa: E402
from lacache_core.errors import ConfigError  # noqa: E402


def one_run(args) -> dict:
    from lacache_core import build_policy, CompressedCache, enable_position_shift, prefill
    from lacache_core.versions import with_cache  # noqa: E402
    from harness.data import load_texts
    from harness.models import load_model

    model, tok = load_model(args.model, "float32", "cpu", "sdpa")
    text = "\n\n".join(load_texts(args.dataset_name))
    need = args.prompt_tokens + args.eval_tokens + 1
    ids = tok(text, return_tensors="pt").input_ids[:, :need]
    if ids.shape[1] < need:
        raise ConfigError(f"--dataset_name {args.dataset_name}: {ids.shape[1]} tokens, fewer than --prompt_tokens "
                          f"+ --eval_tokens + 1 = {need}; lower them or pass a longer text")
    layers = model.config.num_hidden_layers
    span = max(1, layers // 4)
    enable_position_shift(model)
    cache = CompressedCache(build_policy(args.method, cache_size=args.cache_size, span=span, overlap=span // 2,
                                         recent_size=args.cache_size - 4), layers)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = prefill(model, ids[:, :args.prompt_tokens], cache, args.chunk or None)
        seconds = time.perf_counter() - start
        nlls = [F.cross_entropy(logits[0].float(), ids[0, args.prompt_tokens]).item()]
        for t in range(args.prompt_tokens, args.prompt_tokens + args.eval_tokens):
            out = model(ids[:, t:t + 1], use_cache=True, **with_cache(cache))
            nlls.append(F.cross_entropy(out.logits[0, -1].float(), ids[0, t + 1]).item())
    return {"chunk": args.chunk, "prefill_s": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_kv_mib": cache.peak_bytes / 2 ** 20, "continuation_ppl": math.exp(sum(nlls) / len(nlls))}


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset_name", default="pg-essays")
    p.add_argument("--method", default="lacache")
    p.add_argument("--cache_size", type=int, default=256)
    p.add_argument("--prompt_tokens", type=int, default=8192)
    p.add_argument("--eval_tokens", type=int, default=128)
    p.add_argument("--chunks", default="0,512,128", help="comma list; 0 = whole prompt at once")
    p.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # one configuration (child)
    p.add_argument("--output", default="outputs/bench/bench_prefill.json")
    args = p.parse_args(argv)
    check_output_file(args.output)
    chunks = int_list(args, "chunks", 0, "chunk sizes (0: the whole prompt)")
    at_least_one(args, "cache_size", "prompt_tokens", "eval_tokens")
    parse_methods(args.method)
    if args.chunk is not None:
        print(json.dumps(one_run(args)))
        return 0
    rows = []
    for chunk in chunks:
        cmd = [sys.executable, __file__, "--chunk", str(chunk)] + [
            a for k in ("model", "dataset_name", "method", "cache_size", "prompt_tokens", "eval_tokens")
            for a in (f"--{k}", str(getattr(args, k)))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # the child's one error line alone, as if this process had raised it
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            print(errors[-1] if errors else done.stderr[-2000:], file=sys.stderr)
            return 2 if errors else 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"chunk {row['chunk'] or 'whole':>6}: prefill {row['prefill_s']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB, "
              f"peak KV {row['peak_kv_mib']:.1f} MiB, continuation ppl {row['continuation_ppl']:.3f}", flush=True)
    from harness.runlog import run_record, write_json
    write_json(Path(args.output), run_record(vars(args), rows=rows))
    print(f"results: {args.output}")
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
