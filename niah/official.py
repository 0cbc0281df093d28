"""The LaCache repository's passkey construction (``niah/pred.py`` @ 0f27c33), for ``--protocol lacache``.

What the official script does, and this module re-creates (pure functions: no model, no files):

* **Sizes in characters.** Context point ``p = 0 .. max_tokens // interval - 1`` gets
  ``int(3.75 * (p + 1) * interval // 1024 * 1024)`` filler characters (about 3.75 characters per
  token), so ``--interval 512`` gives a prompt of about 730 tokens, not 512.
* **Depths** are the filler prefixes ``0, n // 10, 2 (n // 10), ...`` up to ``n`` characters, labelled
  ``round(100 * prefix / n, -1)``.
* **Filler** is the landmark-attention snippet repeated and cut at a character count (often mid-word);
  the text after the needle starts the snippet again from its beginning.
* **Prompt**: task description, filler prefix, the key line, filler suffix, question, joined by newlines,
  tokenised with the tokenizer's special tokens and no chat template.
* **Key**: ``random.Random(test).randint(1, 99999)``: test ``t`` has the same key in every cell.
* **Answer budget**: the token count of the key as the tokenizer encodes it (BOS included).
* **Score**: the key's digits as a substring of the answer; the CSV has one row per cell
  (``Context Length`` = mean prompt tokens, floor; ``Score`` = tests passed) and the heatmap's
  columns read ``1k, 2k, ...``, its rows ``0.0, 10.0, ..., 100.0``.

Where the official script is defective we keep our behaviour (docs/benchmarks.md, "Needle in a haystack"):
the answer is decoded from the generated tokens only (its full-cache path decodes the last tokens of
the output, prompt tail included when generation stopped early); EOS stops decoding even as the first
token; the answer budget is the key's tokens plus one whether or not the tokenizer adds a BOS (without
a BOS the official budget cuts off the key's last token when a leading space takes one); an
``--interval`` whose points get no filler (``ZeroDivisionError`` there) is rejected with a one-line error.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Tuple

TASK = ("There is important information hidden in a lot of irrelevant text. "
        "Find it and memorize it. You will be quizzed on this hidden information.")
SNIPPET = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
           "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
CSV_COLUMNS = ("Context Length", "Document Depth", "Score")


@dataclass(frozen=True)
class Cell:
    """One (context point, depth) of the official grid."""

    length: int  # nominal context length, (p + 1) * interval
    garbage: int  # filler characters
    prefix: int  # filler characters before the key line
    depth: float  # the official label, round(100 * prefix / garbage, -1)


def garbage_chars(point: int, interval: int) -> int:
    """Filler characters of context point ``point`` (0-based), as the official script computes them."""
    return int(3.75 * (point + 1) * interval // 1024 * 1024)


def min_interval() -> int:
    """Smallest ``--interval`` whose first point gets any filler."""
    interval = 1
    while garbage_chars(0, interval) == 0:
        interval += 1
    return interval


def grid(max_tokens: int, interval: int) -> List[Cell]:
    """Every cell of the official sweep, in its order."""
    cells = []
    for point in range(max_tokens // interval):
        garbage = garbage_chars(point, interval)
        if garbage == 0:
            raise ValueError(f"interval {interval} gives no filler; it must be >= {min_interval()}")
        for prefix in range(0, garbage + 1, max(garbage // 10, 1)):
            cells.append(Cell((point + 1) * interval, garbage, prefix, round(prefix / garbage * 100, -1)))
    return cells


def prompt(cell: Cell, test: int) -> Tuple[str, str]:
    """``(prompt text, key)`` of test ``test`` in ``cell``."""
    text = SNIPPET * (cell.garbage // len(SNIPPET) + 1)
    key = random.Random(test).randint(1, 99999)
    lines = [TASK, text[:cell.prefix], KEY_LINE.format(key=key), text[:cell.garbage - cell.prefix], QUESTION]
    return "\n".join(lines), str(key)


def answer_budget(tokenizer, key: str) -> int:
    """Answer tokens: the key's own tokens plus one (the official count when the tokenizer adds one BOS)."""
    return len(tokenizer(key, add_special_tokens=False).input_ids) + 1


def row_label(depth: float) -> str:
    """The official heatmap's row label: the depth as ``pd.read_csv`` gives it back from the CSV, a float
    printed as ``0.0, 10.0, ..., 100.0`` (``ax.set_yticklabels(document_depths)``)."""
    return str(float(depth))


def column_label(mean_tokens: int, method: str) -> str:
    """The official heatmap's column label: the mean prompt length rounded to thousands, in ``k`` of
    1024 for a LaCache sweep and of 1000 otherwise (the official script's two plotting functions)."""
    rounded = round(mean_tokens / 1000) * 1000
    return f"{int(round(rounded / (1024 if method == 'lacache' else 1000)))}k"
