"""Prepare RULER data (Hsieh et al. 2024): ``{output_dir}/{max_length}/{task}.jsonl`` per length and task.

Each line: ``{"index", "task", "input", "answer_prefix", "outputs", "length", "max_new_tokens", "depth"}``
where ``input`` is the raw prompt (context + question, no chat template), ``answer_prefix`` is RULER's
text to put right after it, ``length`` the token count of ``input + answer_prefix`` with the target
tokenizer (special tokens it adds included) and ``length + max_new_tokens <= max_length``.

The 11 synthetic tasks are built offline. ``qa_1`` (SQuAD v2.0) and ``qa_2`` (HotpotQA distractor)
read ``--squad`` / ``--hotpotqa``: a local official dev JSON, or a hub name loaded with
``datasets``; when neither is available they are skipped with a note.

Example::

    python ruler/prepare.py --tokenizer smollm2-135m --max_length 4096 --max_length 16384 \\
        --num_samples 100 --squad dev-v2.0.json --hotpotqa hotpot_dev_distractor_v1.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lacache_core.errors import ConfigError  # noqa: E402
from harness.flags import ArgumentParser  # noqa: E402
from harness.runner import check_output_folder, run_main  # noqa: E402
from harness.models import DEFAULT_MODEL, resolve_model_path  # noqa: E402
from harness.runlog import run_record, write_json  # noqa: E402
from ruler.tasks import TASK_NAMES, TASKS, RulerGenerator, load_hotpotqa, load_squad  # noqa: E402

# --squad / --hotpotqa: the task they feed, the default hub dataset, and the official file they accept.
QA_SOURCES = {
    "squad": dict(task="qa_1", hub="rajpurkar/squad_v2", config=None, file="dev-v2.0.json",
                  what="SQuAD v2.0 dev JSON", loader=load_squad),
    "hotpotqa": dict(task="qa_2", hub="hotpotqa/hotpot_qa", config="distractor", file="hotpot_dev_distractor_v1.json",
                     what="HotpotQA dev distractor JSON", loader=load_hotpotqa),
}



def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=DEFAULT_MODEL,
                   help=f"tokenizer: hub name, local folder, or {DEFAULT_MODEL!r} (embedded, offline; the default)")
    p.add_argument("--max_length", type=int, action="append", default=None,
                   help="prompt + answer prefix + generation budget in tokens; repeat for several (default 16384, "
                        "the paper's Table 5)")
    p.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma list (default: all 13)")
    p.add_argument("--num_samples", type=int, default=100, help="samples per task (default 100, as Table 5)")
    p.add_argument("--seed", type=int, default=42, help="same seed -> identical files (default 42, RULER's)")
    p.add_argument("--output_dir", default="outputs/ruler/data")
    for flag, src in QA_SOURCES.items():
        config = f", config {src['config']}" if src["config"] else ""
        p.add_argument(f"--{flag}", default=src["hub"],
                       help=f"{src['task']}: a local {src['what']} ({src['file']}) or a hub name for "
                            f"datasets.load_dataset (default {src['hub']}{config}); 'none' skips it")
    args = p.parse_args(argv)
    args.max_length = list(dict.fromkeys(args.max_length or [16384]))
    for n in args.max_length:
        if n < 1:
            raise ConfigError(f"--max_length must be >= 1, got {n}")
    if args.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1, got {args.num_samples}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ConfigError(f"--tasks must be a comma list of {', '.join(TASK_NAMES)}, got {args.tasks!r}")
    args.task_list = list(dict.fromkeys(tasks))
    check_output_folder(args.output_dir)
    return args


def load_tokenizer(name: str, path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **({"local_files_only": True} if Path(path).is_dir() else {}))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenizer {name!r}: not a local tokenizer folder and not loadable from the Hugging Face "
                          f"Hub (offline?); pass a local folder or {DEFAULT_MODEL!r}") from err


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether ``datasets`` can use the Hub: a quick TCP probe, so that offline runs skip at once
    instead of waiting through ``datasets``' retries. With ``HF_HUB_OFFLINE=1`` the local cache is tried."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_qa(flag: str, value: str):
    """``(QAData, None)``, or ``(None, one line saying why it is skipped and how to provide it)``."""
    src = QA_SOURCES[flag]
    how = f"pass --{flag} /path/to/{src['file']} (the official {src['what']}) to include it"
    if value is None or value.lower() in ("", "none"):
        return None, f"{src['task']} skipped: --{flag} none; {how}"
    path = Path(value).expanduser()
    if path.exists():
        try:
            return src["loader"](path), None
        except (ValueError, KeyError, TypeError, OSError) as err:  # OSError: a folder, an unreadable file
            raise ConfigError(f"--{flag} {value}: not a {src['what']} ({type(err).__name__}: {err})") from err
    if path.suffix in (".json", ".jsonl"):
        raise ConfigError(f"--{flag} {value}: file not found; give a {src['what']} or a hub name such as {src['hub']}")
    if not hub_reachable():
        return None, f"{src['task']} skipped: the Hugging Face Hub is unreachable for --{flag} {value}; {how}"
    try:
        import datasets

        rows = datasets.load_dataset(value, src["config"], split="validation")
    except Exception as err:  # datasets raises many types (connection, missing config, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return None, f"{src['task']} skipped: could not load --{flag} {value} ({first}); {how}"
    return src["loader"](rows), None


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    """Write the data; raises :class:`ConfigError` for bad settings (``__main__`` prints it, exit 2)."""
    args = parse_args(argv)
    tasks = args.task_list
    qa_data, skipped = {}, {}
    for flag, src in QA_SOURCES.items():
        if src["task"] in tasks:
            data, reason = load_qa(flag, getattr(args, flag))
            if data is None:
                skipped[src["task"]] = reason
                print(reason)
            else:
                qa_data[flag] = data  # keyed like TaskConfig.dataset
    tasks = [t for t in tasks if t not in skipped]
    tokenizer_path = resolve_model_path(args.tokenizer)
    tokenizer = load_tokenizer(args.tokenizer, tokenizer_path)
    # Preflight: sample 0 of every task at the shortest length, so a too-small --max_length fails before writing.
    for task in tasks:
        RulerGenerator(tokenizer, min(args.max_length), args.seed, qa_data).sample(task, 0)

    for max_length in args.max_length:
        out_dir = Path(args.output_dir) / str(max_length)
        gen = RulerGenerator(tokenizer, max_length, args.seed, qa_data)
        counts, lengths, started = {}, {}, time.time()
        for task in tasks:
            rows = gen.generate(task, args.num_samples, progress=True)
            write_jsonl(out_dir / f"{task}.jsonl", rows)
            counts[task] = len(rows)
            total = [r["length"] + r["max_new_tokens"] for r in rows]
            lengths[task] = {"min": min(total), "mean": round(statistics.mean(total), 1), "max": max(total)}
            print(f"[{max_length}] {task}: {len(rows)} samples, prompt+generation {lengths[task]['min']}.."
                  f"{lengths[task]['max']} tokens -> {out_dir / f'{task}.jsonl'}")
        settings = {k: v for k, v in vars(args).items() if k != "task_list"} | {"tasks": tasks, "max_length": max_length}
        write_json(out_dir / "prepare.json", run_record(
            settings, tokenizer_path=tokenizer_path, counts=counts, skipped=skipped,
            total_tokens=lengths, seconds=round(time.time() - started, 1)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
