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

import sys
from pathlib import Path
from typing import Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import add_method_flags, hyperparameters, method_identity, method_tag, parser  # noqa: E402
from harness.generation import answer_all, budget_spec, encode_prompt, stop_token_ids  # noqa: E402
from harness.loop import Benchmark, JsonlStore, Part, answer_cost, run_benchmark  # noqa: E402
from harness.records import complete_rows, read_json_object, read_jsonl  # noqa: E402
from harness.runner import (Run, add_batch_flag, add_model_flags, add_output_flags, add_skip_flag,  # noqa: E402
                            batch_setting, batch_tag, check_batch_flags, check_budgets, check_run_flags, cli, load)
from lacache_core.errors import ConfigError  # noqa: E402

TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]


def parse_args(argv=None):
    p, g = parser(__doc__)
    add_model_flags(g["model"])
    add_batch_flag(g["model"])
    g["data"].add_argument("--data_dir", required=True, help="folder of {task}.jsonl written by ruler/prepare.py")
    g["data"].add_argument("--tasks", default=None,
                           help=f"comma list (default: every task file in --data_dir of {TASKS})")
    g["data"].add_argument("--num_samples", type=int, default=None, help="first N samples per task")
    g["data"].add_argument("--no_chat", action="store_true",
                           help="do not wrap prompts in the tokenizer's chat template")
    add_skip_flag(g["data"])
    add_method_flags(g["method"], budget=0.5)
    add_output_flags(g["output"], "outputs/ruler")
    return p.parse_args(argv)


def validate(args) -> None:
    check_run_flags(args)
    check_batch_flags(args)
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


def prepare_record(args) -> dict:
    return read_json_object(Path(args.data_dir) / "prepare.json", "--data_dir: ", " (rerun ruler/prepare.py)")


def open_run(args, method: str) -> Tuple[Run, dict]:
    """The result folder of one method (readable name, the hash of the complete setting) and what its
    ``run.json`` adds to the setting."""
    model = Path(args.model_name_or_path.rstrip("/")).name
    prepared = prepare_record(args).get("args", {})
    setting = {"model": args.model_identity,
               "data": {"data_dir": str(Path(args.data_dir).resolve()), "prepared_with": prepared},
               "method": method_identity(args, method), "generation": {"chat": not args.no_chat},
               "cache": {"dtype": args.dtype, "attn_implementation": args.attn_implementation, **batch_setting(args)},
               "seed": prepared.get("seed")}
    run = Run(args.output_dir, f"{model}__{Path(args.data_dir).name}__{method_tag(args, method)}{batch_tag(args)}",
              setting, args, args.rank)
    samples, _ = task_rows(args, args.task_list[0])
    max_length = prepared.get("max_length") or max((s["length"] for s in samples), default=None)
    return run, dict(model=args.model_name_or_path, method=method, budget=None if method == "full" else args.budget,
                     max_length=max_length, world_size=args.world, batch_size=args.batch_size,
                     **hyperparameters(args, method))


def task_rows(args, task: str):
    """``(samples, skipped rows or None)`` of one task file, every sample with the fields the loop reads."""
    skipped = [] if args.skip_bad_rows else None
    samples = read_jsonl(Path(args.data_dir) / f"{task}.jsonl", "--data_dir: ", skipped)
    samples = complete_rows(samples, ("index", "input", "outputs", "length", "max_new_tokens"),
                            f"--data_dir {args.data_dir}: {task}.jsonl", skipped)
    if not samples:
        raise ConfigError(f"--data_dir {args.data_dir}: {task}.jsonl has no samples (rerun ruler/prepare.py)")
    return samples, skipped


def task_part(args, method, task, model, tokenizer) -> Part:
    """One task's samples, their prompts, per-prompt budget and records (``{task}.jsonl``)."""
    samples, skipped = task_rows(args, task)

    def record(sample: dict, res) -> dict:
        cache_size = budget_spec(args, method, res.prompt_tokens).cache_size
        return {"index": sample["index"], "pred": res.text, "outputs": sample["outputs"], "length": sample["length"],
                "prompt_tokens": res.prompt_tokens, "cache_size": cache_size, **answer_cost(res)}

    return Part(task, samples[:args.num_samples], JsonlStore("index"), record=record, skipped=skipped,
                prompt=lambda sample: (encode_prompt(tokenizer, sample["input"], chat=not args.no_chat,
                                                     answer_prefix=sample.get("answer_prefix", "")),
                                       sample["max_new_tokens"]),
                budget=lambda n: budget_spec(args, method, n), stop=stop_token_ids(tokenizer, model))


def _main(args) -> int:
    model, tokenizer = load(args)
    prepared, _ = task_rows(args, args.task_list[0])
    if prepared:
        check_budgets(args, model, prepared[0]["length"], lambda m, n: budget_spec(args, m, n))
    parts = lambda method: (task_part(args, method, t, model, tokenizer) for t in args.task_list)  # noqa: E731
    run_benchmark(args, Benchmark(lambda method: open_run(args, method), parts, "ruler/eval.py --pred_dir"),
                  model, tokenizer, answer_all)
    return 0


main = cli(parse_args, _main, validate)


if __name__ == "__main__":
    sys.exit(main())
