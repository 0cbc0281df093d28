"""Streaming perplexity, token by token (the paper's Table 1 / Table 2 / PG-19 protocol).

Without flags it runs the embedded SmolLM2-135M-Instruct offline on the Wikipedia corpus and
compares full cache, StreamingLLM and LaCache at one budget. With the official flags
(``--model_name_or_path ... --enable_lacache --cache_size 256 --span 16 --overlap 0 ...``) it
reproduces the official script's perplexity.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lacache_core import METHODS, ConfigError, build_policy  # noqa: E402
from lacache_core.cache import KEY_ROTATIONS  # noqa: E402
from lacache_core.cli import add_policy_flags, method_settings  # noqa: E402
from lacache_core.data import load_texts  # noqa: E402
from lacache_core.models import DEFAULT_MODEL, load_model  # noqa: E402
from lacache_core.plots import running_ppl_plot  # noqa: E402
from lacache_core.runlog import run_record, write_json  # noqa: E402
from lacache_core.streaming import (QUERY_POSITIONS, checkpoints, load_checkpoint,  # noqa: E402
                                    stream_perplexity)

COMPARE = ["full", "streamingllm", "lacache"]
DEFAULT_COMPARE_TOKENS = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=methods_help())
    p.add_argument("--model_name_or_path", default=None,
                   help=f"hub name, local folder, or {DEFAULT_MODEL!r} (embedded, offline; the default)")
    p.add_argument("--dataset_name", default="wiki",
                   help="hub name (wikitext, emozilla/pg19-test), local .txt/.jsonl/.json/.parquet or saved dataset "
                        "folder, or offline corpus 'wiki' (default) / 'pg-essays'")
    p.add_argument("--task", default=None, help="dataset config (default wikitext-2-raw-v1 for wikitext)")
    p.add_argument("--split", default="test")
    p.add_argument("--num_eval_tokens", type=int, default=None,
                   help=f"stop after scoring num_eval_tokens + 1 tokens (default: all; {DEFAULT_COMPARE_TOKENS} in the "
                        "no-flag comparison)")
    p.add_argument("--enable_lacache", action="store_true", help="official flag: same as --method lacache")
    p.add_argument("--method", default=None,
                   help=f"comma list of {sorted(METHODS)}; default: lacache with --enable_lacache, the comparison "
                        f"{','.join(COMPARE)} without --model_name_or_path, else full (as the official script)")
    p.add_argument("--cache_size", type=int, default=256, help="KV budget in tokens per layer (all methods)")
    p.add_argument("--start_size", type=int, default=4, help="leading tokens kept by every method (attention sinks)")
    p.add_argument("--recent_size", type=int, default=None, help="StreamingLLM window (default cache_size - start_size)")
    add_policy_flags(p)
    p.add_argument("--query_position", choices=QUERY_POSITIONS, default="slot",
                   help="slot: query at its key's cache slot; official: reproduce the official harness's drift")
    p.add_argument("--key_rotation", choices=KEY_ROTATIONS, default="auto",
                   help="every_step: store keys un-rotated and rotate all at each step (official); incremental: store "
                        "them rotated, re-rotate kept keys by their shift at each compaction; auto: incremental where "
                        "exact or float32-accurate (see CompressedCache)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--attn_implementation", default=None, choices=[None, "eager", "sdpa", "flash_attention_2"])
    p.add_argument("--output_dir", default="outputs/ppl")
    p.add_argument("--overwrite", action="store_true", help="rerun methods whose results already exist")
    p.add_argument("--checkpoint_every", type=int, default=1000,
                   help="save the stream state (NLLs, policy, KV cache) every N scored tokens so that an interrupted "
                        "run resumes where it stopped; 0 disables (default 1000)")
    args = p.parse_args(argv)
    if args.num_eval_tokens is not None and args.num_eval_tokens < 1:
        p.error(f"--num_eval_tokens must be >= 1, got {args.num_eval_tokens}")
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint_every must be >= 0, got {args.checkpoint_every}")
    if args.method is None:
        args.method = "lacache" if args.enable_lacache else (",".join(COMPARE) if args.model_name_or_path is None else "full")
        if args.model_name_or_path is None and args.num_eval_tokens is None:
            args.num_eval_tokens = DEFAULT_COMPARE_TOKENS
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"--method must be a comma list of {sorted(METHODS)}, got {m!r}")
    args.methods = methods
    args.model_name_or_path = args.model_name_or_path or DEFAULT_MODEL
    if args.dataset_name == "wikitext" and args.task is None:
        args.task = "wikitext-2-raw-v1"
    if args.recent_size is None:
        args.recent_size = args.cache_size - args.start_size
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def methods_help() -> str:
    lines = ["methods (--method NAME) and the flags they read:"]
    for name, cls in METHODS.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<13} {summary}")
        lines.append(f"  {'':<13} hyper-parameters: {', '.join(cls.hyperparameters()) or '-'}")
    return "\n".join(lines)


def policy_settings(args):
    return dict(cache_size=args.cache_size, start_size=args.start_size, recent_size=args.recent_size,
                **method_settings(args))


def run_tag(args, method: str) -> str:
    model = Path(args.model_name_or_path.rstrip("/")).name
    data = Path(args.dataset_name.rstrip("/")).name.replace("/", "_")
    tag = f"{model}__{data}__{method}"
    if method == "lacache":
        tag += f"_c{args.cache_size}_s{args.span}_o{args.overlap}" + ("_nocomp" if args.no_compensate else "")
        tag += "_paper" if args.ladder_layout == "paper" else ""
    elif method == "streamingllm":
        tag += f"_c{args.start_size + args.recent_size}"
    elif method == "h2o":
        tag += f"_c{args.cache_size}_r{args.recent_ratio:g}"
    elif method == "lshe":
        tag += f"_c{args.cache_size}_b{args.lsh_dim}_w{args.recent_window}"
    elif method != "full":
        tag += f"_c{args.cache_size}"
    if args.query_position != "slot":
        tag += f"_q{args.query_position}"
    if args.key_positions and method != "full":
        tag += f"_k{args.key_positions}"
    if args.key_rotation != "auto" and method != "full":
        tag += f"_r{args.key_rotation}"
    return tag + f"__n{args.num_eval_tokens or 'all'}__{args.dtype}"


RUN_ONLY_ARGS = ("output_dir", "overwrite", "checkpoint_every", "method", "methods", "device")


def identity(args, method: str) -> dict:
    """The arguments that decide a run's numbers (a checkpoint resumes only a run with the same ones)."""
    return {k: v for k, v in vars(args).items() if k not in RUN_ONLY_ARGS} | {"method": method}


def run_method(args, method, model, tokenizer, texts):
    out_dir = Path(args.output_dir) / run_tag(args, method)
    summary_path, nll_path, ckpt_path = out_dir / "summary.json", out_dir / "nlls.txt", out_dir / "resume.pt"
    if summary_path.exists() and not args.overwrite:
        done = json.loads(summary_path.read_text())
        if done.get("complete"):
            print(f"[{method}] already done in {out_dir} (use --overwrite to rerun)")
            print(f"ppl: {done['results']['ppl']}")
            return done["results"], _read_nlls(nll_path)
    policy = build_policy(method, **policy_settings(args))
    resume = None
    if ckpt_path.exists() and not args.overwrite:
        state = load_checkpoint(ckpt_path)
        if state["meta"].get("identity") == identity(args, method):
            resume = state
            print(f"[{method}] resuming after {len(state['nlls'])} scored tokens from {ckpt_path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(summary_path, run_record(vars(args) | {"method": method}, policy=policy.settings(), complete=False))
    with open(nll_path, "w") as sink:
        for nll in (resume or {}).get("nlls", []):  # the file holds exactly the tokens the stream has scored
            sink.write(f"{nll:.6f}\n")

        def append(i, nll):
            sink.write(f"{nll:.6f}\n")
            sink.flush()

        res = stream_perplexity(model, tokenizer, texts, policy, args.num_eval_tokens, args.query_position,
                                on_token=append, desc=method, checkpoint=ckpt_path,
                                checkpoint_every=args.checkpoint_every, resume=resume,
                                meta={"identity": identity(args, method)}, key_rotation=args.key_rotation)
    num_layers = model.config.num_hidden_layers
    results = {
        "ppl": res.ppl, "checkpoints": checkpoints(res.nlls), "tokens_scored": len(res.nlls),
        "tokens_per_s": res.tokens_per_s, "seconds": res.seconds, "peak_kv_bytes": res.peak_kv_bytes,
        "max_cache_len": policy.max_cache_len(num_layers), "resumed": resume is not None,
    }
    write_json(summary_path, run_record(vars(args) | {"method": method}, policy=policy.settings(),
                                        results=results, complete=True))
    ckpt_path.unlink(missing_ok=True)  # only needed to resume; can be large for a full cache
    running_ppl_plot({method: res.nlls}, out_dir / "running_ppl.png", f"{run_tag(args, method)}")
    print(f"[{method}] results in {out_dir}")
    print(f"ppl: {res.ppl}")
    return results, res.nlls


def _read_nlls(path: Path):
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def comparison_table(rows) -> str:
    marks = sorted({k for _, r in rows for k in r["checkpoints"]}, key=lambda k: int(k[:-1]))
    head = "| method | max cache | ppl | " + "".join(f"ppl@{k} | " for k in marks) + "tokens/s | peak KV MiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, r in rows:
        cps = "".join(f"{r['checkpoints'].get(k, float('nan')):.3f} | " for k in marks)
        cache = r["max_cache_len"] if r["max_cache_len"] is not None else "all"
        lines.append(f"| {method} | {cache} | {r['ppl']:.3f} | {cps}{r['tokens_per_s']:.1f} | "
                     f"{r['peak_kv_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def main(argv=None, legacy: bool = False) -> int:
    args = parse_args(argv)
    try:
        if legacy:
            from lacache_core.versions import HAS_CACHE_CLASSES
            if HAS_CACHE_CLASSES:
                raise ConfigError("ppl_legacy/run.py needs transformers < 4.36 (tuple caches); use ppl/run.py")
        for method in args.methods:  # reject bad settings before loading anything
            build_policy(method, **policy_settings(args))
        texts = load_texts(args.dataset_name, args.task, args.split)
        model, tokenizer = load_model(args.model_name_or_path, args.dtype, args.device, args.attn_implementation)
        for method in args.methods:
            build_policy(method, **policy_settings(args)).bind(model.config.num_hidden_layers)
        rows, curves = [], {}
        for method in args.methods:
            results, nlls = run_method(args, method, model, tokenizer, texts)
            rows.append((method, results))
            curves[method] = nlls
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(rows) > 1:
        table = comparison_table(rows)
        out = Path(args.output_dir)
        (out / "comparison.md").write_text(
            f"model {args.model_name_or_path}, data {args.dataset_name}, cache {args.cache_size}, "
            f"span {args.span}, overlap {args.overlap}, start {args.start_size}\n\n{table}\n")
        running_ppl_plot(curves, out / "comparison.png", f"{args.model_name_or_path} on {args.dataset_name}")
        print(table)
        print(f"table: {out / 'comparison.md'}  plot: {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
