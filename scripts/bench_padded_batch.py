"""Decode-step time of a left-padded batch against the same batch unpadded, one method, rounds interleaved.

A left-padded batch gives each row a policy of its own (its own token count, so its own compaction steps); an
unpadded batch of a position-only method is one policy. Both fill ``--context`` tokens per row (row ``j`` of the
padded batch: ``--pad_step * j`` of them padding), then time ``--steps`` greedy decode steps; the figure is the
median over ``--rounds`` of the padded/unpadded ratio of their mean step times (the first 4 steps left out).

    python scripts/bench_padded_batch.py                      # SmolLM2-135M, LaCache, batch 8, cache 256
    python scripts/bench_padded_batch.py --method streamingllm --batch_size 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.models import load_model  # noqa: E402
from lacache_core import enable_position_shift, make_cache  # noqa: E402
from lacache_core.versions import with_cache  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="lacache")
    p.add_argument("--cache_size", type=int, default=256)
    p.add_argument("--span", type=int, default=7, help="LaCache span (7 of SmolLM2's 30 layers, as bench_decode)")
    p.add_argument("--overlap", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--pad_step", type=int, default=8, help="row j holds pad_step * j padding tokens")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    for name in ("cache_size", "batch_size", "context", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.steps <= 4:
        p.error("--steps must be > 4 (the first 4 are left out)")
    if args.pad_step < 0 or args.pad_step * (args.batch_size - 1) >= args.context:
        p.error("--pad_step must be >= 0 and leave every row a token: pad_step * (batch_size - 1) < context")
    return args


def step_ms(model, args, ids, padded: bool) -> float:
    settings = {"span": args.span, "overlap": args.overlap} if args.method == "lacache" else {}
    cache = make_cache(args.method, model, cache_size=args.cache_size, **settings)
    mask = torch.ones_like(ids)
    if padded:
        for j in range(ids.shape[0]):
            mask[j, :args.pad_step * j] = 0
    times = []
    with torch.no_grad():
        token = model(ids, attention_mask=mask, **with_cache(cache), use_cache=True).logits[:, -1].argmax(-1)
        for _ in range(args.steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            start = time.perf_counter()
            out = model(token[:, None], attention_mask=mask, **with_cache(cache), use_cache=True)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1].argmax(-1)
    return 1000 * statistics.mean(times[4:])


def main(argv=None) -> int:
    args = parse(argv)
    model, _ = load_model(args.model, attn_implementation="sdpa")
    enable_position_shift(model)
    ids = torch.randint(100, min(20000, model.config.vocab_size), (args.batch_size, args.context),
                        generator=torch.Generator().manual_seed(0))
    ratios = []
    for r in range(args.rounds):
        plain, padded = step_ms(model, args, ids, False), step_ms(model, args, ids, True)
        ratios.append(padded / plain)
        print(f"round {r}: unpadded {plain:.1f} ms, padded {padded:.1f} ms, ratio {padded / plain:.3f}", flush=True)
    print(f"{args.method}, batch {args.batch_size}, cache {args.cache_size}, context {args.context}: median "
          f"padded/unpadded step ratio over {args.rounds} rounds {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
