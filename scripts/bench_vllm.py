"""Serving many long requests from a small KV pool: plain vLLM against vLLM with LaCache or StreamingLLM.

Every engine gets the same pool of ``--pool_blocks`` KV blocks (``num_gpu_blocks_override``), sized to hold only a
few requests at full length (``--prompt_tokens + --new_tokens``), and the same ``--requests`` requests, submitted
at once, each generating ``--new_tokens`` greedy tokens. Per engine it reports the wall time, generated tokens per
second, requests completed, preemptions (a request whose blocks were taken back, to be recomputed later), the most
requests running at once, and the blocks a request held at its peak. Run in ``.venv-vllm``:

    .venv-vllm/bin/python scripts/bench_vllm.py                      # SmolLM2-135M (embedded), CPU build
    .venv-vllm/bin/python scripts/bench_vllm.py --requests 32 --pool_blocks 128 --dtype bfloat16   # on a GPU

The record (settings, versions, figures) goes to ``outputs/bench_vllm/<date>.json``; the table is printed.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, to count in it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.runlog import ROOT, run_record, write_json  # noqa: E402
from lacache_core.errors import ConfigError  # noqa: E402

ENGINES = {
    "vLLM": None,
    "vLLM + LaCache": {"method": "lacache", "span": 7, "overlap": 3, "start_size": 4},
    "vLLM + StreamingLLM": {"method": "streamingllm", "start_size": 4},
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a Hugging Face folder, or smollm2-135m (embedded)")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=512)
    p.add_argument("--cache_size", type=int, default=256, help="the compressed engines' budget, slots per layer")
    p.add_argument("--pool_blocks", type=int, default=80, help="KV blocks of the pool, shared by all requests")
    p.add_argument("--block_size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {list(ENGINES)}")
    args = p.parse_args(argv)
    for name in ("requests", "prompt_tokens", "new_tokens", "cache_size", "pool_blocks", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    full = args.prompt_tokens + args.new_tokens
    if args.pool_blocks * args.block_size < full:
        p.error(f"--pool_blocks {args.pool_blocks} x --block_size {args.block_size} must hold one request at full "
                f"length, {full} tokens (vLLM's own start-up check)")
    unknown = [e for e in args.engines.split(",") if e not in ENGINES]
    if unknown:
        p.error(f"--engines: {unknown[0]!r} is not one of {list(ENGINES)}")
    return args


def prompts(tokenizer, count, length):
    """``count`` different prompts of ``length`` tokens, cut from this project's README at different places."""
    ids = tokenizer((ROOT / "README.md").read_text()).input_ids
    if len(ids) < length + count * 7:
        ids = ids * (1 + (length + count * 7) // len(ids))
    return [ids[7 * j:7 * j + length] for j in range(count)]


def watch(core):
    """Count, in the engine core, preemptions, requests running at once, and each request's blocks."""
    seen = {"preemptions": 0, "running": 0, "blocks": {}}
    scheduler, manager = core.scheduler, core.scheduler.kv_cache_manager
    preempt, schedule, allocate = scheduler._preempt_request, scheduler.schedule, manager.allocate_slots
    single = manager.coordinator.single_type_managers[0]

    def _preempt_request(*args, **kwargs):
        seen["preemptions"] += 1
        return preempt(*args, **kwargs)

    def _schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        seen["running"] = max(seen["running"], len(scheduler.running))
        return out

    def _allocate_slots(request, *args, **kwargs):
        out = allocate(request, *args, **kwargs)
        held = len(single.req_to_blocks.get(request.request_id, ()))
        seen["blocks"][request.request_id] = max(seen["blocks"].get(request.request_id, 0), held)
        return out

    scheduler._preempt_request, scheduler.schedule, manager.allocate_slots = _preempt_request, _schedule, _allocate_slots
    return seen


def run_engine(name, args, model_path, batch):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    method = ENGINES[name]
    extra = {} if method is None else {"kv_compression": {**method, "cache_size": args.cache_size}}
    llm = LLM(model_path, enforce_eager=True, dtype=args.dtype, enable_prefix_caching=False, seed=0,
              block_size=args.block_size, max_model_len=args.prompt_tokens + args.new_tokens,
              num_gpu_blocks_override=args.pool_blocks, additional_config=extra)
    seen = watch(llm.llm_engine.engine_core.engine_core)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    blocks = list(seen["blocks"].values())
    return {"engine": name, "kv_compression": extra.get("kv_compression"), "wall_s": round(wall, 2),
            "tokens_per_s": round(generated / wall, 1),
            "completed": sum(len(o.outputs[0].token_ids) == args.new_tokens for o in outs),
            "preemptions": seen["preemptions"], "most_running": seen["running"],
            "peak_blocks_max": max(blocks), "peak_blocks_mean": round(statistics.mean(blocks), 1)}


def table(rows, args):
    lines = [f"| engine | completed | wall (s) | tokens/s | preemptions | most running at once | peak blocks per "
             f"request (max / mean) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['completed']}/{args.requests} | {r['wall_s']} | {r['tokens_per_s']} | "
                     f"{r['preemptions']} | {r['most_running']} | {r['peak_blocks_max']} / {r['peak_blocks_mean']} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    from transformers import AutoTokenizer

    from harness.models import resolve_model_path

    try:
        model_path = resolve_model_path(args.model)
    except ConfigError as err:
        sys.exit(f"error: {err} (or convert it once with `.venv/bin/python -m harness.models`)")
    batch = prompts(AutoTokenizer.from_pretrained(model_path), args.requests, args.prompt_tokens)
    rows = [run_engine(name, args, model_path, batch) for name in args.engines.split(",")]
    import vllm

    record = run_record(vars(args), vllm=vllm.__version__, model_path=model_path, results=rows)
    out = ROOT / "outputs" / "bench_vllm" / f"{record['date'].replace(':', '')}.json"
    write_json(out, record)
    print(table(rows, args))
    print(f"record: {out}")


if __name__ == "__main__":
    main()
