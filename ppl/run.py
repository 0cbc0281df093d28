"""Streaming perplexity, token by token (the paper's Table 1 / Table 2 / PG-19 protocol).

Without flags it runs the embedded SmolLM2-135M-Instruct offline on the Wikipedia corpus and
compares full cache, StreamingLLM and LaCache at one budget. With the official flags
(``--model_name_or_path ... --enable_lacache --cache_size 256 --span 16 --overlap 0 ...``) it
reproduces the official script's perplexity.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.data import load_texts  # noqa: E402
from harness.flags import (add_method_flags, method_settings, method_tag, parser, quant_identity, quant_setting,  # noqa: E402
                           read_identity, read_setting)
from harness.models import DEFAULT_MODEL  # noqa: E402
from harness.plots import running_ppl_plot  # noqa: E402
from harness.runner import (Run, add_model_flags, add_official_method_flag, add_output_flags, add_skip_flag,  # noqa: E402
                            apply_official_method_flag, check_run_flags, cli, load)
from harness.streaming import (QUERY_POSITIONS, BatchStreamResult, check_batchable, checkpoints,  # noqa: E402
                               load_checkpoint, perplexity_problem, running_ppl, scoreable_tokens, split_streams,
                               stream_perplexity, stream_perplexity_batched, stream_tokens)
from lacache_core import ConfigError, build_policy  # noqa: E402
from lacache_core.policies import METHODS  # noqa: E402

COMPARE = ["full", "streamingllm", "lacache"]
DEFAULT_COMPARE_TOKENS = 1000


def parse_args(argv=None):
    p, g = parser(__doc__)
    p.epilog = methods_help()
    add_model_flags(g["model"], default=None,
                    help=f"hub name, local folder, or {DEFAULT_MODEL!r} (embedded SmolLM2-135M-Instruct, offline; the "
                         "default, which also runs the full/streamingllm/lacache comparison)")
    g["data"].add_argument("--dataset_name", default="wiki",
                           help="hub name (wikitext, emozilla/pg19-test), local .txt/.jsonl/.json/.parquet or saved "
                                "dataset folder, or offline corpus 'wiki' (default) / 'pg-essays'")
    g["data"].add_argument("--task", default=None, help="dataset config (default wikitext-2-raw-v1 for wikitext)")
    g["data"].add_argument("--split", default="test")
    g["data"].add_argument("--num_eval_tokens", type=int, default=None,
                           help=f"stop after scoring num_eval_tokens + 1 tokens (default: all; {DEFAULT_COMPARE_TOKENS} "
                                "in the no-flag comparison)")
    g["data"].add_argument("--batch_size", type=int, default=1,
                           help="N > 1: cut the scored tokens into N consecutive chunks and stream them at once, "
                                "each chunk from an empty cache, one NLL log per stream (nlls_stream<j>.txt); "
                                "every decode-time method (default 1: one stream, the official protocol)")
    add_skip_flag(g["data"])
    add_official_method_flag(g["method"])
    add_method_flags(g["method"], default_method=None, cache_size=256, start_size=4, prefill_chunks=False,
                     start_help="leading tokens kept by every method (attention sinks; default 4)")
    g["method"].add_argument("--query_position", choices=QUERY_POSITIONS, default="slot",
                             help="slot: query at its key's cache slot; official: reproduce the official harness's "
                                  "drift")
    add_output_flags(g["output"], "outputs/ppl")
    g["output"].add_argument("--overwrite", action="store_true", help="rerun methods whose results already exist")
    g["output"].add_argument("--checkpoint_every", type=int, default=1000,
                             help="save the stream state (NLLs, policy, KV cache) every N scored tokens so that an "
                                  "interrupted run resumes where it stopped; 0 disables (default 1000)")
    args = p.parse_args(argv)
    if args.num_eval_tokens is not None and args.num_eval_tokens < 1:
        raise ConfigError(f"--num_eval_tokens must be >= 1, got {args.num_eval_tokens}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint_every must be >= 0, got {args.checkpoint_every}")
    if args.method is None and args.model_name_or_path is None and args.num_eval_tokens is None:
        args.num_eval_tokens = DEFAULT_COMPARE_TOKENS
    apply_official_method_flag(args)
    if args.method is None:
        args.method = ",".join(COMPARE) if args.model_name_or_path is None else "full"
    args.model_name_or_path = args.model_name_or_path or DEFAULT_MODEL
    if args.dataset_name == "wikitext" and args.task is None:
        args.task = "wikitext-2-raw-v1"
    check_run_flags(args)
    return args


def methods_help() -> str:
    lines = ["methods (--method NAME) and the flags they read:"]
    for name, cls in METHODS.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<13} {summary}")
        lines.append(f"  {'':<13} hyper-parameters: {', '.join(cls.hyperparameters()) or '-'}")
    return "\n".join(lines)


def make_policy(args, method: str):
    settings = method_settings(args, method)
    settings.pop("key_rotation"), settings.pop("quant"), settings.pop("read")
    return build_policy(method, cache_size=args.cache_size, start_size=args.start_size, **settings)


def setting(args, method: str) -> dict:
    """Everything that decides this run's numbers (the folder's hash and the checkpoint's key)."""
    policy = make_policy(args, method).settings()
    cache = {"dtype": args.dtype, "attn_implementation": args.attn_implementation}
    if method != "full":
        cache.update(query_position=args.query_position, key_rotation=args.key_rotation)
    if quant_setting(args) is not None:  # none keeps the old hashes
        cache["quant"] = quant_identity(args)
    if read_setting(args) is not None:
        cache["read"] = read_identity(args)
    data = {"dataset": args.dataset_name, "task": args.task, "split": args.split,
            "num_eval_tokens": args.num_eval_tokens}
    if args.batch_size > 1:  # other streams, other numbers (one stream's settings keep their hash)
        data["batch_size"] = args.batch_size
    return {"model": args.model_identity, "data": data,
            "method": policy, "cache": cache, "seed": None}


def run_name(args, method: str) -> str:
    model = Path(args.model_name_or_path.rstrip("/")).name
    data = Path(args.dataset_name.rstrip("/")).name.replace("/", "_")
    tag = method_tag(args, method) + ("" if args.query_position == "slot" or method == "full"
                                      else f"_q{args.query_position}")
    streams = f"_bs{args.batch_size}" if args.batch_size > 1 else ""
    return f"{model}__{data}__{tag}__n{args.num_eval_tokens or 'all'}{streams}"


def run_method(args, method, model, tokenizer, texts):
    run = Run(args.output_dir, run_name(args, method), setting(args, method), args)
    out_dir = run.folder
    nll_path, ckpt_path = out_dir / "nlls.txt", out_dir / "resume.pt"
    if run.complete and not args.overwrite:
        print(f"[{method}] already done in {out_dir} (use --overwrite to rerun)")
        print(f"ppl: {run.previous['results']['ppl']}")
        if args.batch_size > 1:
            rows = [_read_nlls(out_dir / f"nlls_stream{j}.txt") for j in range(args.batch_size)]
            return run.previous["results"], BatchStreamResult(nlls=rows).step_major()
        return run.previous["results"], _read_nlls(nll_path)
    policy = make_policy(args, method)
    resume = None
    if ckpt_path.exists() and not args.overwrite:
        state = load_checkpoint(ckpt_path)
        if state["meta"].get("setting") == run.setting:
            resume = state
            done = sum(map(len, state["nlls"])) if args.batch_size > 1 else len(state["nlls"])
            print(f"[{method}] resuming after {done} scored tokens from {ckpt_path}")
    run.start(policy=policy.settings())
    if args.batch_size > 1:
        res = _stream_batch(args, method, model, tokenizer, texts, policy, run, resume)
        return _finish(args, method, run, policy, res, resume, model.config.num_hidden_layers)
    with open(nll_path, "w") as sink:
        for nll in (resume or {}).get("nlls", []):  # the file holds exactly the tokens the stream has scored
            sink.write(f"{nll:.6f}\n")

        def append(i, nll):
            sink.write(f"{nll:.6f}\n")
            sink.flush()

        res = stream_perplexity(model, tokenizer, texts, policy, args.num_eval_tokens, args.query_position,
                                on_token=append, desc=method, checkpoint=ckpt_path,
                                checkpoint_every=args.checkpoint_every, resume=resume,
                                meta={"setting": run.setting}, key_rotation=args.key_rotation,
                                quant=quant_setting(args), read=read_setting(args))
    return _finish(args, method, run, policy, res, resume, model.config.num_hidden_layers)


def _stream_batch(args, method, model, tokenizer, texts, policy, run, resume):
    """``--batch_size N``: N chunks of the scored tokens at once, each stream's NLLs in its own log."""
    limit = None if args.num_eval_tokens is None else args.num_eval_tokens + 1
    streams = split_streams(stream_tokens(tokenizer, texts, limit), args.batch_size)
    paths = [run.folder / f"nlls_stream{j}.txt" for j in range(args.batch_size)]
    sinks = [open(path, "w") for path in paths]
    try:
        for sink, done in zip(sinks, (resume or {}).get("nlls", [[]] * len(sinks))):
            sink.writelines(f"{nll:.6f}\n" for nll in done)  # each log holds exactly what its stream has scored

        def append(step, nlls):
            for sink, nll in zip(sinks, nlls):
                sink.write(f"{nll:.6f}\n")
                sink.flush()

        return stream_perplexity_batched(model, streams, policy, args.query_position, on_step=append, desc=method,
                                         checkpoint=run.folder / "resume.pt", checkpoint_every=args.checkpoint_every,
                                         resume=resume, meta={"setting": run.setting}, key_rotation=args.key_rotation,
                                         quant=quant_setting(args), read=read_setting(args))
    finally:
        for sink in sinks:
            sink.close()


def _finish(args, method, run, policy, res, resume, num_layers: int):
    """Write the run's results (one stream or several), its plot, and drop the checkpoint."""
    batched = isinstance(res, BatchStreamResult)
    nlls = res.step_major() if batched else res.nlls
    problem = perplexity_problem(nlls)
    if problem is not None:  # never a result: run.json stays incomplete
        raise ConfigError(f"[{method}] perplexity on --dataset_name {args.dataset_name} is not finite, so not recorded "
                          f"as a result: {problem}")
    results = {
        "ppl": res.ppl, "checkpoints": checkpoints(nlls), "tokens_scored": len(nlls),
        "tokens_per_s": res.tokens_per_s, "seconds": res.seconds, "peak_kv_bytes": res.peak_kv_bytes,
        "max_cache_len": policy.max_cache_len(num_layers), "resumed": resume is not None,
        "skipped_rows": len(args.skipped or []),
    }
    if res.dense_read_bytes:  # --read: the bytes decode steps read, against a dense read of the same cache
        steps = len(res.nlls[0]) if batched else len(nlls)  # forward passes: a batch's streams step together
        results.update(read_bytes_per_step=res.read_bytes / steps, dense_read_bytes_per_step=res.dense_read_bytes
                       / steps, read_fraction=res.read_bytes / res.dense_read_bytes)
    if batched:
        results.update(batch_size=args.batch_size, tokens_per_stream=len(res.nlls[0]),
                       stream_ppl=[running_ppl(row, len(row)) for row in res.nlls])
    run.finish(policy=policy.settings(), results=results)
    (run.folder / "resume.pt").unlink(missing_ok=True)  # only needed to resume; can be large for a full cache
    running_ppl_plot({method: nlls}, run.folder / "running_ppl.png", run_name(args, method))
    print(f"[{method}] results in {run.folder}")
    print(f"ppl: {res.ppl}")
    return results, nlls


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


def _main(args, legacy: bool = False) -> int:
    if legacy:
        from lacache_core.versions import HAS_CACHE_CLASSES
        if HAS_CACHE_CLASSES:
            raise ConfigError("ppl_legacy/run.py needs transformers < 4.36 (tuple caches); use ppl/run.py")
    for method in args.methods:  # reject bad settings before loading anything
        check_batchable(make_policy(args, method), args.batch_size)
    args.skipped = [] if args.skip_bad_rows else None
    texts = load_texts(args.dataset_name, args.task, args.split, skipped=args.skipped)
    if args.skipped:
        print(f"note: --skip_bad_rows left out {len(args.skipped)} bad rows ({', '.join(args.skipped[:5])}"
              f"{' ...' if len(args.skipped) > 5 else ''})", file=sys.stderr)
    model, tokenizer = load(args, position_shift=False)  # stream_perplexity installs it for the methods that shift
    if scoreable_tokens(tokenizer, texts, enough=1) == 0:
        raise ConfigError(f"--dataset_name {args.dataset_name}: no scoreable tokens ({len(texts)} text(s), none of "
                          "2 or more tokens; perplexity scores every token after a text's first)")
    for method in args.methods:
        make_policy(args, method).bind(model.config.num_hidden_layers)
    rows, curves = [], {}
    for method in args.methods:
        results, nlls = run_method(args, method, model, tokenizer, texts)
        rows.append((method, results))
        curves[method] = nlls
    if len(rows) > 1:
        table = comparison_table(rows)
        out = Path(args.output_dir)
        (out / "comparison.md").write_text(
            f"model {args.model_name_or_path}, data {args.dataset_name}, cache {args.cache_size}, "
            f"methods {', '.join(method_tag(args, m) for m in args.methods)}, start {args.start_size}\n\n{table}\n")
        running_ppl_plot(curves, out / "comparison.png", f"{args.model_name_or_path} on {args.dataset_name}")
        print(table)
        print(f"table: {out / 'comparison.md'}  plot: {out / 'comparison.png'}")
    return 0


main = cli(parse_args, _main)
legacy_main = cli(parse_args, lambda args: _main(args, legacy=True))


if __name__ == "__main__":
    sys.exit(main())
