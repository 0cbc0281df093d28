"""Needle-in-a-haystack prompts and scores (pure functions: no model, no files).

Two modes:

``passkey`` (the LaCache paper's Figs. 8-9, after the landmark-attention passkey test)
    task description, the filler ``"The grass is green. ... There and back again."`` repeated, the
    line ``"The pass key is {key}. Remember it. {key} is the pass key."`` inserted at the requested
    depth of the filler, then ``"What is the pass key? The pass key is"``; the parts are joined by
    newlines as in the official script. The key (1..99999) is drawn from a generator seeded by
    ``(seed, length, depth, test)``, so any cell can be recomputed alone. Score: 100 if the key's
    digits appear in the answer, else 0 (the official rule ``str(key) in answer``).

``essays`` (Kamradt's needle-in-a-haystack)
    Paul Graham's essays (``harness.data.pg_essays()``), starting from an essay drawn per test
    (seeded like the pass keys) and cycling through all of them, with the sentence
    ``"The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny
    day."`` inserted at the depth, then ``"What is the best thing to do in San Francisco? Don't give
    information outside the document or repeat your findings."`` (the question and suffix of
    Kamradt's ``LLMNeedleHaystackTester``). Score: **not** the original GPT-4 judge (it needs an API
    we cannot call offline) but the percentage of the needle's content words ``eat sandwich sit
    dolores park sunny day`` found in the answer (lower-cased, punctuation stripped, whole words).
    The words of the question (best, thing, San Francisco) are left out, so repeating the question
    scores 0; a correct paraphrase that drops words scores partially.

Depth and size, both modes: the needle goes at the sentence boundary of the haystack nearest to
``depth`` percent of its characters (0: before the first sentence, 100: after the last), and the
haystack holds the largest whole number of units (filler repeats, or essay sentences) for which the
whole prompt, tokenized by the model's own tokenizer (chat template included when used), has at
most ``length`` tokens. The real count is recorded with every result.
"""
from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

MODES = ("passkey", "essays")

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

ESSAY_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
ESSAY_QUESTION = ("What is the best thing to do in San Francisco? "
                  "Don't give information outside the document or repeat your findings.")
#: Words of the needle that answer the question (scored in essays mode); the question's own words are left out.
ESSAY_ANSWER_WORDS = ("eat", "sandwich", "sit", "dolores", "park", "sunny", "day")
ESSAY_SEPARATOR = "\n\n"

#: Where a sentence ends: ``.``, ``!`` or ``?``, closing quotes/brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


# ----------------------------------------------------------------------------------------- seeds
def cell_seed(seed: int, length: int, depth: float, test: int) -> int:
    """A 64-bit seed for one test of one (length, depth) cell (stable across runs, platforms, Python versions)."""
    text = f"{seed}|{length}|{depth_label(depth)}|{test}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def pass_key(seed: int, length: int, depth: float, test: int) -> int:
    """The pass key of one test: uniform in 1..99999."""
    return random.Random(cell_seed(seed, length, depth, test)).randint(1, 99999)


def essay_start(seed: int, length: int, depth: float, test: int, num_essays: int) -> int:
    """Index of the essay one essays-mode test starts from."""
    return random.Random(cell_seed(seed, length, depth, test)).randrange(num_essays)


def depth_label(depth: float) -> str:
    """Canonical text of a depth in percent (``50`` not ``50.0``); the CSV's and the seeds' key."""
    return f"{float(depth):.10g}"


# ----------------------------------------------------------------------------------------- haystacks
def sentence_starts(text: str) -> List[int]:
    """Character offsets where a sentence may be inserted: 0, every sentence start, and ``len(text)``."""
    starts = [0] + [m.end() for m in _SENTENCE_END.finditer(text) if m.end() < len(text)]
    return starts + [len(text)]


def insert_at_depth(haystack: str, needle: str, depth: float) -> Tuple[str, int]:
    """``(context, offset)``: ``needle`` on its own line at the sentence boundary of ``haystack``
    nearest to ``depth`` percent of its characters; ``offset`` is where the needle starts in ``context``."""
    target = len(haystack) * depth / 100.0
    cut = min(sentence_starts(haystack), key=lambda b: (abs(b - target), b))
    before, after = haystack[:cut].rstrip(), haystack[cut:].lstrip()
    parts = [p for p in (before, needle, after) if p]
    context = "\n".join(parts)
    return context, len(before) + 1 if before else 0


def needle_depth(context: str, needle: str) -> float:
    """Where ``needle`` sits in ``context``, as a fraction of the rest of the text (0: first, 1: last)."""
    rest = len(context) - len(needle)
    return context.index(needle) / rest if rest > 0 else 0.0


def filler(repeats: int) -> str:
    """The passkey filler, ``repeats`` times."""
    return " ".join([FILLER] * repeats)


def essay_haystack(essays: Sequence[str], start: int, sentences: int) -> str:
    """The first ``sentences`` sentences of the essays read from ``essays[start]`` on, cycling round."""
    if not essays:
        raise ValueError("no essays")
    order = list(essays[start:]) + list(essays[:start])
    one_pass = ESSAY_SEPARATOR.join(e.strip() for e in order)
    starts = sentence_starts(one_pass)[:-1]  # the start of every sentence of one pass
    rounds, rest = divmod(sentences, len(starts))
    text = ESSAY_SEPARATOR.join([one_pass] * rounds)
    if rest:
        text = (text + ESSAY_SEPARATOR if text else "") + one_pass[:starts[rest]]
    return text.rstrip()


def passkey_text(key: int, repeats: int, depth: float) -> str:
    """The raw passkey prompt (before any chat template)."""
    context, _ = insert_at_depth(filler(repeats), PASSKEY_NEEDLE.format(key=key), depth)
    return "\n".join([TASK_DESCRIPTION, context, PASSKEY_QUESTION])


def essay_text(essays: Sequence[str], start: int, sentences: int, depth: float) -> str:
    """The raw essays prompt (before any chat template)."""
    context, _ = insert_at_depth(essay_haystack(essays, start, sentences), ESSAY_NEEDLE, depth)
    return f"{context}\n\n{ESSAY_QUESTION}"


# ----------------------------------------------------------------------------------------- sizing
def fit_units(count: Callable[[int], int], length: int, max_units: int, guess: Optional[int] = None) -> int:
    """Largest ``n`` in ``[0, max_units]`` with ``count(n) <= length`` (``count`` nondecreasing); 0 if none.

    Starts from ``guess`` (default: a linear estimate from ``count(0)`` and one probe) and gallops, so a
    good guess costs two or three calls of ``count`` (each one tokenizes a whole prompt).
    """
    cache = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = count(n)
        return cache[n] <= length

    if not fits(0):
        return 0

    def clamp(n: int) -> int:
        return max(0, min(max_units, int(n)))

    if guess is None:  # linear estimate from the empty haystack and a small one
        probe = clamp(32) or 1
        fits(probe)
        guess = (length - cache[0]) * probe / max(cache[probe] - cache[0], 1)
    guess = clamp(guess)
    for _ in range(2):  # secant steps from the guess's own count
        fits(guess)
        if guess == 0:
            break
        per_unit = max(cache[guess] - cache[0], 1) / guess
        better = clamp(guess + (length - cache[guess]) // per_unit)
        if better == guess:
            break
        guess = better
    step = 1
    if fits(guess):  # gallop up, then bisect in (lo, hi)
        lo, hi = guess, None
        while hi is None:
            if lo == max_units:
                return lo
            nxt = min(max_units, lo + step)
            if fits(nxt):
                lo, step = nxt, step * 2
            else:
                hi = nxt
    else:  # gallop down
        hi, lo = guess, None
        while lo is None:
            nxt = max(0, hi - step)
            if fits(nxt):
                lo = nxt
            else:
                hi, step = nxt, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Prompt:
    """One test's prompt: raw text, token ids (chat template applied when asked), what to find, and its size."""

    text: str
    input_ids: object  # LongTensor [1, T]
    answer: str  # the pass key's digits, or the needle sentence
    units: int  # filler repeats or essay sentences in the haystack

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


def build_prompt(tokenizer, mode: str, length: int, depth: float, seed: int, test: int, chat: bool = True,
                 essays: Optional[Sequence[str]] = None, guess: Optional[int] = None) -> Prompt:
    """The prompt of test ``test`` of cell ``(length, depth)``, sized to at most ``length`` tokens of ``tokenizer``.

    ``guess``: a unit count to start the size search from (e.g. the previous test's), to save tokenizer calls.
    """
    from harness.generation import encode_prompt

    if mode == "passkey":
        key = pass_key(seed, length, depth, test)
        answer = str(key)

        def text_of(n):
            return passkey_text(key, n, depth)
    elif mode == "essays":
        if not essays:
            raise ValueError("essays mode needs the essays")
        start = essay_start(seed, length, depth, test, len(essays))
        answer = ESSAY_NEEDLE

        def text_of(n):
            return essay_text(essays, start, n, depth)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    encoded = {}

    def count(n):
        encoded[n] = encode_prompt(tokenizer, text_of(n), chat)
        return encoded[n].shape[1]

    n = fit_units(count, length, max_units=max(length, 1), guess=guess)
    ids = encoded[n] if n in encoded else encode_prompt(tokenizer, text_of(n), chat)
    return Prompt(text_of(n), ids, answer, n)


# ----------------------------------------------------------------------------------------- scores
def words(text: str) -> List[str]:
    """Lower-cased words of ``text`` with punctuation stripped."""
    return text.lower().translate(_PUNCT).split()


def score_passkey(pred: str, key) -> float:
    """100 if the key's digits appear in the answer, else 0 (the official ``str(key) in answer``)."""
    return 100.0 if str(key).strip() in pred else 0.0


def score_essay(pred: str) -> float:
    """Percentage of the needle's content words (:data:`ESSAY_ANSWER_WORDS`) that the answer contains."""
    found = set(words(pred))
    return 100.0 * sum(w in found for w in ESSAY_ANSWER_WORDS) / len(ESSAY_ANSWER_WORDS)


def score(mode: str, pred: str, answer: str) -> float:
    return score_passkey(pred, answer) if mode == "passkey" else score_essay(pred)
