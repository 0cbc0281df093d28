"""KV bytes per token kept, for every way of holding the cache: a ``--tokens`` prompt of the corpus, then
``--decode`` decode steps on the tokens that follow it; per setting, the slots held, the KV bytes held (as stored:
codes and scales, merged pairs, page metadata), bytes per kept token and layer, and for sparse reads the share
of the cache's bytes a decode step reads.

    python scripts/bench_kv_bytes.py                      # embedded SmolLM2-135M, 1,500 tokens of pg-essays, CPU
    python scripts/bench_kv_bytes.py --tokens 4000 --output outputs/bench/kv_bytes_4k.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.data import load_texts  # noqa: E402
from harness.flags import ArgumentParser, at_least_one  # noqa: E402
from harness.models import device_arg, load_model  # noqa: E402
from harness.runlog import run_record, write_json  # noqa: E402
from harness.runner import check_output_file, run_main  # noqa: E402
from harness.streaming import stream_tokens  # noqa: E402
from lacache_core import KIVI, CompressedCache, Quest, enable_position_shift, make_cache  # noqa: E402
from lacache_core.versions import with_cache  # noqa: E402

LADDER = dict(span=8, overlap=4)
SETTINGS = [  # (label, method, settings, quantization, sparse reads)
    ("full", "full", {}, None, None),
    ("full, KIVI-4", "full", {}, KIVI(bits=4), None),
    ("full, KIVI-2", "full", {}, KIVI(bits=2), None),
    ("full, KIVI-4, KIVI's schedule", "full", {}, KIVI(bits=4, schedule="reference"), None),
    ("full, KIVI-2, KIVI's schedule", "full", {}, KIVI(bits=2, schedule="reference"), None),
    ("full, Quest 256", "full", {}, None, Quest(token_budget=256)),
    ("MiniCache (pairs from the middle layer)", "minicache", {}, None, None),
    ("MiniCache (pairs from layer 0)", "minicache", {"merge_start": 0}, None, None),
    ("MiniCache (pairs from the middle layer), KIVI-4", "minicache", {}, KIVI(bits=4), None),
    ("LaCache 1024", "lacache", {"cache_size": 1024, **LADDER}, None, None),
    ("LaCache 1024, KIVI-4", "lacache", {"cache_size": 1024, **LADDER}, KIVI(bits=4), None),
    ("LaCache 1024, KIVI-2", "lacache", {"cache_size": 1024, **LADDER}, KIVI(bits=2), None),
    ("LaCache 1024, Quest 256", "lacache", {"cache_size": 1024, **LADDER}, None, Quest(token_budget=256)),
    ("LaCache 256", "lacache", {"cache_size": 256, **LADDER}, None, None),
    ("CAM 256", "cam", {"cache_size": 256}, None, None),
    ("CAM 1024, KIVI-4", "cam", {"cache_size": 1024}, KIVI(bits=4), None),
    ("SnapKV 1024", "snapkv", {"cache_size": 1024}, None, None),
    ("ThinK 1024", "think", {"cache_size": 1024}, None, None),
    ("ThinK 1024, KIVI-4 post-RoPE", "think", {"cache_size": 1024}, KIVI(bits=4, key_order="post_rope"), None),
    ("ThinK 1024, KIVI-2 post-RoPE", "think", {"cache_size": 1024}, KIVI(bits=2, key_order="post_rope"), None),
    ("SnapKV 1024, KIVI-2 post-RoPE", "snapkv", {"cache_size": 1024}, KIVI(bits=2, key_order="post_rope"), None),
]


def measure(model, ids: torch.Tensor, decode: int, method: str, settings: dict, quant, read) -> dict:
    cache = make_cache(method, model, quant=quant, read=read, **settings)
    prompt = ids.shape[1] - decode
    with torch.inference_mode():
        model(ids[:, :prompt], use_cache=True, **with_cache(cache))
        for t in range(prompt, ids.shape[1]):
            model(ids[:, t:t + 1], use_cache=True, **with_cache(cache))
    layers = model.config.num_hidden_layers
    slots = [cache._layer(i)[0].shape[-2] for i in range(layers)]  # held per layer (a merged layer: its restored view)
    held = cache.kv_bytes()
    row = {"slots per layer (mean)": sum(slots) / layers, "KV MiB": held / 2 ** 20,
           "bytes per kept token and layer": held / sum(slots), "peak KV MiB": cache.peak_bytes / 2 ** 20}
    if isinstance(cache, CompressedCache) and cache.dense_read_bytes:
        row["read share per decode step"] = cache.read_bytes / cache.dense_read_bytes
    return row


def markdown(rows) -> str:
    cols = ["setting", "slots per layer (mean)", "KV MiB", "bytes per kept token and layer", "read share per decode step"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [row["setting"], f"{row['slots per layer (mean)']:,.0f}", f"{row['KV MiB']:.2f}",
                 f"{row['bytes per kept token and layer']:,.0f}",
                 f"{row['read share per decode step']:.3f}" if "read share per decode step" in row else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _run(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset_name", default="pg-essays")
    p.add_argument("--tokens", type=int, default=1500, help="prompt plus decoded tokens (default 1500)")
    p.add_argument("--decode", type=int, default=32, help="decode steps after the prompt (default 32)")
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--output", default="outputs/bench/kv_bytes.json", help="JSON results (the table beside it, .md)")
    args = p.parse_args(argv)
    check_output_file(args.output)
    at_least_one(args, "tokens", "decode")
    if args.decode >= args.tokens:
        print(f"error: --decode must be < --tokens {args.tokens}, got {args.decode}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, "float32", args.device, "sdpa")
    enable_position_shift(model)
    pairs = stream_tokens(tokenizer, load_texts(args.dataset_name, None, "test"), args.tokens)
    ids = pairs[:1].to(args.device)  # the inputs row: [1, tokens]
    if ids.shape[1] < args.tokens:
        print(f"error: --tokens {args.tokens}: {args.dataset_name} has only {ids.shape[1]}", file=sys.stderr)
        return 2
    rows = []
    for label, method, settings, quant, read in tqdm(SETTINGS, desc="settings", unit="setting"):
        rows.append({"setting": label, **measure(model, ids, args.decode, method, settings, quant, read)})
    text = markdown(rows)
    print(text, end="")
    out = Path(args.output)
    write_json(out, run_record(vars(args), rows=rows))
    out.with_suffix(".md").write_text(text)
    return 0


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
