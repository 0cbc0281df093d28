"""The LaCache paper's reported numbers, for printing our results beside them.

The numbers live in ``paper_results.md`` next to this module (transcribed from the paper, arXiv
2507.14204); this module parses its markdown tables so there is one copy of every number.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

SOURCE = Path(__file__).with_name("paper_results.md")


def _cell(text: str):
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return text


@lru_cache(maxsize=None)
def tables() -> Dict[str, List[List]]:
    """Every markdown table of the paper file, keyed by the ``## `` heading above it.

    Each table is a list of rows (header first); numeric cells are floats (``nan`` where the paper
    reports a diverged perplexity).
    """
    out: Dict[str, List[List]] = {}
    heading = None
    for line in SOURCE.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and heading is not None:
            cells = [_cell(c) for c in line.strip().strip("|").split("|")]
            if all(isinstance(c, str) and set(c.strip()) <= {"-", ":"} for c in cells):
                continue  # the |---| separator
            out.setdefault(heading, []).append(cells)
    return out


def table(prefix: str) -> List[List]:
    """The table whose heading starts with ``prefix`` (e.g. ``"Table 3"``)."""
    for heading, rows in tables().items():
        if heading.startswith(prefix):
            return rows
    raise KeyError(f"no table starting with {prefix!r} in {SOURCE.name}")


def longbench(model: str) -> Dict[str, Dict[str, float]]:
    """LongBench scores by ``{column: {dataset: score}}``.

    ``model``: ``"llama2-7b-chat"``, ``"llama2-13b-chat"`` (Table 3) or ``"smollm2-1.7b-instruct"``
    (Table 4). Columns: ``full``, ``streamingllm_0.5``, ``streamingllm_0.25``, ``lacache_0.5``,
    ``lacache_0.25``.
    """
    columns = ["full", "streamingllm_0.5", "streamingllm_0.25", "lacache_0.5", "lacache_0.25"]
    if model in ("llama2-7b-chat", "llama2-13b-chat"):
        rows, first = table("Table 3"), 1 if model == "llama2-7b-chat" else 6
    elif model == "smollm2-1.7b-instruct":
        rows, first = table("Table 4"), 1
    else:
        raise KeyError(f"the paper reports LongBench for llama2-7b-chat, llama2-13b-chat and smollm2-1.7b-instruct, "
                       f"not {model!r}")
    return {col: {row[0]: row[first + k] for row in rows[1:]} for k, col in enumerate(columns)}


def ruler() -> Dict[str, Dict[str, float]]:
    """RULER Table 5 (LongChat-7b-v1.5-32k, 50% budget, 16K): ``{method: {task: score}}``."""
    rows = table("Table 5")
    names = {"single1": "niah_single_1", "single2": "niah_single_2", "single3": "niah_single_3",
             "multikey1": "niah_multikey_1", "multikey2": "niah_multikey_2", "multikey3": "niah_multikey_3",
             "multivalue": "niah_multivalue", "multiquery": "niah_multiquery", "qa1": "qa_1", "qa2": "qa_2"}
    header = [names.get(h, h) for h in rows[0][1:]]
    return {row[0].lower(): dict(zip(header, row[1:])) for row in rows[1:]}


def perplexity(prefix: str = "Table 1") -> Dict[str, Dict[str, float]]:
    """Perplexity tables: ``{row label: {length: ppl}}``; method rows are prefixed with their model's name."""
    rows = table(prefix)
    header = rows[0][1:]
    out, model = {}, ""
    for row in rows[1:]:
        label = row[0]
        if label.endswith(" full") or label == "full":
            model = label[:-len(" full")] if label.endswith(" full") else ""
        key = label if label.startswith(model) else f"{model} {label}".strip()
        out[key] = {h: v for h, v in zip(header, row[1:]) if not (isinstance(v, float) and math.isnan(v))}
    return out
