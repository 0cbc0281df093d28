"""Decode-step benchmark: full cache vs StreamingLLM vs LaCache at equal budget.

For each context length n, the cache is filled to n tokens (one prefill pass, then the policy
compacts), and a window of single-token decode steps is timed there. Reports the median step
time, the part of it spent compacting (policy + gathers), tokens/s and KV bytes, and writes JSON.

    python scripts/bench_decode.py                       # embedded SmolLM2-135M, 1K..8K
    python scripts/bench_decode.py --model tiny --contexts 1024,4096,16384
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lacache_core import CompressedCache, ConfigError, build_policy, enable_position_shift  # noqa: E402
from lacache_core.models import load_model  # noqa: E402
from lacache_core.runlog import run_record, write_json  # noqa: E402
from lacache_core.streaming import cache_kv_bytes  # noqa: E402


SHAPES = {  # random-weight models: speed depends on shape, not on weights
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2),
    "llama2-7b-shape": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32),
}


def random_llama(shape: str, device: str, dtype: torch.dtype, attn: str):
    import transformers

    cfg = transformers.LlamaConfig(max_position_embeddings=131072, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, torch_dtype=dtype)
    return model.to(device, dtype).eval()


class CompactionTimer:
    """Accumulates the wall time spent in ``CompressedCache._compact``."""

    def __init__(self, cache, device):
        self.total, self.device, original = 0.0, device, cache._compact

        def timed():
            self._sync()
            t = time.perf_counter()
            original()
            self._sync()
            self.total += time.perf_counter() - t

        cache._compact = timed

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def bench_one(model, method, settings, context, steps, vocab, device):
    num_layers = model.config.num_hidden_layers
    policy = build_policy(method, **settings)
    if policy.position_shift:
        enable_position_shift(model)
        cache = CompressedCache(policy, num_layers)
    else:
        from transformers import DynamicCache
        cache = DynamicCache()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=g).to(device)
    with torch.inference_mode():
        model(prompt, past_key_values=cache, use_cache=True)
        timer = CompactionTimer(cache, device) if isinstance(cache, CompressedCache) else None
        times = []
        token = prompt[:, -1:]
        for _ in range(steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    step = statistics.median(times[steps // 5:])  # drop warm-up steps
    return {"method": method, "context": context, "step_ms": step * 1e3,
            "compaction_ms_per_token": (timer.total / steps * 1e3) if timer else 0.0,
            "tokens_per_s": 1.0 / step, "kv_bytes": cache_kv_bytes(cache)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help=f"model name/path, or a random-weight shape: {sorted(SHAPES)}")
    p.add_argument("--contexts", default="1024,2048,4096,8192")
    p.add_argument("--methods", default="full,streamingllm,lacache")
    p.add_argument("--cache_size", type=int, default=256)
    p.add_argument("--span", type=int, default=None, help="LaCache span (default: num_layers // 4, >= 1)")
    p.add_argument("--overlap", type=int, default=None, help="LaCache overlap (default: span // 2)")
    p.add_argument("--steps", type=int, default=40, help="decode steps timed per context")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--output", default="outputs/bench/bench_decode.json")
    args = p.parse_args(argv)
    try:
        if args.model in SHAPES:
            from lacache_core.models import parse_dtype
            model = random_llama(args.model, args.device, parse_dtype(args.dtype), args.attn_implementation)
            vocab = model.config.vocab_size
        else:
            model, tok = load_model(args.model, args.dtype, args.device, args.attn_implementation)
            vocab = model.config.vocab_size
        layers = model.config.num_hidden_layers
        span = args.span or max(1, layers // 4)
        overlap = span // 2 if args.overlap is None else args.overlap
        settings = dict(cache_size=args.cache_size, recent_size=args.cache_size - 4, start_size=4, span=span,
                        overlap=overlap)
        # warm-up: first use of each kernel shape (CUDA lazy loading, cuBLAS heuristics) is not what we measure
        for method in args.methods.split(","):
            bench_one(model, method, settings, min(int(c) for c in args.contexts.split(",")), 8, vocab, args.device)
        rows = []
        for context in [int(c) for c in args.contexts.split(",")]:
            for method in args.methods.split(","):
                row = bench_one(model, method, settings, context, args.steps, vocab, args.device)
                rows.append(row)
                print(f"{method:>12} ctx {context:>6}: step {row['step_ms']:.2f} ms "
                      f"(compaction {row['compaction_ms_per_token']:.3f} ms/token), {row['tokens_per_s']:.1f} tok/s, "
                      f"KV {row['kv_bytes'] / 2**20:.2f} MiB", flush=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n| context | method | step ms | compaction ms/token | tokens/s | KV MiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['method']} | {r['step_ms']:.2f} | {r['compaction_ms_per_token']:.3f} | "
              f"{r['tokens_per_s']:.1f} | {r['kv_bytes'] / 2**20:.2f} |")
    by = {(r["context"], r["method"]): r for r in rows}
    for context in sorted({r["context"] for r in rows}):
        if (context, "lacache") in by and (context, "streamingllm") in by:
            ratio = by[(context, "lacache")]["step_ms"] / by[(context, "streamingllm")]["step_ms"]
            print(f"context {context}: LaCache step / StreamingLLM step = {ratio:.3f}")
    write_json(Path(args.output), run_record(vars(args) | {"span": span, "overlap": overlap}, rows=rows))
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
