"""KVzip's prefill cost, part by part, against SnapKV's prefill of the same prompt.

KVzip scores its prompt by reconstruction passes after it (``lacache_core.prefill`` runs them). This times, per
repeat: SnapKV's whole prefill; KVzip's prompt forward; its passes, and within them the scores
(``reconstruction_scores``, timed by a wrapper) and so the model's own forward; and the final choice
(``CompressedCache.compact``). The prompt is the first ``--prompt_tokens`` tokens of ``--dataset_name``, in the chat
template when the tokenizer has one; both methods keep ``--budget`` of it. Writes ``run.json`` (settings, versions,
every repeat) and prints the medians as a table.

    python scripts/bench_kvzip.py --prompt_tokens 1500 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.data import load_texts  # noqa: E402
from harness.flags import ArgumentParser  # noqa: E402
from harness.models import device_arg, load_model  # noqa: E402
from harness.runlog import run_record, write_json  # noqa: E402
from harness.runner import check_output_file, run_main  # noqa: E402
from lacache_core import ConfigError, enable_position_shift, make_cache, prefill  # noqa: E402
from lacache_core.policies import kvzip  # noqa: E402
from lacache_core.versions import with_cache  # noqa: E402

PARTS = ("snapkv prefill", "kvzip prefill", "prompt forward", "passes", "scores", "model in passes", "choice")


class Timer:
    """Seconds spent in the functions it wraps, summed until :meth:`take`."""

    def __init__(self):
        self.spent = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - start
        return timed

    def take(self) -> float:
        spent, self.spent = self.spent, 0.0
        return spent


def one_repeat(model, tok, ids, cache_size: int, scores: Timer) -> dict:
    extra = {"logits_to_keep": 1}
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    times = {}
    with torch.inference_mode():
        start = time.perf_counter()
        prefill(model, ids, make_cache("snapkv", model, cache_size=cache_size))
        sync()
        times["snapkv prefill"] = time.perf_counter() - start

        cache = make_cache("kvzip", model, cache_size=cache_size)
        start = time.perf_counter()
        model(ids, use_cache=True, **with_cache(cache), **extra)
        sync()
        times["prompt forward"] = time.perf_counter() - start
        start = time.perf_counter()
        for span, pass_ids in cache.policy.scoring_passes(ids, tok):
            cache.policy.begin_pass(span)
            model(pass_ids, use_cache=True, **with_cache(cache), **extra)
        sync()
        times["passes"] = time.perf_counter() - start
        times["scores"] = scores.take()
        times["model in passes"] = times["passes"] - times["scores"]
        cache.policy.end_passes()
        start = time.perf_counter()
        cache.compact()
        sync()
        times["choice"] = time.perf_counter() - start
    times["kvzip prefill"] = times["prompt forward"] + times["passes"] + times["choice"]
    times["kvzip peak KV MiB"] = cache.peak_bytes / 2 ** 20
    times["kept KV MiB"] = cache.kv_bytes() / 2 ** 20
    return times


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or local path")
    p.add_argument("--dataset_name", default="pg-essays", help="text the prompt is cut from")
    p.add_argument("--prompt_tokens", type=int, default=1500, help="prompt length before the chat template")
    p.add_argument("--budget", type=float, default=0.25, help="share of the prompt each method keeps, in (0, 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--output", default="outputs/bench/bench_kvzip/run.json")
    args = p.parse_args(argv)
    if args.prompt_tokens < 16 or args.repeats < 1:
        raise ConfigError(f"--prompt_tokens must be >= 16 and --repeats >= 1, got {args.prompt_tokens} and {args.repeats}")
    if not 0 < args.budget < 1:
        raise ConfigError(f"--budget must be in (0, 1), got {args.budget}")
    check_output_file(args.output)
    model, tok = load_model(args.model, args.dtype, args.device)
    enable_position_shift(model)
    text = "\n\n".join(load_texts(args.dataset_name))
    body = tok(text, add_special_tokens=False).input_ids[:args.prompt_tokens]
    if len(body) < args.prompt_tokens:
        raise ConfigError(f"--dataset_name {args.dataset_name}: {len(body)} tokens, fewer than --prompt_tokens "
                          f"{args.prompt_tokens}")
    content = tok.decode(body)
    if tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    else:
        ids = tok(content, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    cache_size = int(ids.shape[1] * args.budget)
    scores = Timer()
    kvzip.reconstruction_scores = scores.wrap(kvzip.reconstruction_scores)  # the policy calls it by module name
    runs = [one_repeat(model, tok, ids, cache_size, scores)
            for _ in tqdm(range(args.repeats + 1), desc="repeats (the first is a warm-up)")][1:]
    medians = {part: statistics.median(r[part] for r in runs) for part in runs[0]}
    out = Path(args.output)
    write_json(out, run_record(vars(args), prompt_tokens=int(ids.shape[1]), cache_size=cache_size, repeats=runs,
                               medians=medians))
    lines = ["| part | seconds (median) |", "|---|---|"]
    lines += [f"| {part} | {medians[part]:.2f} |" for part in PARTS]
    lines.append(f"| kvzip / snapkv prefill | {medians['kvzip prefill'] / medians['snapkv prefill']:.2f}x |")
    lines.append(f"| kvzip peak KV (MiB) | {medians['kvzip peak KV MiB']:.2f} |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(f"prompt {ids.shape[1]} tokens, cache {cache_size} slots per (layer, KV head)\n" + table)
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
