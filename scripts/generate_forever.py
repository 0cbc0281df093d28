"""Continuous generation in fixed memory: LaCache (or any method) through ``model.generate``.

Prints tokens/s, KV-cache bytes and process memory every ``--report_every`` tokens, and writes a
JSON log and a PNG of memory over generated tokens.

    python scripts/generate_forever.py --tokens 16384                 # embedded SmolLM2-135M
    python scripts/generate_forever.py --model tiny --tokens 100000   # small random model
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser, as_flags  # noqa: E402
from harness.runner import check_output_file, run_main  # noqa: E402

from lacache_core import ConfigError, enable_position_shift, make_cache  # noqa: E402
from lacache_core.versions import with_cache  # noqa: E402
from harness.models import device_arg, load_model  # noqa: E402
from harness.runlog import process_rss_bytes, run_record, write_json  # noqa: E402


class Reporter:
    """A ``generate`` streamer that logs speed and memory every ``every`` tokens."""

    def __init__(self, cache, every: int, total: int):
        self.cache, self.every, self.total = cache, every, total
        self.count, self.start, self.last, self.log = -1, time.perf_counter(), time.perf_counter(), []

    def put(self, value):
        self.count += 1  # the first call carries the prompt
        if self.count and self.count % self.every == 0:
            now = time.perf_counter()
            row = {"tokens": self.count, "tokens_per_s": self.every / (now - self.last), "elapsed_s": now - self.start,
                   "kv_bytes": self.cache.kv_bytes(), "rss_bytes": process_rss_bytes(),
                   "cache_len": self.cache.get_seq_length()}
            self.log.append(row)
            self.last = now
            print(f"{row['tokens']:>8}/{self.total} tokens  {row['tokens_per_s']:7.1f} tok/s  "
                  f"KV {row['kv_bytes'] / 2**20:8.2f} MiB  RSS {row['rss_bytes'] / 2**20:8.1f} MiB  "
                  f"cache {row['cache_len']}", flush=True)

    def end(self):
        pass


def tiny_model(device):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device).eval(), None


def plot(log, path: Path, title: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x = [r["tokens"] for r in log]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.plot(x, [r["kv_bytes"] / 2 ** 20 for r in log], label="KV cache")
    ax1.plot(x, [r["rss_bytes"] / 2 ** 20 for r in log], label="process RSS")
    ax1.set(xlabel="generated tokens", ylabel="MiB", title=title, ylim=(0, None))
    ax2.plot(x, [r["tokens_per_s"] for r in log])
    ax2.set(xlabel="generated tokens", ylabel="tokens/s", ylim=(0, None))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name/path, or 'tiny' (random 4-layer Llama, hidden 64)")
    p.add_argument("--method", default="lacache")
    p.add_argument("--tokens", type=int, default=16384, help="tokens to generate")
    p.add_argument("--cache_size", type=int, default=256)
    p.add_argument("--span", type=int, default=None, help="LaCache span (default num_layers // 4)")
    p.add_argument("--overlap", type=int, default=None, help="LaCache overlap (default span // 2)")
    p.add_argument("--report_every", type=int, default=1024)
    p.add_argument("--prompt", default="Write a very long story about a lighthouse keeper.")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.8) instead of greedy decoding")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--output", default="outputs/generate_forever/run.json")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.report_every < 1:
        p.error("--tokens and --report_every must be >= 1")
    check_output_file(args.output)
    try:
        if args.model == "tiny":
            model, tok = tiny_model(args.device)
            prompt = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0)).to(args.device)
        else:
            model, tok = load_model(args.model, args.dtype, args.device)
            prompt = tok(args.prompt, return_tensors="pt").input_ids.to(args.device)
        layers = model.config.num_hidden_layers
        span = args.span or max(1, layers // 4)
        overlap = span // 2 if args.overlap is None else args.overlap
        enable_position_shift(model)
        cache = make_cache(args.method, model, cache_size=args.cache_size, recent_size=args.cache_size - 4,
                           span=span, overlap=overlap)
    except ConfigError as err:
        print(f"error: {as_flags(str(err))}", file=sys.stderr)
        return 2
    reporter = Reporter(cache, args.report_every, args.tokens)
    start = time.perf_counter()
    sampling = {"do_sample": True, "temperature": 0.8, "top_k": 50} if args.sample else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(prompt, **with_cache(cache), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                             streamer=reporter, pad_token_id=0, **sampling)
    seconds = time.perf_counter() - start
    kv = [r["kv_bytes"] for r in reporter.log]
    # LaCache's length saw-tooths by up to R slots between compactions; "flat" means no growth
    spread = (max(kv) - min(kv)) / max(kv) if kv else 0.0
    growth = (kv[-1] - kv[0]) / kv[0] if kv else 0.0
    out_path = Path(args.output)
    write_json(out_path, run_record(vars(args) | {"span": span, "overlap": overlap}, seconds=seconds,
                                    generated=int(out.shape[1] - prompt.shape[1]), kv_spread=spread, kv_growth=growth,
                                    max_cache_len=cache.policy.max_cache_len(layers), log=reporter.log))
    png = plot(reporter.log, out_path.with_suffix(".png"), f"{args.model}, {args.method}, cache {args.cache_size}")
    print(f"generated {out.shape[1] - prompt.shape[1]} tokens in {seconds:.0f} s; KV memory: first {kv[0] / 2**20:.3f} "
          f"MiB, last {kv[-1] / 2**20:.3f} MiB (growth {100 * growth:+.2f}%), spread {100 * spread:.2f}% (saw-tooth "
          f"of at most {cache.policy.max_cache_len(layers)} slots); log {out_path}" + (f", plot {png}" if png else ""))
    if tok is not None:
        print("tail of the text:", repr(tok.decode(out[0, -200:])))
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
