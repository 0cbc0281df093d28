"""LongBench predictions under a KV budget (the paper's Tables 3 and 4 protocol).

For every sample: LongBench's prompt format, middle truncation to the model's maximum input
length, the chat wrapper (except on trec/triviaqa/samsum/lsht/lcc/repobench-p), a fresh cache of
``budget x max_length`` slots for the chosen method, full prefill (or ``--prefill_chunk_size``
chunks) and greedy decoding. One JSONL line per sample is appended as it is produced; a rerun
skips the samples already written. Score the folder with ``longbench/eval.py``.

Examples
--------
Official-style run (one GPU, hub access)::

    python longbench/pred.py --model llama2-7b-chat-4k --method lacache --budget 0.5 --span 16 --overlap 0

Offline smoke run on the embedded model with synthetic samples (see ``longbench/synthetic.py``)::

    python longbench/synthetic.py --output_dir data/longbench_synthetic
    python longbench/pred.py --data_dir data/longbench_synthetic --datasets passage_retrieval_en,passage_count \\
        --method full,streamingllm,lacache --budget 0.25 --max_length 2000

Several GPUs: ``torchrun --nproc_per_node 8 longbench/pred.py ...`` (each rank takes every 8th
sample; rank 0 merges the shards), or ``--device auto`` to spread one large model over the GPUs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm  # noqa: E402

from lacache_core.cli import (add_method_flags, check_common, method_settings, method_tag,  # noqa: E402
                              parse_methods, run_main)
from lacache_core.errors import ConfigError  # noqa: E402
from lacache_core.generation import (BudgetSpec, answer, budget_cache_size, encode_prompt,  # noqa: E402
                                     stop_token_ids, truncate_middle)
from lacache_core.records import init_distributed, local_device, read_jsonl, sharded_results  # noqa: E402
from lacache_core.runlog import run_record, write_json  # noqa: E402
from longbench.config import (DATASETS, DATASETS_E, MAX_NEW_TOKENS, MODEL_MAX_LENGTH, NO_CHAT,  # noqa: E402
                              PROMPTS)

#: LongBench model names and where their weights live (LongBench's model2path plus the paper's models).
MODEL_PATHS = {
    "llama2-7b-chat-4k": "meta-llama/Llama-2-7b-chat-hf",
    "llama2-13b-chat-4k": "meta-llama/Llama-2-13b-chat-hf",
    "longchat-v1.5-7b-32k": "lmsys/longchat-7b-v1.5-32k",
    "vicuna-v1.5-7b-16k": "lmsys/vicuna-7b-v1.5-16k",
    "xgen-7b-8k": "Salesforce/xgen-7b-8k-inst",
    "internlm-7b-8k": "internlm/internlm-chat-7b-8k",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "smollm2-135m-instruct": "smollm2-135m",  # the embedded offline model
}
DEFAULT_MODEL = "smollm2-135m-instruct"
#: ``official`` is the old name of ``lacache``.
CHAT_MODES = ("auto", "lacache", "longbench", "none", "official")
DEFAULT_HUB = "THUDM/LongBench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"LongBench model name (sets the maximum input length and weights): {sorted(MODEL_PATHS)}")
    p.add_argument("--model_name_or_path", default=None, help="weights to load instead of --model's (hub or folder)")
    p.add_argument("--e", action="store_true", help="LongBench-E (13 datasets, length buckets)")
    p.add_argument("--datasets", default=None, help="comma list (default: all 21, or the 13 of LongBench-E with --e)")
    p.add_argument("--max_length", type=int, default=None,
                   help="maximum input tokens (default: LongBench's value for --model); the budget is a fraction of it")
    p.add_argument("--num_samples", type=int, default=None, help="first N samples per dataset (quick runs)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="cap on answer tokens (default: LongBench's per-dataset length; quick runs only)")
    p.add_argument("--data_dir", default=None,
                   help="folder of {dataset}.jsonl (LongBench's data.zip unpacked); default: --hub_dataset")
    p.add_argument("--hub_dataset", default=DEFAULT_HUB, help="hub dataset with one config per LongBench dataset")
    p.add_argument("--chat_template", choices=CHAT_MODES, default="auto",
                   help="auto: the tokenizer's own chat template (none if it has none); lacache: LongBench's wrapper "
                        "rule applied to the weights' name as the LaCache repository's pred.py does (no wrapper for "
                        "meta-llama/Llama-2-7b-chat-hf: the paper's Table 3); longbench: the rule applied to the "
                        "LongBench model name, as THUDM/LongBench's pred.py does ([INST] for llama2-7b-chat-4k); "
                        "none: raw prompts; official: old name of lacache"),
    p.add_argument("--output_dir", default="outputs/longbench")
    add_method_flags(p, span=16, overlap=0, budget=0.5)
    args = p.parse_args(argv)
    return args


def validate(args) -> None:
    check_common(args)
    args.methods = parse_methods(args.method)
    pool = DATASETS_E if args.e else DATASETS
    args.dataset_list = pool if args.datasets is None else [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in args.dataset_list if d not in pool]
    if unknown:
        raise ConfigError(f"--datasets must be a comma list of {pool}{' (LongBench-E)' if args.e else ''}, "
                          f"got {','.join(unknown)}")
    if args.model not in MODEL_PATHS and args.model_name_or_path is None:
        raise ConfigError(f"--model must be one of {sorted(MODEL_PATHS)} (or give --model_name_or_path), "
                          f"got {args.model!r}")
    if args.max_length is None:
        if args.model not in MODEL_MAX_LENGTH:
            raise ConfigError(f"--max_length is required for --model {args.model!r} (LongBench knows "
                              f"{sorted(MODEL_MAX_LENGTH)})")
        args.max_length = MODEL_MAX_LENGTH[args.model]
    if args.max_length < 2:
        raise ConfigError(f"--max_length must be >= 2, got {args.max_length}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1, got {args.num_samples}")
    args.weights = args.model_name_or_path or MODEL_PATHS[args.model]
    args.cache_size = budget_cache_size(args.budget, args.max_length)
    if args.chat_template == "official":
        print("note: --chat_template official is the old name of --chat_template lacache", file=sys.stderr)
        args.chat_template = "lacache"
    if args.chat_template in RULE_INPUT:
        name = RULE_INPUT[args.chat_template](args)
        if "chatglm" in name:
            raise ConfigError(f"--chat_template {args.chat_template}: {name!r} gets ChatGLM's wrapper, which needs its "
                              "remote tokenizer code; not supported (use --chat_template auto or none)")


# ----------------------------------------------------------------------------------------- data
def load_samples(name: str, data_dir, hub: str) -> list:
    """Samples of one LongBench dataset (``name`` ends in ``_e`` for LongBench-E)."""
    if data_dir is not None:
        path = Path(data_dir) / f"{name}.jsonl"
        if not path.exists():
            raise ConfigError(f"--data_dir {data_dir}: no {name}.jsonl there (unzip LongBench's data.zip into it)")
        return read_jsonl(path)
    try:
        import datasets
        try:
            return list(datasets.load_dataset(hub, name, split="test"))
        except Exception as err:
            if "script" not in str(err).lower():
                raise
            # THUDM/LongBench is a script dataset that datasets >= 4 refuses; its auto-converted parquet
            # branch holds the same rows
            return list(datasets.load_dataset(hub, name, split="test", revision="refs/convert/parquet"))
    except Exception as err:
        raise ConfigError(
            f"--hub_dataset {hub!r}: could not load {name} ({type(err).__name__}); offline, download LongBench's "
            f"data.zip elsewhere, unzip it and pass --data_dir path/to/data (files {name}.jsonl)") from None


# ----------------------------------------------------------------------------------------- prompts
#: LongBench's chat wrappers as ``(prefix, suffix)``, in the order its ``build_chat`` tests for the
#: (case-sensitive) substrings of a model name: THUDM/LongBench ``LongBench/pred.py`` @ c5ea10b, the
#: same function in the LaCache repository's ``LongBench/pred.py`` @ 0f27c33. (ChatGLM's wrapper,
#: tested first there, comes from its remote tokenizer code and is refused in ``validate``.) The
#: vicuna text is what fastchat's "vicuna" conversation template renders.
CHAT_RULES = (
    (("longchat", "vicuna"),
     ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the user's questions. USER: ", " ASSISTANT:")),
    (("llama2",), ("[INST]", "[/INST]")),
    (("xgen",),
     ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the human's questions.\n\n ### Human: ", "\n###")),
    (("internlm",), ("<|User|>:", "<eoh>\n<|Bot|>:")),
)

#: The name each rule-based mode tests: LaCache's pred.py gets the weights' hub path as ``--model``;
#: THUDM's gets the LongBench model name.
RULE_INPUT = {"lacache": lambda args: args.weights, "longbench": lambda args: args.model}


def longbench_wrapper(name: str) -> Optional[Tuple[str, str]]:
    """LongBench's chat wrapper for a model ``name`` (``(prefix, suffix)``), or ``None`` for no wrapper."""
    for needles, wrapper in CHAT_RULES:
        if any(needle in name for needle in needles):
            return wrapper
    return None


def chat_wrapper(args, tokenizer) -> dict:
    """What wraps the prompts of the chat datasets in this run (recorded in ``run.json``)."""
    mode = args.chat_template
    if mode in RULE_INPUT:
        name = RULE_INPUT[mode](args)
        wrapper = longbench_wrapper(name)
        return {"mode": mode, "rule_applied_to": name, "wrapper": None if wrapper is None else list(wrapper)}
    template = getattr(tokenizer, "chat_template", None) if mode == "auto" else None
    return {"mode": mode, "tokenizer_chat_template": template}


def encode(tokenizer, prompt: str, dataset: str, args) -> torch.Tensor:
    """``[1, T]`` ids of one sample's prompt: truncated in the middle, then wrapped for chat."""
    prompt = truncate_middle(tokenizer, prompt, args.max_length)
    chat = dataset not in NO_CHAT
    if chat and args.chat_template in RULE_INPUT:
        wrapper = longbench_wrapper(RULE_INPUT[args.chat_template](args))
        if wrapper is not None:
            prompt = wrapper[0] + prompt + wrapper[1]
        chat = False
    return encode_prompt(tokenizer, prompt, chat=chat and args.chat_template == "auto")


# ----------------------------------------------------------------------------------------- run
def run_folder(args, method: str) -> Path:
    chat = "" if args.chat_template == "auto" else f"_chat-{args.chat_template}"  # modes never share a folder
    return Path(args.output_dir) / ("pred_e" if args.e else "pred") / f"{args.model}__{method_tag(args, method)}{chat}"


def predict_dataset(args, method, dataset, model, tokenizer, rank, world) -> Path:
    name = f"{dataset}_e" if args.e else dataset
    samples = load_samples(name, args.data_dir, args.hub_dataset)[:args.num_samples]
    for i, sample in enumerate(samples):
        sample.setdefault("_id", f"{name}-{i}")
    folder = run_folder(args, method)
    final = folder / f"{dataset}.jsonl"
    spec = BudgetSpec(method, None if method == "full" else args.cache_size, args.start_size,
                      settings=method_settings(args))
    stop = stop_token_ids(tokenizer, model, extra=["\n"] if dataset == "samsum" else ())
    with sharded_results(final, samples, "_id", rank, world) as (todo, out):
        for sample in tqdm(todo, desc=f"{method} {dataset}", disable=rank > 0):
            ids = encode(tokenizer, PROMPTS[dataset].format(**sample), dataset, args)
            limit = min(MAX_NEW_TOKENS[dataset], args.max_new_tokens or MAX_NEW_TOKENS[dataset])
            res = answer(model, tokenizer, ids, spec, limit, stop,
                         min_new_tokens=1 if dataset == "samsum" else 0, prefill_chunk_size=args.prefill_chunk_size)
            out.append({"_id": sample["_id"], "pred": res.text, "answers": sample["answers"],
                        "all_classes": sample.get("all_classes"), "length": sample.get("length"),
                        "prompt_tokens": res.prompt_tokens, "seconds": round(res.seconds, 3),
                        "peak_kv_bytes": res.peak_kv_bytes})
    return final


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda _: _main(args))


def _main(args) -> int:
    validate(args)
    from lacache_core import enable_position_shift
    from lacache_core.models import load_model

    rank, world = init_distributed()
    model, tokenizer = load_model(args.weights, args.dtype, local_device(args.device), args.attn_implementation)
    enable_position_shift(model)
    for method in args.methods:
        if method != "full":  # reject impossible budgets before the first sample
            BudgetSpec(method, args.cache_size, args.start_size, settings=method_settings(args)).make(
                model, args.max_length)
        folder = run_folder(args, method)
        if rank == 0:
            write_json(folder / "run.json", run_record(
                {k: v for k, v in vars(args).items() if k != "methods"},
                model=args.model, method=method, budget=None if method == "full" else args.budget,
                cache_size=None if method == "full" else args.cache_size, span=args.span, overlap=args.overlap,
                max_length=args.max_length, e=args.e, world_size=world, chat=chat_wrapper(args, tokenizer)))
        for dataset in args.dataset_list:
            predict_dataset(args, method, dataset, model, tokenizer, rank, world)
        if rank == 0:
            print(f"[{method}] predictions in {folder}; score them with: python longbench/eval.py --path {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
