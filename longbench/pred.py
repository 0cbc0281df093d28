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

import re
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import add_method_flags, hyperparameters, method_identity, method_tag, parser  # noqa: E402
from harness.generation import answer_all, budget_spec, encode_prompt, stop_token_ids, truncate_middle  # noqa: E402
from harness.loop import Benchmark, JsonlStore, Part, answer_cost, run_benchmark  # noqa: E402
from harness.records import complete_rows, read_jsonl  # noqa: E402
from harness.runner import (Run, add_batch_flag, add_model_flags, add_output_flags, add_skip_flag,  # noqa: E402
                            batch_setting, batch_tag, check_batch_flags, check_budgets, check_run_flags, cli, load)
from lacache_core.errors import ConfigError  # noqa: E402
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
    p, g = parser(__doc__)
    g["model"].add_argument("--model", default=DEFAULT_MODEL,
                            help=f"LongBench model name (sets the maximum input length and the weights): "
                                 f"{sorted(MODEL_PATHS)}, or the weights of one of them (the LaCache script's "
                                 "spelling, e.g. meta-llama/Llama-2-7b-chat-hf); any other value is taken as the "
                                 "weights (then give --max_length)")
    add_model_flags(g["model"], default=None, names=("--model_name_or_path", "--model_name"),
                    help="weights to load instead of --model's (hub name or local folder)")
    add_batch_flag(g["model"])
    d = g["data"]
    d.add_argument("--e", action="store_true", help="LongBench-E (13 datasets, length buckets)")
    d.add_argument("--datasets", default=None, help="comma list (default: all 21, or the 13 of LongBench-E with --e)")
    d.add_argument("--data_dir", default=None,
                   help="folder of {dataset}.jsonl (LongBench's data.zip unpacked); default: --hub_dataset")
    d.add_argument("--hub_dataset", default=DEFAULT_HUB, help="hub dataset with one config per LongBench dataset")
    d.add_argument("--num_samples", type=int, default=None, help="first N samples per dataset (quick runs)")
    d.add_argument("--max_length", type=int, default=None,
                   help="maximum input tokens (default: LongBench's value for --model); the budget is a fraction of it")
    d.add_argument("--max_new_tokens", type=int, default=None,
                   help="cap on answer tokens (default: LongBench's per-dataset length; quick runs only)")
    d.add_argument("--chat_template", choices=CHAT_MODES, default="auto",
                   help="auto: the tokenizer's own chat template (none if it has none); lacache: LongBench's wrapper "
                        "rule applied to the weights' name as the LaCache repository's pred.py does (no wrapper for "
                        "meta-llama/Llama-2-7b-chat-hf: the paper's Table 3); longbench: the rule applied to the "
                        "LongBench model name, as THUDM/LongBench's pred.py does ([INST] for llama2-7b-chat-4k); "
                        "none: raw prompts; official: old name of lacache")
    add_skip_flag(d)
    add_method_flags(g["method"], budget=0.5)
    add_output_flags(g["output"], "outputs/longbench")
    return p.parse_args(argv)


def validate(args) -> None:
    check_run_flags(args)
    check_batch_flags(args)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data_dir {args.data_dir}: no such folder (unzip LongBench's data.zip into it)")
    pool = DATASETS_E if args.e else DATASETS
    args.dataset_list = pool if args.datasets is None else [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in args.dataset_list if d not in pool]
    if unknown:
        raise ConfigError(f"--datasets must be a comma list of {pool}{' (LongBench-E)' if args.e else ''}, "
                          f"got {','.join(unknown)}")
    by_weights = {path: name for name, path in MODEL_PATHS.items()}
    if args.model in by_weights and args.model_name_or_path is None:
        # the LaCache repository's pred.py takes the weights as --model (meta-llama/Llama-2-7b-chat-hf)
        args.model, args.model_name_or_path = by_weights[args.model], args.model
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
    args.weights = args.model_name_or_path or MODEL_PATHS.get(args.model, args.model)
    args.model_name_or_path = args.weights
    if args.chat_template == "official":
        print("note: --chat_template official is the old name of --chat_template lacache", file=sys.stderr)
        args.chat_template = "lacache"
    if args.chat_template in RULE_INPUT:
        name = RULE_INPUT[args.chat_template](args)
        if "chatglm" in name:
            raise ConfigError(f"--chat_template {args.chat_template}: {name!r} gets ChatGLM's wrapper, which needs its "
                              "remote tokenizer code; not supported (use --chat_template auto or none)")


# ----------------------------------------------------------------------------------------- data
def load_samples(name: str, data_dir, hub: str, skipped: Optional[list] = None) -> list:
    """Samples of one LongBench dataset (``name`` ends in ``_e`` for LongBench-E)."""
    if data_dir is not None:
        path = Path(data_dir) / f"{name}.jsonl"
        if not path.exists():
            raise ConfigError(f"--data_dir {data_dir}: no {name}.jsonl there (unzip LongBench's data.zip into it)")
        return read_jsonl(path, "--data_dir: ", skipped)
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
def model_label(args) -> str:
    return args.model if args.model in MODEL_PATHS else (Path(args.model.rstrip("/")).name or args.model)


def run_name(args, method: str) -> str:
    chat = "" if args.chat_template == "auto" else f"_chat-{args.chat_template}"  # readable; the hash has it too
    return f"{model_label(args)}__{method_tag(args, method)}{chat}{batch_tag(args)}"


def open_run(args, method: str, tokenizer) -> Tuple[Run, dict]:
    """The result folder of one method (readable name, the hash of the complete setting) and what its
    ``run.json`` adds to the setting."""
    name = run_name(args, method)
    data = {"data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
            "hub_dataset": None if args.data_dir else args.hub_dataset, "e": args.e}
    setting = {"model": {**args.model_identity, "longbench_name": args.model}, "data": data,
               "method": method_identity(args, method),
               "generation": {"max_length": args.max_length, "max_new_tokens": args.max_new_tokens,
                              "chat": chat_wrapper(args, tokenizer)},
               "cache": {"dtype": args.dtype, "attn_implementation": args.attn_implementation, **batch_setting(args)},
               "seed": None}
    run = Run(Path(args.output_dir) / ("pred_e" if args.e else "pred"), name, setting, args, args.rank)
    info = dict(model=args.model, method=method, budget=None if method == "full" else args.budget,
                cache_size=budget_spec(args, method, args.max_length).cache_size, max_length=args.max_length,
                e=args.e, world_size=args.world, batch_size=args.batch_size, chat=setting["generation"]["chat"], **hyperparameters(args, method))
    return run, info


def dataset_part(args, method, dataset, model, tokenizer) -> Part:
    """One dataset's samples, their prompts, budget and records (``{dataset}.jsonl``)."""
    name = f"{dataset}_e" if args.e else dataset
    skipped = [] if args.skip_bad_rows else None
    samples = load_samples(name, args.data_dir, args.hub_dataset, skipped)[:args.num_samples]
    fields = sorted(set(re.findall(r"{(\w+)}", PROMPTS[dataset])) | {"answers"})
    samples = complete_rows(samples, fields, f"--data_dir {args.data_dir or args.hub_dataset}: {name}", skipped)
    if not samples:
        raise ConfigError(f"--datasets {dataset}: no samples in {args.data_dir or args.hub_dataset}")
    for i, sample in enumerate(samples):
        sample.setdefault("_id", f"{name}-{i}")
    spec = budget_spec(args, method, args.max_length)  # budget x max_length, whatever the prompt's length
    limit = min(MAX_NEW_TOKENS[dataset], args.max_new_tokens or MAX_NEW_TOKENS[dataset])
    return Part(dataset, samples, JsonlStore("_id"), budget=lambda _: spec, skipped=skipped,
                prompt=lambda sample: (encode(tokenizer, PROMPTS[dataset].format(**sample), dataset, args), limit),
                record=record, stop=stop_token_ids(tokenizer, model, extra=["\n"] if dataset == "samsum" else ()),
                min_new_tokens=1 if dataset == "samsum" else 0)


def record(sample: dict, res) -> dict:
    """The JSONL line of one answer (the fields ``longbench/eval.py`` reads, then the cost)."""
    return {"_id": sample["_id"], "pred": res.text, "answers": sample["answers"],
            "all_classes": sample.get("all_classes"), "length": sample.get("length"),
            "prompt_tokens": res.prompt_tokens, **answer_cost(res)}


def _main(args) -> int:
    model, tokenizer = load(args)
    check_budgets(args, model, args.max_length, lambda m, n: budget_spec(args, m, n))
    parts = lambda method: (dataset_part(args, method, d, model, tokenizer) for d in args.dataset_list)  # noqa: E731
    run_benchmark(args, Benchmark(lambda method: open_run(args, method, tokenizer), parts, "longbench/eval.py --path"),
                  model, tokenizer, answer_all)
    return 0


main = cli(parse_args, _main, validate)


if __name__ == "__main__":
    sys.exit(main())
