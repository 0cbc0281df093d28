"""Retrieval head scores of a model, for HeadKV (``--method headkv --head_scores FILE``).

HeadKV (Fu et al., ICLR 2025, arXiv 2410.19258) budgets each head by how much it retrieves: the
retrieval score of Wu et al. ("Retrieval Head Mechanistically Explains Long-Context Factuality",
arXiv 2404.15574), which HeadKV widens from a head's single most-attended token to its top ``k``.
We measure it offline, on our own passkey needles (``niah/haystack.py``), teacher-forced:

* for every cell (context length x needle depth) a prompt with a passkey is built, and the model
  reads the prompt and then the key's tokens, one step each;
* at the step that predicts key token ``t``, a head scores ``1 / len(key)`` if one of its ``top_k``
  most-attended prompt positions lies in the needle and holds the token ``t`` (it copies it);
* a head's list holds its score in every cell; HeadKV takes the mean.

The paper also uses needles whose answer needs reasoning (its "retrieval-reasoning" heads); we use
the passkey needles only, and say so. The file is ``{"layer-head": [scores per cell]}``, the format of
KVCache-Factory's head score files, with a ``run.json`` beside it (settings, versions, cells).

    python scripts/head_scores.py                          # embedded SmolLM2-135M-Instruct
    python scripts/head_scores.py --lengths 1000,2000 --depths 0,0.5,1 --output head_scores/mine.json
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.flags import at_least_one, int_list, parser  # noqa: E402
from harness.runner import add_model_flags, check_output_file, check_run_flags, cli, load, progress, safe_name  # noqa: E402
from harness.runlog import run_record, write_json  # noqa: E402
from lacache_core import CompressedCache  # noqa: E402
from lacache_core.errors import ConfigError  # noqa: E402
from lacache_core.policies.base import CachePolicy  # noqa: E402
from lacache_core.versions import with_cache  # noqa: E402


@dataclass
class TopAttended(CachePolicy):
    """Keeps everything; records, per layer and query head, the ``top_k`` prompt positions the newest query
    attends to most (``[heads, top_k]``), for the scoring loop to read after each step."""

    name: ClassVar[str] = "top_attended"
    observes: ClassVar[bool] = True
    top_k: int = 1
    prompt_len: int = 0
    top: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def keep(self, layer: int, n: int):
        return None

    def observe(self, layer, query, key, scaling):
        self.top.extend([None] * (layer + 1 - len(self.top)))
        heads, kv_heads = query.shape[1], key.shape[1]
        keys = key[0, :, :self.prompt_len].float().repeat_interleave(heads // kv_heads, 0)  # [heads, T, d]
        logits = torch.einsum("hd,htd->ht", query[0, :, -1].float(), keys)  # softmax is monotone: logits rank alike
        self.top[layer] = logits.topk(min(self.top_k, self.prompt_len), -1).indices


def needle_positions(prompt_ids: List[int], key_ids: List[int]) -> List[int]:
    """Prompt positions inside any occurrence of the key's token sequence (the needle states the key)."""
    m, out = len(key_ids), set()
    for i in range(len(prompt_ids) - m + 1):
        if prompt_ids[i:i + m] == key_ids:
            out.update(range(i, i + m))
    return sorted(out)


@torch.no_grad()
def cell_scores(model, prompt_ids: torch.Tensor, key_ids: List[int], top_k: int) -> torch.Tensor:
    """``[layers, heads]`` retrieval scores of one prompt whose needle holds ``key_ids``."""
    ids = prompt_ids[0].tolist()
    needle = needle_positions(ids, key_ids)
    if not needle:
        raise ConfigError("the key's tokens are not found in the prompt (tokenizer merges them with their context)")
    layers = model.config.num_hidden_layers
    policy = TopAttended(top_k=top_k, prompt_len=len(ids))
    cache = CompressedCache(policy, layers)
    device = next(model.parameters()).device
    scores = torch.zeros(layers, model.config.num_attention_heads)
    inputs = torch.cat([prompt_ids, torch.tensor([key_ids[:-1]], dtype=torch.long)], 1).to(device)
    feed = [inputs[:, :len(ids)]] + [inputs[:, t:t + 1] for t in range(len(ids), inputs.shape[1])]
    is_needle = torch.zeros(len(ids), dtype=torch.bool)
    is_needle[needle] = True
    prompt = torch.tensor(ids)
    for step, chunk in enumerate(feed):
        model(chunk, use_cache=True, **with_cache(cache))
        target = key_ids[step]
        for layer, top in enumerate(policy.top):
            top = top.cpu()
            hit = (is_needle[top] & (prompt[top] == target)).any(-1)  # [heads]
            scores[layer] += hit.float() / len(key_ids)
    return scores


def parse_args(argv=None):
    p, g = parser(__doc__)
    add_model_flags(g["model"])
    g["data"].add_argument("--lengths", default="500,1000,2000",
                           help="context lengths in tokens (comma-separated; default 500,1000,2000)")
    g["data"].add_argument("--depths", default="0,0.25,0.5,0.75,1",
                           help="needle depths in [0, 1] (comma-separated; default 0,0.25,0.5,0.75,1)")
    g["data"].add_argument("--seed", type=int, default=0, help="passkey seed (default 0)")
    g["method"].add_argument("--top_k", type=int, default=1,
                             help="a head copies when the token is among its top_k attended (1: Wu et al.; "
                                  "HeadKV widens it; default 1)")
    g["output"].add_argument("--output", default=None,
                             help="scores file (default head_scores/{model}.json; run.json beside it)")
    return p.parse_args(argv)


def validate(args) -> None:
    args.output_dir = str(Path(args.output or "head_scores").parent if args.output else "head_scores")
    check_run_flags(args)
    if args.output:
        check_output_file(args.output)
    args.length_list = int_list(args, "lengths", 16, "context lengths")
    at_least_one(args, "top_k")
    try:
        args.depth_list = [float(d) for d in args.depths.split(",")]
    except ValueError:
        raise ConfigError(f"--depths must be comma-separated numbers in [0, 1], got {args.depths!r}") from None
    if not all(0 <= d <= 1 for d in args.depth_list):
        raise ConfigError(f"--depths must be in [0, 1], got {args.depths!r}")


def body(args) -> int:
    from niah.haystack import build_prompt

    model, tokenizer = load(args)
    out = Path(args.output) if args.output else Path("head_scores") / f"{safe_name(Path(args.model_name_or_path).name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cells = [(length, depth) for length in args.length_list for depth in args.depth_list]
    per_cell = []
    for length, depth in progress(cells, "head scores"):
        prompt = build_prompt(tokenizer, "passkey", length, depth, args.seed, 0, chat=True)
        key_ids = tokenizer.encode(prompt.answer, add_special_tokens=False)
        per_cell.append(cell_scores(model, prompt.input_ids, key_ids, args.top_k))
    stacked = torch.stack(per_cell)  # [cells, layers, heads]
    table = {f"{layer}-{head}": stacked[:, layer, head].tolist()
             for layer in range(stacked.shape[1]) for head in range(stacked.shape[2])}
    out.write_text(json.dumps(table))
    mean = stacked.mean(0)
    best = sorted(((float(mean[l, h]), f"{l}-{h}") for l in range(mean.shape[0]) for h in range(mean.shape[1])),
                  reverse=True)[:5]
    write_json(out.with_suffix(".run.json"), run_record(
        {k: v for k, v in vars(args).items() if k != "model_identity"}, setting={
            "model": args.model_identity, "lengths": args.length_list, "depths": args.depth_list, "seed": args.seed,
            "top_k": args.top_k}, complete=True, cells=len(cells), scores_file=str(out),
        strongest_heads=best))
    print(f"head scores of {len(cells)} cells in {out}; strongest heads: "
          + ", ".join(f"{name} ({score:.2f})" for score, name in best))
    return 0


main = cli(parse_args, body, validate)

if __name__ == "__main__":
    sys.exit(main())
