"""RULER predictions under a KV budget (the paper's Table 5 protocol: 50% of the context).

Reads the samples ``ruler/prepare.py`` wrote (``{data_dir}/{task}.jsonl``), and for every sample
builds a fresh cache of ``budget x prompt tokens`` slots for the chosen method, prefills the prompt
(whole, or ``--prefill_chunk_size`` chunks), and decodes greedily. One JSONL line per sample is
appended as it is produced; a rerun skips samples already written. Score with ``ruler/eval.py``.

Example (offline, embedded model)::

    python ruler/prepare.py --tokenizer smollm2-135m --max_length 2048 --num_samples 5 --output_dir data/ruler
    python ruler/pred.py --data_dir data/ruler/2048 --method full,streamingllm,lacache --budget 0.5
    python ruler/eval.py --pred_dir outputs/ruler/*2048*
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm  # noqa: E402

from lacache_core.cli import (add_method_flags, check_common, method_settings, method_tag,  # noqa: E402
                              parse_methods, run_main)
from lacache_core.errors import ConfigError  # noqa: E402
from lacache_core.generation import BudgetSpec, answer, budget_cache_size, encode_prompt, stop_token_ids  # noqa: E402
from lacache_core.models import DEFAULT_MODEL  # noqa: E402
from lacache_core.records import init_distributed, local_device, read_jsonl, sharded_results  # noqa: E402
from lacache_core.runlog import run_record, write_json  # noqa: E402

TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=DEFAULT_MODEL, help="hub name, local folder or the embedded alias")
    p.add_argument("--data_dir", required=True, help="folder of {task}.jsonl written by ruler/prepare.py")
    p.add_argument("--tasks", default=None, help=f"comma list (default: every task file in --data_dir of {TASKS})")
    p.add_argument("--num_samples", type=int, default=None, help="first N samples per task")
    p.add_argument("--no_chat", action="store_true", help="do not wrap prompts in the tokenizer's chat template")
    p.add_argument("--output_dir", default="outputs/ruler")
    add_method_flags(p, span=16, overlap=0, budget=0.5)
    return p.parse_args(argv)


def validate(args) -> None:
    check_common(args)
    args.methods = parse_methods(args.method)
    data = Path(args.data_dir)
    if not data.is_dir():
        raise ConfigError(f"--data_dir {data}: no such folder (write one with ruler/prepare.py)")
    present = [t for t in TASKS if (data / f"{t}.jsonl").exists()]
    args.task_list = present if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in args.task_list if t not in TASKS]
    if bad:
        raise ConfigError(f"--tasks must be a comma list of {TASKS}, got {','.join(bad)}")
    missing = [t for t in args.task_list if t not in present]
    if missing or not args.task_list:
        raise ConfigError(f"--data_dir {data}: no samples for {','.join(missing) or 'any task'} "
                          "(run ruler/prepare.py for them)")
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1, got {args.num_samples}")


def run_folder(args, method: str) -> Path:
    model = Path(args.model_name_or_path.rstrip("/")).name
    return Path(args.output_dir) / f"{model}__{Path(args.data_dir).name}__{method_tag(args, method)}"


def predict_task(args, method, task, model, tokenizer, rank, world) -> None:
    samples = read_jsonl(Path(args.data_dir) / f"{task}.jsonl")[:args.num_samples]
    final = run_folder(args, method) / f"{task}.jsonl"
    stop = stop_token_ids(tokenizer, model)
    with sharded_results(final, samples, "index", rank, world) as (todo, out):
        for sample in tqdm(todo, desc=f"{method} {task}", disable=rank > 0):
            ids = encode_prompt(tokenizer, sample["input"], chat=not args.no_chat,
                                answer_prefix=sample.get("answer_prefix", ""))
            cache_size = None if method == "full" else budget_cache_size(args.budget, ids.shape[1])
            spec = BudgetSpec(method, cache_size, args.start_size, settings=method_settings(args))
            res = answer(model, tokenizer, ids, spec, sample["max_new_tokens"], stop,
                         prefill_chunk_size=args.prefill_chunk_size)
            out.append({"index": sample["index"], "pred": res.text, "outputs": sample["outputs"],
                        "length": sample["length"], "prompt_tokens": res.prompt_tokens, "cache_size": cache_size,
                        "seconds": round(res.seconds, 3), "peak_kv_bytes": res.peak_kv_bytes})


def _main(args) -> int:
    validate(args)
    from lacache_core import enable_position_shift
    from lacache_core.models import load_model

    rank, world = init_distributed()
    model, tokenizer = load_model(args.model_name_or_path, args.dtype, local_device(args.device),
                                  args.attn_implementation)
    enable_position_shift(model)
    prepared = read_jsonl(Path(args.data_dir) / f"{args.task_list[0]}.jsonl")
    prepare_record = Path(args.data_dir) / "prepare.json"
    max_length = (json.loads(prepare_record.read_text()).get("args", {}).get("max_length")
                  if prepare_record.exists() else None) or max((s["length"] for s in prepared), default=None)
    for method in args.methods:
        if method != "full" and prepared:  # reject impossible budgets before the first sample
            n = prepared[0]["length"]
            BudgetSpec(method, budget_cache_size(args.budget, n), args.start_size,
                       settings=method_settings(args)).make(model, n)
        folder = run_folder(args, method)
        if rank == 0:
            write_json(folder / "run.json", run_record(
                {k: v for k, v in vars(args).items() if k != "methods"}, model=args.model_name_or_path,
                method=method, budget=None if method == "full" else args.budget, span=args.span,
                overlap=args.overlap, max_length=max_length,
                world_size=world))
        for task in args.task_list:
            predict_task(args, method, task, model, tokenizer, rank, world)
        if rank == 0:
            print(f"[{method}] predictions in {folder}; score them with: python ruler/eval.py --pred_dir {folder}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda _: _main(args))


if __name__ == "__main__":
    sys.exit(main())
