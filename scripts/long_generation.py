"""Long greedy generation from a short prompt: how long each method's tokens agree with the full cache's, in what memory.

For every ``--method``, greedy generation of ``--tokens`` tokens with a cache of ``--cache_size`` slots per layer,
against the same generation with the full cache. Reports, per method, the first token that differs, the share of
the first N tokens identical to the full cache's (position by position, for each N of ``--agreement_at``) and the
peak KV bytes held during generation. Writes ``run.json`` (settings, versions, tokens, results) and a markdown table.

    python scripts/long_generation.py --methods lacache,rkv --cache_size 256 --tokens 2048
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser  # noqa: E402
from harness.models import device_arg, load_model  # noqa: E402
from harness.runlog import run_record, write_json  # noqa: E402
from harness.runner import check_output_file, run_main  # noqa: E402
from lacache_core import METHODS, ConfigError, enable_position_shift, make_cache  # noqa: E402
from lacache_core.versions import with_cache  # noqa: E402


class PeakKV:
    """A ``generate`` streamer: the largest ``cache.kv_bytes()`` after any step, and a progress bar."""

    def __init__(self, cache, total: int, label: str):
        self.cache, self.peak, self.bar = cache, 0, tqdm(total=total, desc=label, unit="tok")
        self.prompt_seen = False

    def put(self, value):
        self.peak = max(self.peak, self.cache.kv_bytes())
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self):
        self.bar.close()


def generate(model, prompt, cache, tokens: int, label: str):
    streamer = PeakKV(cache, tokens, label)
    with torch.inference_mode():
        out = model.generate(prompt, **with_cache(cache), max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, streamer=streamer, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist(), streamer.peak


def agreement(ours, full, upto):
    """Share of the first ``upto`` tokens identical, position by position."""
    return sum(a == b for a, b in zip(ours[:upto], full[:upto])) / upto


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or local path")
    p.add_argument("--methods", default="lacache,rkv", help="comma-separated methods compared with the full cache")
    p.add_argument("--cache_size", type=int, default=256, help="slots per layer (each method's budget)")
    p.add_argument("--span", type=int, default=None, help="LaCache span (default num_layers // 4)")
    p.add_argument("--overlap", type=int, default=None, help="LaCache overlap (default span // 2)")
    p.add_argument("--buffer", type=int, default=None, help="R-KV buffer (default its own, 128)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens generated")
    p.add_argument("--agreement_at", default="256,512,1024,2048", help="N for the share of the first N tokens")
    p.add_argument("--prompt", default="Write a very long story about a lighthouse keeper.")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--output", default="outputs/long_generation/run.json")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods must be comma-separated names of {sorted(METHODS)}, got {args.methods!r}")
    if args.tokens < 1 or args.cache_size < 1:
        raise ConfigError(f"--tokens and --cache_size must be >= 1, got {args.tokens} and {args.cache_size}")
    try:
        at = sorted({int(n) for n in args.agreement_at.split(",")})
    except ValueError:
        raise ConfigError(f"--agreement_at must be comma-separated integers, got {args.agreement_at!r}") from None
    if not at or at[0] < 1 or at[-1] > args.tokens:
        raise ConfigError(f"--agreement_at values must be in [1, --tokens {args.tokens}], got {args.agreement_at!r}")
    check_output_file(args.output)
    model, tok = load_model(args.model, args.dtype, args.device)
    enable_position_shift(model)
    layers = model.config.num_hidden_layers
    span = args.span or max(1, layers // 4)
    overlap = span // 2 if args.overlap is None else args.overlap
    text = args.prompt
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, return_tensors="pt", add_special_tokens=not tok.chat_template).input_ids.to(args.device)
    settings = dict(cache_size=args.cache_size, recent_size=args.cache_size - 4, span=span, overlap=overlap,
                    buffer=args.buffer)
    full, full_peak = generate(model, prompt, make_cache("full", model), args.tokens, "full")
    rows = [{"method": "full", "settings": {"method": "full"}, "peak_kv_bytes": full_peak, "first_difference": None,
             "agreement": {str(n): 1.0 for n in at}, "tokens": full}]
    for method in methods:
        cache = make_cache(method, model, **settings)
        ours, peak = generate(model, prompt, cache, args.tokens, method)
        first = next((i for i, (a, b) in enumerate(zip(ours, full)) if a != b), None)
        rows.append({"method": method, "settings": cache.policy.settings(), "peak_kv_bytes": peak,
                     "first_difference": first, "agreement": {str(n): agreement(ours, full, n) for n in at},
                     "tokens": ours})
    out = Path(args.output)
    write_json(out, run_record(vars(args) | {"span": span, "overlap": overlap}, prompt_tokens=int(prompt.shape[1]),
                               results=rows))
    header = "| method | peak KV MiB | first token that differs | " + " | ".join(f"same, first {n}" for n in at) + " |"
    lines = [header, "|" + "---|" * (3 + len(at))]
    for r in rows:
        first = "-" if r["first_difference"] is None else str(r["first_difference"])
        shares = " | ".join(f"{100 * r['agreement'][str(n)]:.1f}%" for n in at)
        lines.append(f"| {r['method']} | {r['peak_kv_bytes'] / 2 ** 20:.2f} | {first} | {shares} |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
