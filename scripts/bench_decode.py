"""Decode-step benchmark: every decode-time method at equal budget.

For each context length n, the cache is filled to n tokens (4096-token passes, the policy
compacting after each), and a window of single-token decode steps is timed there. Reports the median step
time, the part of it spent in ``CompressedCache.attend`` (the "compaction" column: rotation, scoring,
policy and gathers), tokens/s and KV bytes; writes JSON and a PNG (step time and KV memory vs context).

``--official_slow`` adds "lacache-official-slow": the official algorithm done the official way
(per-layer Python index lists from :mod:`lacache_core.reference`, and the whole cache turned into
legacy tuples and back every step) on the same model and text, and prints its per-token overhead
against ours.

    python scripts/bench_decode.py                       # embedded SmolLM2-135M, 1K..8K
    python scripts/bench_decode.py --model tiny --contexts 1024,4096,16384 --official_slow
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser, as_flags, at_least_one, int_list, parse_methods  # noqa: E402
from harness.runner import check_output_file, run_main  # noqa: E402

from dataclasses import dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402

from lacache_core import CompressedCache, ConfigError, build_policy, enable_position_shift  # noqa: E402
from lacache_core.build import prefill  # noqa: E402
from lacache_core.cache import kv_bytes  # noqa: E402
from lacache_core.policies.base import CachePolicy  # noqa: E402
from lacache_core.reference import ReferenceLaCache  # noqa: E402
from harness.models import device_arg, load_model  # noqa: E402
from harness.runlog import process_rss_bytes, run_record, write_json  # noqa: E402
from lacache_core.versions import DTYPE_KWARG, with_cache  # noqa: E402


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
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, **{DTYPE_KWARG: dtype})
    return model.to(device, dtype).eval()


class CompactionTimer:
    """Accumulates the wall time the cache's step adds: entering ``CompressedCache.attend`` (rotating queries and
    keys, scoring) and leaving it after the kernel (compacting), i.e. everything position shift and the policy
    add to a step."""

    def __init__(self, cache, device):
        self.total, original = 0.0, cache.attend
        timer = self

        class Timed:
            def __init__(self, *args):
                self.context = original(*args)

            def __enter__(self):
                with timer.clock():
                    return self.context.__enter__()

            def __exit__(self, *exc):
                with timer.clock():
                    return self.context.__exit__(*exc)

        self.device = device
        cache.attend = Timed

    @contextmanager
    def clock(self):
        sync(self.device)
        t = time.perf_counter()
        yield
        sync(self.device)
        self.total += time.perf_counter() - t


@dataclass
class _Passive(CachePolicy):
    """Keeps everything: the container the slow official way rebuilds after every step."""

    name: ClassVar[str] = "passive"
    default_positions: ClassVar[str] = "slot"

    def select(self, n, num_layers):
        return None


def _passive_cache(layers):
    from transformers import DynamicCache

    cache = CompressedCache(_Passive(), len(layers))
    for i, (k, v) in enumerate(layers):
        DynamicCache.update(cache, k, v, i)
    return cache


# The cache is filled in chunks of this many tokens: a whole 32K-token prompt in one pass would need a
# [heads, 32K, 32K] attention matrix; chunks are exact for the full cache and leave every bounded
# cache at its budget, which is all the timed window needs.
FILL_CHUNK = 4096


def bench_official_slow(model, settings, context, steps, vocab, device):
    """The official way: per-layer Python index lists and a tuple round trip after every step."""
    num_layers = model.config.num_hidden_layers
    enable_position_shift(model)
    ref = ReferenceLaCache(num_layers, settings["cache_size"], settings["span"], settings["overlap"],
                           settings["start_size"])
    overhead = 0.0

    def slow_compact(cache):
        nonlocal overhead
        sync(device)
        t = time.perf_counter()
        legacy = [tuple(cache._layer(i)) for i in range(num_layers)]
        keep = ref.slots_to_keep(legacy[0][0].shape[-2])
        legacy = [(k[:, :, torch.tensor(row, device=k.device)], v[:, :, torch.tensor(row, device=k.device)])
                  for (k, v), row in zip(legacy, keep)]
        cache = _passive_cache(legacy)
        sync(device)
        overhead += time.perf_counter() - t
        return cache

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=g).to(device)
    times = []
    with torch.inference_mode():
        cache = _passive_cache([])
        for start in range(0, context, FILL_CHUNK):  # the official way compacts after every forward pass
            model(prompt[:, start:start + FILL_CHUNK], use_cache=True, **with_cache(cache))
            cache = slow_compact(cache)
        overhead, token = 0.0, prompt[:, -1:]
        for _ in range(steps):
            sync(device)
            t = time.perf_counter()
            out = model(token, use_cache=True, **with_cache(cache))
            cache = slow_compact(cache)
            token = out.logits[:, -1:].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - t)
    step = statistics.median(times[steps // 5:])
    return {"method": "lacache-official-slow", "context": context, "step_ms": step * 1e3,
            "compaction_ms_per_token": overhead / steps * 1e3, "tokens_per_s": 1.0 / step,
            "kv_bytes": cache.kv_bytes(), "rss_bytes": process_rss_bytes()}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plot(rows, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax1.plot([r["context"] for r in mine], [r["step_ms"] for r in mine], marker="o", label=method)
        ax2.plot([r["context"] for r in mine], [r["kv_bytes"] / 2 ** 20 for r in mine], marker="o", label=method)
    ax1.set(xscale="log", xlabel="context (tokens)", ylabel="decode step (ms, median)")
    ax2.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache (MiB)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_one(model, method, settings, context, steps, vocab, device, key_rotation="auto", batch_size=1):
    num_layers = model.config.num_hidden_layers
    policy = build_policy(method, **settings)
    if method != "full":
        enable_position_shift(model)
        cache = CompressedCache(policy, num_layers, key_rotation=key_rotation)
    else:
        from transformers import DynamicCache
        cache = DynamicCache()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch_size, context), generator=g).to(device)
    with torch.inference_mode():
        prefill(model, prompt, cache, chunk_size=FILL_CHUNK)
        timer = CompactionTimer(cache, device) if isinstance(cache, CompressedCache) else None
        times = []
        token = prompt[:, -1:]
        for _ in range(steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(token, use_cache=True, **with_cache(cache))
            token = out.logits[:, -1:].argmax(-1)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    timed = times[steps // 5:]  # drop warm-up steps
    step = statistics.median(timed)
    return {"method": method, "context": context, "step_ms": step * 1e3,
            # the mean carries the compaction steps at their share (LaCache compacts every R steps)
            "mean_step_ms": statistics.fmean(timed) * 1e3, "key_rotation": key_rotation, "batch_size": batch_size,
            "compaction_ms_per_token": (timer.total / steps * 1e3) if timer else 0.0,
            "tokens_per_s": 1.0 / step, "kv_bytes": kv_bytes(cache), "rss_bytes": process_rss_bytes()}


def check_args(args) -> None:
    """One-line errors for the flags, before any model is loaded."""
    int_list(args, "contexts", 1, "context lengths in tokens")
    at_least_one(args, "steps", "rounds", "cache_size", "batch_size")
    parse_methods(args.methods, "--methods")
    check_output_file(args.output)


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help=f"model name/path, or a random-weight shape: {sorted(SHAPES)}")
    p.add_argument("--contexts", default="1024,2048,4096,8192")
    p.add_argument("--methods", default="full,streamingllm,lacache,h2o,tova,lshe")
    p.add_argument("--official_slow", action="store_true",
                   help="also time LaCache done the official way (Python index lists, tuple round trip)")
    p.add_argument("--cache_size", type=int, default=256)
    p.add_argument("--span", type=int, default=None, help="LaCache span (default: num_layers // 4, >= 1)")
    p.add_argument("--overlap", type=int, default=None, help="LaCache overlap (default: span // 2)")
    p.add_argument("--steps", type=int, default=40, help="decode steps timed per context")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--shift_ratio", action="store_true",
                   help="only the position-shift cost: LaCache and StreamingLLM steps at the largest --contexts vs a "
                        "full-cache step at context --cache_size (the same number of cached tokens), the caches' steps "
                        "interleaved one by one, in --rounds rounds")
    p.add_argument("--rounds", type=int, default=5, help="with --shift_ratio: interleaved measurement rounds")
    p.add_argument("--batch_size", type=int, default=1,
                   help="rows decoded together (one prompt of random tokens per row)")
    p.add_argument("--output", default="outputs/bench/bench_decode.json")
    args = p.parse_args(argv)
    try:
        check_args(args)
        if args.model in SHAPES:
            from harness.models import parse_dtype
            model = random_llama(args.model, args.device, parse_dtype(args.dtype), args.attn_implementation)
            vocab = model.config.vocab_size
        else:
            model, tok = load_model(args.model, args.dtype, args.device, args.attn_implementation)
            vocab = model.config.vocab_size
        layers = model.config.num_hidden_layers
        span = args.span or max(1, layers // 4)
        overlap = span // 2 if args.overlap is None else args.overlap
        settings = dict(cache_size=args.cache_size, recent_size=args.cache_size - 4, start_size=4, span=span,
                        overlap=overlap, recent_window=32)
        if args.shift_ratio:
            return shift_ratio(model, settings, args, vocab)
        # warm-up: first use of each kernel shape (CUDA lazy loading, cuBLAS heuristics) is not what we measure
        for method in args.methods.split(","):
            bench_one(model, method, settings, min(int(c) for c in args.contexts.split(",")), 8, vocab, args.device)
        rows = []
        for context in [int(c) for c in args.contexts.split(",")]:
            for method in args.methods.split(","):
                row = bench_one(model, method, settings, context, args.steps, vocab, args.device)
                rows.append(row)
                report(row)
            if args.official_slow:
                row = bench_official_slow(model, settings, context, args.steps, vocab, args.device)
                rows.append(row)
                report(row)
    except ConfigError as err:
        print(f"error: {as_flags(str(err))}", file=sys.stderr)
        return 2
    _summarise(rows, args, span, overlap)
    return 0


RATIO_RUNS = {"full": ("full", "auto"), "lacache incremental": ("lacache", "incremental"),
              "lacache every_step": ("lacache", "every_step"), "streamingllm auto": ("streamingllm", "auto")}


def interleaved_round(model, settings, args, vocab) -> dict:
    """One round of the ratio: every cache of :data:`RATIO_RUNS` filled (the full cache to ``cache_size`` tokens,
    the bounded ones to the longest context), then ``steps`` decode steps taken one cache after the other, so that
    a slow spell of a shared machine hits every cache alike. Per cache: the mean step after a fifth of warm-up
    steps, and the time the cache's step adds."""
    context, b, device = max(int(c) for c in args.contexts.split(",")), args.batch_size, args.device
    g = torch.Generator().manual_seed(0)
    runs = {}
    with torch.inference_mode():
        for name, (method, mode) in RATIO_RUNS.items():
            if method == "full":
                from transformers import DynamicCache
                cache, length = DynamicCache(), args.cache_size
            else:
                enable_position_shift(model)
                cache, length = CompressedCache(build_policy(method, **settings), model.config.num_hidden_layers,
                                                key_rotation=mode), context
            prompt = torch.randint(0, vocab, (b, length), generator=g).to(device)
            prefill(model, prompt, cache, chunk_size=FILL_CHUNK)
            timer = CompactionTimer(cache, device) if isinstance(cache, CompressedCache) else None
            runs[name] = {"cache": cache, "token": prompt[:, -1:], "times": [], "timer": timer}
        for _ in range(args.steps):
            for run in runs.values():
                sync(device)
                t = time.perf_counter()
                out = model(run["token"], use_cache=True, **with_cache(run["cache"]))
                run["token"] = out.logits[:, -1:].argmax(-1)
                sync(device)
                run["times"].append(time.perf_counter() - t)
    return {name: {"mean_step_ms": statistics.fmean(run["times"][args.steps // 5:]) * 1e3,
                   "compaction_ms_per_token": run["timer"].total / args.steps * 1e3 if run["timer"] else 0.0}
            for name, run in runs.items()}


def shift_ratio(model, settings, args, vocab) -> int:
    """Mean step of a bounded cache at a long context over the mean full-cache step at context ``cache_size``
    (the same number of cached tokens): LaCache in both ways of rotating keys (``CompressedCache(key_rotation=...)``)
    and StreamingLLM, at ``--batch_size`` rows; the median over ``--rounds`` rounds."""
    context, b = max(int(c) for c in args.contexts.split(",")), args.batch_size
    rounds = [interleaved_round(model, settings, args, vocab) for _ in tqdm(range(args.rounds), desc="rounds")]

    def med(name, key):
        return statistics.median(r[name][key] for r in rounds)

    f = med("full", "mean_step_ms")
    print(f"batch {b}: full cache, context {args.cache_size}: step {f:.2f} ms (mean over steps, median of "
          f"{args.rounds} rounds)")
    ratios = {}
    for name in list(RATIO_RUNS)[1:]:
        ratios[name] = statistics.median(r[name]["mean_step_ms"] / r["full"]["mean_step_ms"] for r in rounds)
        print(f"batch {b}: {name} (cache {args.cache_size}, span {settings['span']}, overlap {settings['overlap']}), "
              f"context {context}: step {med(name, 'mean_step_ms'):.2f} ms, of which "
              f"{med(name, 'compaction_ms_per_token'):.2f} ms in the cache's step; ratio to full@{args.cache_size} = "
              f"{ratios[name]:.3f} (median of the rounds' ratios)")
    rotate = rotation_ms(model, args.cache_size, args.device)
    print(f"rotating {args.cache_size} cached keys and one query in every layer costs {rotate:.2f} ms "
          "(what every_step pays at each step, batch 1)")
    out = Path(args.output)
    write_json(out, run_record(vars(args), rounds=rounds, ratios=ratios, rotation_ms=rotate))
    print(f"results: {out}")
    return 0


def rotation_ms(model, n, device, reps=50) -> float:
    """Time of the per-step rotation alone: ``n`` keys and one query per layer, with the model's own RoPE."""
    attn = model.get_decoder().layers[0].self_attn
    rotation, cfg = attn._lacache_rotation, model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    key = torch.randn(1, cfg.num_key_value_heads, n, head_dim, device=device, dtype=dtype)
    query = torch.randn(1, cfg.num_attention_heads, 1, head_dim, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            for _ in range(cfg.num_hidden_layers):
                rotation.from_slot(key, 0)
                rotation.from_slot(query, n - 1)
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def report(row):
    print(f"{row['method']:>22} ctx {row['context']:>6}: step {row['step_ms']:.2f} ms "
          f"(compaction {row['compaction_ms_per_token']:.3f} ms/token), {row['tokens_per_s']:.1f} tok/s, "
          f"KV {row['kv_bytes'] / 2**20:.2f} MiB", flush=True)


def _summarise(rows, args, span, overlap):
    print("\n| context | method | step ms | compaction ms/token | tokens/s | KV MiB | RSS MiB |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['method']} | {r['step_ms']:.2f} | {r['compaction_ms_per_token']:.3f} | "
              f"{r['tokens_per_s']:.1f} | {r['kv_bytes'] / 2**20:.2f} | {r['rss_bytes'] / 2**20:.0f} |")
    by = {(r["context"], r["method"]): r for r in rows}
    for context in sorted({r["context"] for r in rows}):
        if (context, "lacache") in by and (context, "streamingllm") in by:
            ratio = by[(context, "lacache")]["step_ms"] / by[(context, "streamingllm")]["step_ms"]
            print(f"context {context}: LaCache step / StreamingLLM step = {ratio:.3f}")
        if (context, "lacache") in by and (context, "lacache-official-slow") in by:
            ours, slow = by[(context, "lacache")], by[(context, "lacache-official-slow")]
            print(f"context {context}: official slow way / ours: per-token overhead "
                  f"{slow['compaction_ms_per_token'] / max(ours['compaction_ms_per_token'], 1e-9):.1f}x, "
                  f"step {slow['step_ms'] / ours['step_ms']:.2f}x")
    out = Path(args.output)
    write_json(out, run_record(vars(args) | {"span": span, "overlap": overlap}, rows=rows))
    png = plot(rows, out.with_suffix(".png"))
    print(f"results: {out}" + (f"  plot: {png}" if png else ""))


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
