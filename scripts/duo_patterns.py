"""DuoAttention head patterns of any model, for ``--method duo_attention --duo_patterns FILE``.

DuoAttention (Xiao et al., ICLR 2025, arXiv 2410.10819) publishes patterns trained for a few models
(mit-han-lab/duo-attention ``attn_patterns/``; ``--duo_patterns`` reads them as they are). For any other model this
scores the heads with kvpress's on-the-fly rule (``duo_attention_on_the_fly`` in
``kvpress/presses/duo_attention_press.py``, NVIDIA/kvpress @ 8bb29b9):

* per text and layer, the mean query and the mean key before RoPE over the text's tokens;
* those two repeated ``--q_len`` times and rotated at positions ``0 .. q_len - 1``; the last query's attention
  over the keys;
* a head's score is the area under its cumulative attention curve (``cumsum(attention).mean()``): near 1 when the
  last query looks at the first tokens (a head that needs the whole context), lower for a local head; averaged
  over each KV head's query heads and over the texts.

kvpress samples 50 BookSum chapters; offline, the texts here are ``--dataset_name`` (default the Paul Graham
essays shipped with the harness), each cut to ``--max_tokens``. Queries and keys are read as the attention sees
them and turned back by their positions with the model's own rotation, so every RoPE family is covered without
reading its projections. The file is ``{"sink_size", "recent_size", "scores": [[per KV head] per layer]}`` (kvpress's
sizes for on-the-fly patterns, 128 and 256), with a ``run.json`` beside it.

    python scripts/duo_patterns.py                        # embedded SmolLM2-135M-Instruct
    python scripts/duo_patterns.py --model_name_or_path MODEL --num_samples 50 --output head_scores/mine.duo.json
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.data import load_texts  # noqa: E402
from harness.flags import at_least_one, parser  # noqa: E402
from harness.runner import add_model_flags, check_output_file, check_run_flags, cli, load, progress, safe_name  # noqa: E402
from harness.runlog import run_record, write_json  # noqa: E402
from lacache_core import CompressedCache  # noqa: E402
from lacache_core.policies.base import CachePolicy  # noqa: E402
from lacache_core.policies.duo_attention import ON_THE_FLY_SIZES  # noqa: E402
from lacache_core.versions import with_cache  # noqa: E402


@dataclass
class MeanQueryKey(CachePolicy):
    """Keeps everything; records, per layer, the mean query ``[heads, d]`` and mean key ``[kv_heads, d]`` before RoPE
    of the pass it sees, and the rotation that turns them."""

    name: ClassVar[str] = "mean_query_key"
    observes: ClassVar[bool] = True
    observes_values: ClassVar[bool] = True
    means: List[Optional[tuple]] = field(default_factory=list, init=False, repr=False)
    rotation: object = field(default=None, init=False, repr=False)

    def keep(self, layer: int, n: int):
        return None

    def observe_values(self, layer, value, rotation):
        self.rotation = rotation

    def observe(self, layer, query, key, scaling):
        self.means.extend([None] * (layer + 1 - len(self.means)))
        n = key.shape[2]
        positions = torch.arange(n, device=key.device)
        plain_q = self.rotation.at(query, positions, limit=n, inverse=True)[0].float().mean(1)
        plain_k = self.rotation.at(key, positions, limit=n, inverse=True)[0].float().mean(1)
        self.means[layer] = (plain_q, plain_k, scaling)


def area_under_cumulative_attention(mean_q, mean_k, rotation, q_len: int, scaling: float) -> torch.Tensor:
    """kvpress's score of one layer: ``[kv_heads]``."""
    heads, kv_heads = mean_q.shape[0], mean_k.shape[0]
    positions = torch.arange(q_len)
    q = rotation.at(mean_q[None, :, None].expand(1, heads, q_len, -1).contiguous(), positions, limit=q_len)[0, :, -1]
    k = rotation.at(mean_k[None, :, None].expand(1, kv_heads, q_len, -1).contiguous(), positions, limit=q_len)[0]
    k = k.repeat_interleave(heads // kv_heads, 0)  # [heads, q_len, d]
    attention = (torch.einsum("hd,hnd->hn", q.float(), k.float()) * scaling).softmax(-1)
    return attention.cumsum(-1).mean(-1).view(kv_heads, -1).mean(-1)


def parse_args(argv=None):
    p, g = parser(__doc__)
    add_model_flags(g["model"])
    g["data"].add_argument("--dataset_name", default="pg-essays", help="texts to score on (default pg-essays)")
    g["data"].add_argument("--num_samples", type=int, default=50, help="texts used (default 50, as kvpress)")
    g["data"].add_argument("--max_tokens", type=int, default=2048, help="tokens of each text read (default 2048)")
    g["method"].add_argument("--q_len", type=int, default=500, help="length of the repeated mean query and key "
                                                                    "(default 500, as kvpress)")
    g["output"].add_argument("--output", default=None,
                             help="patterns file (default head_scores/{model}.duo.json; run.json beside it)")
    return p.parse_args(argv)


def validate(args) -> None:
    args.output_dir = str(Path(args.output).parent if args.output else "head_scores")
    check_run_flags(args)
    if args.output:
        check_output_file(args.output)
    at_least_one(args, "num_samples", "max_tokens", "q_len")


def body(args) -> int:
    texts = load_texts(args.dataset_name)[:args.num_samples]
    model, tokenizer = load(args)
    out = Path(args.output) if args.output else Path("head_scores") / f"{safe_name(Path(args.model_name_or_path).name)}.duo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = model.config.num_hidden_layers
    total = None
    for text in progress(texts, "duo patterns"):
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.max_tokens].to(model.device)
        policy = MeanQueryKey()
        with torch.no_grad():
            model(ids, **with_cache(CompressedCache(policy, layers)), use_cache=True)
        scores = torch.stack([area_under_cumulative_attention(q, k, policy.rotation, args.q_len, scaling)
                              for q, k, scaling in policy.means])
        total = scores if total is None else total + scores
    scores = (total / len(texts)).tolist()
    sink, recent = ON_THE_FLY_SIZES
    out.write_text(json.dumps({"sink_size": sink, "recent_size": recent, "scores": scores}))
    write_json(out.with_suffix(".run.json"), run_record(
        {k: v for k, v in vars(args).items() if k != "model_identity"}, setting={
            "model": args.model_identity, "dataset_name": args.dataset_name, "num_samples": len(texts),
            "max_tokens": args.max_tokens, "q_len": args.q_len}, complete=True, patterns_file=str(out)))
    print(f"DuoAttention patterns of {layers} layers from {len(texts)} texts in {out}")
    return 0


main = cli(parse_args, body, validate)

if __name__ == "__main__":
    sys.exit(main())
