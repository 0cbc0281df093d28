"""RULER's 13 tasks (Hsieh et al. 2024, arXiv 2404.06654), generated offline and sized with a tokenizer.

Written from the paper's task definitions and the RULER repository's configs (``synthetic.yaml``,
``constants.py``): same templates, answer prefixes, ``tokens_to_generate``, key/value types and
counts. Every sample is built by a *builder* from a haystack size ``n`` (essay words, noise lines,
distractor needles, list entries or documents) and a random generator re-seeded per sample, then
``n`` is searched so that ``input + answer_prefix`` plus the task's ``max_new_tokens`` fits
``max_length`` tokens of the target tokenizer as tightly as the haystack unit allows.

Offline sources: the Paul Graham essays of ``harness.data.pg_essays()`` (the essay haystack,
and the vocabulary of common words for ``cwe``); word keys are ``adjective-noun`` pairs from the
lists below (RULER draws the same shape from ``wonderwords``). SQuAD v2.0 / HotpotQA are read by
:func:`load_squad` / :func:`load_hotpotqa` from the official JSON files or ``datasets`` rows.
"""
from __future__ import annotations

import bisect
import json
import math
import random
import re
import string
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from lacache_core.errors import ConfigError

# RULER's needle depths: 40 evenly spaced percentages, rounded to integers.
DEPTHS: List[int] = [int(round(100 * i / 39)) for i in range(40)]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DOCUMENT = "Document {i}:\n{document}"

# Templates and answer prefixes are RULER's, verbatim (including the prefix typo "assgined").
# RULER makes the single-needle NIAH prompt singular by string substitution; both forms are spelled out.
NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n{context}\n"
                 "What are all the special magic {kind} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"
NIAH_TEMPLATE_ONE = ("A special magic {kind} is hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the {kind} afterwards.\n{context}\n"
                     "What is the special magic {kind} for {query} mentioned in the provided text?")
NIAH_PREFIX_ONE = " The special magic {kind} for {query} mentioned in the provided text is"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
             "are assgined the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the {num_cw} most common words in the above list?")
CWE_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
               "the given documents. Only give me the answer and do not output any other words.\n\n"
               "Question: {query}")
QA_PREFIX = " Answer:"


@dataclass(frozen=True)
class TaskConfig:
    """One RULER task: its family (``kind``), generation length and complexity settings."""

    kind: str                      # niah | vt | cwe | fwe | qa
    max_new_tokens: int            # RULER's tokens_to_generate
    haystack: str = ""             # niah: repeat | essay | needle
    key_type: str = "words"        # niah: words | numbers | uuids
    value_type: str = "numbers"
    num_keys: int = 1              # needles with distinct keys (the extra ones are distractors)
    num_values: int = 1            # values per key
    num_queries: int = 1           # keys asked about
    num_chains: int = 1            # vt
    num_hops: int = 4
    freq_cw: int = 30              # cwe (RULER uses 6/1 and a smaller example below 4096 tokens)
    freq_ucw: int = 3
    num_cw: int = 10
    alpha: float = 2.0             # fwe: Zipf exponent
    coded_wordlen: int = 6
    dataset: str = ""              # qa: squad | hotpotqa


# RULER's synthetic.yaml, one entry per task (its order is the paper's table order).
TASKS: Dict[str, TaskConfig] = {
    "niah_single_1": TaskConfig("niah", 128, haystack="repeat"),
    "niah_single_2": TaskConfig("niah", 128, haystack="essay"),
    "niah_single_3": TaskConfig("niah", 128, haystack="essay", value_type="uuids"),
    "niah_multikey_1": TaskConfig("niah", 128, haystack="essay", num_keys=4),
    "niah_multikey_2": TaskConfig("niah", 128, haystack="needle"),
    "niah_multikey_3": TaskConfig("niah", 128, haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": TaskConfig("niah", 128, haystack="essay", num_values=4),
    "niah_multiquery": TaskConfig("niah", 128, haystack="essay", num_keys=4, num_queries=4),
    "vt": TaskConfig("vt", 30),
    "cwe": TaskConfig("cwe", 120),
    "fwe": TaskConfig("fwe", 50),
    "qa_1": TaskConfig("qa", 32, dataset="squad"),
    "qa_2": TaskConfig("qa", 32, dataset="hotpotqa"),
}
TASK_NAMES: List[str] = list(TASKS)

ADJECTIVES = """
able acidic adorable agile alert amber ancient angry anxious arctic aromatic ashamed awake bashful bitter blazing
bold brave breezy bright brisk broad bumpy busy calm careful cheerful chilly clever cloudy clumsy colossal cosmic
crisp crooked curious damp daring dazzling deep delicate dizzy drowsy dusty eager early elegant empty fancy fearless
fierce fluffy foggy fragile frantic fresh friendly frozen fuzzy gentle giant gifted glossy golden graceful grumpy
happy harsh hasty hidden hollow honest humble hungry icy idle jolly juicy kind lazy lively lonely loud lucky magenta
mellow merry mighty misty modern muddy narrow nervous nimble noisy odd orange patient plain polite proud purple
quick quiet rapid rare rough royal rusty salty scarlet shaggy shiny silent silky silver sleepy slim smooth snowy
soft sour sparkling spicy steady sticky stormy strange sturdy sunny swift tall tame tender thirsty tidy tiny tricky
vast velvet violet wandering warm wary weary wicked wild windy wise witty wooden young zealous
""".split()
NOUNS = """
acorn airport anchor apple apricot armchair arrow avocado backpack badger balloon banana barn basket beacon beaver
bicycle biscuit blanket blossom boat bottle boulder bridge broom bucket butterfly cabin cactus camel candle canoe
canyon carpet carrot castle cathedral cello chair cherry chimney circus cliff clock comet compass cookie coral
cottage crayon cricket crystal cupboard curtain cushion daisy desert diamond dolphin donkey dragon drum eagle
elephant engine falcon feather fence ferry fiddle flamingo forest fountain fox galaxy garden garlic giraffe glacier
goblet gorilla guitar hammer harbor harp hedgehog helmet hippo honey horizon island jacket jaguar jellyfish jungle
kangaroo kettle kite ladder lagoon lantern lemon leopard library lighthouse lizard lobster locomotive magnet mango
marble meadow mirror mitten monkey mountain mushroom napkin necklace notebook oasis octopus orchard otter owl
paddle palace panda parrot peach pebble pelican pencil penguin piano pillow pineapple planet pocket pumpkin puzzle
quilt rabbit raccoon radio rainbow raven ribbon river robot rocket saddle sailboat sandwich satellite scarf seashell
shovel skyscraper sled snail spider squirrel statue submarine sunflower swan sweater teapot telescope tiger tomato
tractor trumpet tulip tunnel turtle umbrella unicorn valley violin volcano wagon walrus waterfall whale whistle
window wizard yacht zebra
""".split()


@dataclass
class Draft:
    """A sample before sizing bookkeeping: prompt parts, references and needle depths."""

    input: str
    answer_prefix: str
    outputs: List[str]
    depth: Optional[List[float]] = None


# ---------------------------------------------------------------------------------------------
# Offline text sources

# The essay files carry a few Windows-1252 bytes decoded as C1 controls (em dash, apostrophe).
_ESSAY_FIXES = str.maketrans({"\x97": "\u2014", "\x92": "\u2019", "\x93": "\u201c", "\x94": "\u201d", "\xa0": " "})


@lru_cache(maxsize=1)
def essay_words() -> Tuple[str, ...]:
    """All Paul Graham essays as one whitespace-split word sequence (RULER's essay haystack)."""
    from harness.data import pg_essays

    text = " ".join(e.translate(_ESSAY_FIXES) for e in pg_essays())
    return tuple(text.split())


@lru_cache(maxsize=1)
def common_words() -> Tuple[str, ...]:
    """Common English words for ``cwe``: lowercase words of 4-10 letters used 3+ times in the essays.

    RULER samples from wonderwords' noun/adjective/verb lists; this is an offline stand-in of
    similar size (about 2,500 words). Contraction stems (``didn`` of ``didn't``) are left out.
    """
    text = " ".join(essay_words())
    counts = Counter(re.findall(r"[A-Za-z]+", text))
    stems = set(re.findall(r"([A-Za-z]+)['\u2019][a-z]", text))
    return tuple(sorted(w for w, c in counts.items()
                        if c >= 3 and w.islower() and 4 <= len(w) <= 10 and w not in stems))


def split_sentences(text: str) -> List[str]:
    """Split at whitespace after ``.``, ``!`` or ``?`` (a light stand-in for NLTK's ``sent_tokenize``)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# ---------------------------------------------------------------------------------------------
# QA data


@dataclass
class QAItem:
    """One answerable question: gold documents, same-article documents, documents to report depth for."""

    query: str
    outputs: List[str]
    gold: List[int]
    more: List[int] = field(default_factory=list)
    support: List[int] = field(default_factory=list)


@dataclass
class QAData:
    name: str
    docs: List[str]
    items: List[QAItem]


def _read_json_or_jsonl(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def load_squad(source) -> QAData:
    """SQuAD from the official JSON (v2.0 or v1.1 dev) at a path, or from ``datasets`` rows.

    As RULER: documents are the unique paragraphs (sorted), questions the answerable ones in file
    order, and a question's first distractors are the other paragraphs of its article.
    """
    raw = _read_json_or_jsonl(Path(source)) if isinstance(source, (str, Path)) else source
    articles: Dict[str, List[Tuple[str, List[Tuple[str, List[str]]]]]] = {}
    if isinstance(raw, dict) and "data" in raw:  # official format
        for art in raw["data"]:
            for par in art["paragraphs"]:
                qas = [(q["question"], [a["text"] for a in q.get("answers", [])])
                       for q in par["qas"] if not q.get("is_impossible", False)]
                articles.setdefault(art.get("title", ""), []).append((par["context"], qas))
    else:  # datasets rows: one question per row
        for row in raw:
            paras = articles.setdefault(row.get("title", ""), [])
            if not paras or paras[-1][0] != row["context"]:
                paras.append((row["context"], []))
            answers = row["answers"]["text"] if isinstance(row["answers"], dict) else row["answers"]
            if answers:
                paras[-1][1].append((row["question"], list(answers)))
    docs = sorted({ctx for paras in articles.values() for ctx, _ in paras})
    doc_id = {d: i for i, d in enumerate(docs)}
    items = []
    for paras in articles.values():
        article_docs = list(dict.fromkeys(doc_id[ctx] for ctx, _ in paras))
        for ctx, qas in paras:
            gold = doc_id[ctx]
            for question, answers in qas:
                answers = list(dict.fromkeys(a for a in answers if a.strip()))
                if answers:
                    items.append(QAItem(question, answers, [gold], [d for d in article_docs if d != gold], [gold]))
    return QAData("squad", docs, items)


def load_hotpotqa(source) -> QAData:
    """HotpotQA (distractor setting) from the official dev JSON at a path, or from ``datasets`` rows.

    As RULER: a document is ``title\\n`` + its sentences joined, and all ten paragraphs of a
    question (2 supporting + 8 distractors) are its gold documents; depth is reported for the
    supporting ones.
    """
    raw = _read_json_or_jsonl(Path(source)) if isinstance(source, (str, Path)) else source
    rows = []
    for row in raw:
        ctx, sup = row["context"], row.get("supporting_facts", [])
        if isinstance(ctx, dict):  # datasets layout: {"title": [...], "sentences": [[...]]}
            ctx = list(zip(ctx["title"], ctx["sentences"]))
        if isinstance(sup, dict):
            sup = list(zip(sup["title"], sup["sent_id"]))
        paragraphs = [(title, f"{title}\n{''.join(sents)}") for title, sents in ctx]
        rows.append((row["question"], row["answer"], paragraphs, {t for t, _ in sup}))
    docs = sorted({text for _, _, paragraphs, _ in rows for _, text in paragraphs})
    doc_id = {d: i for i, d in enumerate(docs)}
    items = []
    for question, answer, paragraphs, titles in rows:
        gold = list(dict.fromkeys(doc_id[text] for _, text in paragraphs))
        support = list(dict.fromkeys(doc_id[text] for title, text in paragraphs if title in titles))
        items.append(QAItem(question, [answer], gold, [], support))
    return QAData("hotpotqa", docs, items)


# ---------------------------------------------------------------------------------------------
# Random pieces


def random_number(rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1))  # RULER: 7 digits


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_word(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


RANDOM = {"numbers": random_number, "uuids": random_uuid, "words": random_word}


def distinct(rng: random.Random, draw: Callable[[random.Random], str], k: int, exclude: Iterable[str] = ()) -> List[str]:
    """``k`` distinct draws not in ``exclude``; the first ``m`` draws do not depend on ``k``."""
    seen, out = set(exclude), []
    while len(out) < k:
        x = draw(rng)
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def distinct_indices(rng: random.Random, size: int, k: int, exclude: Iterable[int] = ()) -> List[int]:
    """``k`` distinct indices of ``range(size)`` outside ``exclude``, prefix-stable like :func:`distinct`.

    Prefix stability keeps a larger haystack a superset of a smaller one, so the token count grows
    monotonically with the haystack size that the length search varies.
    """
    return [int(x) for x in distinct(rng, lambda r: str(r.randrange(size)), k, (str(e) for e in exclude))]


@lru_cache(maxsize=None)
def zeta(alpha: float) -> float:
    """Riemann zeta for ``alpha > 1`` (partial sum plus Euler-Maclaurin tail; no scipy needed)."""
    n = 10_000
    return sum(k ** -alpha for k in range(1, n + 1)) + n ** (1 - alpha) / (alpha - 1) - n ** -alpha / 2


def interleave(units: Sequence[str], needles: Sequence[str], positions: Sequence[int]) -> List[str]:
    """Put ``needles[j]`` after the first ``positions[j]`` units (``positions`` ascending)."""
    out, start = [], 0
    for needle, pos in zip(needles, positions):
        out.extend(units[start:pos])
        out.append(needle)
        start = pos
    out.extend(units[start:])
    return out


def depth_position(units: Sequence[str], sep_len: int, depth: float) -> int:
    """How many units go before a needle at ``depth`` percent: the unit boundary nearest that share of
    the haystack's characters (RULER counts sentences instead, which drifts where sentence lengths vary)."""
    bounds = [0]
    for u in units:
        bounds.append(bounds[-1] + len(u) + sep_len)
    target = depth / 100 * max(bounds[-1] - sep_len, 0)
    i = bisect.bisect_left(bounds, target)
    return min((j for j in (i - 1, i) if 0 <= j < len(bounds)), key=lambda j: abs(bounds[j] - target))


def numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def largest_fitting(length: Callable[[int], int], budget: int, lo: int, hi: int, guess: int) -> int:
    """Largest ``n`` in ``[lo, hi]`` with ``length(n) <= budget``, given that ``lo`` fits.

    Token counts grow about linearly with the haystack size, so each step jumps to the linear
    prediction of the boundary from two evaluated sizes (a secant step) and falls back to halving
    the bracket when a step did not halve it: a few tokenizations per sample instead of a dozen.
    """
    seen = {lo: length(lo)}
    bad = hi + 1  # smallest size known not to fit (hi + 1: assumed)
    n = min(max(guess, lo), hi)
    width = bad - lo
    while True:
        if n not in seen:
            seen[n] = length(n)
        if seen[n] <= budget:
            lo = max(lo, n)
        else:
            bad = min(bad, n)
        if bad - lo <= 1:
            return lo
        # Secant through lo and the nearest other evaluation; inside a true bracket, halve instead
        # when the last step did not halve it (guards against one-sided creeping).
        other = bad if bad in seen else max((k for k in seen if k < lo), default=None)
        slope = None if other is None else (seen[other] - seen[lo]) / (other - lo)
        if slope and slope > 0 and (bad not in seen or 2 * (bad - lo) <= width):
            n = lo + int((budget - seen[lo]) / slope)
        else:
            n = (lo + bad) // 2
        n = min(max(n, lo + 1), bad - 1)
        width = bad - lo


# ---------------------------------------------------------------------------------------------
# The generator


class RulerGenerator:
    """Builds RULER samples for one tokenizer and one ``max_length``.

    Parameters
    ----------
    tokenizer
        A ``transformers`` tokenizer; lengths count ``tokenizer(text)["input_ids"]``, so special
        tokens it adds (e.g. BOS) are included.
    max_length
        Budget for prompt + answer prefix + the task's ``max_new_tokens``.
    seed
        Samples depend only on ``(seed, task, index)`` and the haystack size, so a rerun with the
        same seed reproduces them exactly.
    qa_data
        ``{"squad": QAData, "hotpotqa": QAData}``, needed only by ``qa_1`` / ``qa_2``.
    """

    def __init__(self, tokenizer, max_length: int, seed: int = 42, qa_data: Optional[Dict[str, QAData]] = None):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.seed = seed
        self.qa_data = qa_data or {}
        self._guess: Dict[str, int] = {}
        self._vt_example_lines: Optional[int] = None

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, verbose=False)["input_ids"])

    # -- public ---------------------------------------------------------------------------------

    def sample(self, task: str, index: int) -> dict:
        """Sample ``index`` of ``task``, as one line of the prepared JSONL."""
        if task not in TASKS:
            raise ConfigError(f"--tasks must be a comma list of {', '.join(TASK_NAMES)}, got {task!r}")
        cfg = TASKS[task]
        budget = self.max_length - cfg.max_new_tokens
        build = getattr(self, f"_build_{cfg.kind}")
        seed = f"ruler:{self.seed}:{task}:{index}"  # str seeds hash deterministically (not PYTHONHASHSEED)
        drafts: Dict[int, Tuple[Draft, int]] = {}

        def length(n: int) -> int:
            if n not in drafts:
                draft = build(cfg, random.Random(seed), n, index)
                drafts[n] = (draft, self.count(draft.input + draft.answer_prefix))
            return drafts[n][1]

        lo, hi = self._size_range(cfg, index)
        if length(lo) > budget:
            need = drafts[lo][1] + cfg.max_new_tokens
            raise ConfigError(f"--max_length {self.max_length} is too small for {task}: its shortest prompt needs "
                              f"{need} tokens including {cfg.max_new_tokens} to generate; use --max_length >= {need}")
        n = largest_fitting(length, budget, lo, hi, self._guess.get(task, lo))
        self._guess[task] = n
        draft, tokens = drafts[n]
        return {"index": index, "task": task, "input": draft.input, "answer_prefix": draft.answer_prefix,
                "outputs": draft.outputs, "length": tokens, "max_new_tokens": cfg.max_new_tokens,
                "depth": draft.depth}

    def generate(self, task: str, num_samples: int, progress: bool = False) -> List[dict]:
        indices: Iterable[int] = range(num_samples)
        if progress:
            from tqdm import tqdm
            indices = tqdm(indices, desc=f"{task} @ {self.max_length}", leave=False)
        return [self.sample(task, i) for i in indices]

    # -- sizing ---------------------------------------------------------------------------------

    def _size_range(self, cfg: TaskConfig, index: int) -> Tuple[int, int]:
        """Smallest and largest haystack size to search; every unit costs at least one token."""
        cap = self.max_length
        if cfg.kind == "vt":
            return cfg.num_hops, cap  # room for each assignment in its own gap
        if cfg.kind == "cwe":
            return cfg.num_cw + 1, min(cap, len(common_words()))
        if cfg.kind == "fwe":
            # Smallest word count whose Zipf counts rank the three answers strictly above rank 5:
            # floor(a*n) - floor(b*n) >= 1 once (a - b) * n >= 1.
            gap = (4 ** -cfg.alpha - 5 ** -cfg.alpha) / zeta(cfg.alpha)
            return math.ceil(1 / gap), 2 * cap + self._fwe_vocab_size()
        if cfg.kind == "qa":
            data = self._qa(cfg)
            item = data.items[index % len(data.items)]
            return len(item.gold), min(cap, len(data.docs))
        if cfg.haystack == "needle" and cfg.key_type == "words":  # distractor keys are distinct word pairs
            return 1, min(cap, len(ADJECTIVES) * len(NOUNS) - max(cfg.num_keys, cfg.num_queries))
        return 1, cap

    # -- builders: (cfg, rng, n, index) -> Draft; draws that do not depend on n come first --------

    def _build_niah(self, cfg: TaskConfig, rng: random.Random, n: int, index: int) -> Draft:
        num_keys = max(cfg.num_keys, cfg.num_queries)
        keys = distinct(rng, RANDOM[cfg.key_type], num_keys)
        values = [[RANDOM[cfg.value_type](rng) for _ in range(cfg.num_values)] for _ in keys]
        needles = [NEEDLE.format(kind=cfg.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        asked = rng.sample(range(num_keys), cfg.num_queries)
        queries = [keys[i] for i in asked]
        outputs = [v for i in asked for v in values[i]]

        if cfg.haystack == "essay":
            units = split_sentences(" ".join(_cycle(essay_words(), n)))
            sep = " "
        elif cfg.haystack == "repeat":
            units, sep = [NOISE] * n, "\n"
        else:  # needle: the haystack is distractor needles with other keys
            units = [NEEDLE.format(kind=cfg.value_type, key=k, value=RANDOM[cfg.value_type](rng))
                     for k in distinct(rng, RANDOM[cfg.key_type], n, exclude=keys)]
            sep = "\n"
        positions = [depth_position(units, len(sep), d) for d in depths]
        context = sep.join(interleave(units, needles, positions))

        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        one = cfg.num_queries * cfg.num_values == 1
        kind = cfg.value_type[:-1] if one else cfg.value_type
        template, prefix = (NIAH_TEMPLATE_ONE, NIAH_PREFIX_ONE) if one else (NIAH_TEMPLATE, NIAH_PREFIX)
        return Draft(template.format(kind=kind, context=context, query=query),
                     prefix.format(kind=kind, query=query), outputs, [float(d) for d in depths])

    def _vt_chains(self, rng: random.Random, num_chains: int, num_hops: int, letters: int):
        names = distinct(rng, lambda r: "".join(r.choices(string.ascii_uppercase, k=letters)),
                         num_chains * (num_hops + 1))
        chains, values = [], []
        for c in range(num_chains):
            names_c = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
            values.append(str(rng.randint(10000, 99999)))
            chains.append([f"VAR {names_c[0]} = {values[-1]}"]
                          + [f"VAR {names_c[j + 1]} = VAR {names_c[j]}" for j in range(num_hops)])
        return names[:num_hops + 1], chains, values[0]

    def _vt_text(self, rng: random.Random, n: int, num_chains: int, num_hops: int, letters: int):
        answer, chains, value = self._vt_chains(rng, num_chains, num_hops, letters)
        lines: List[str] = [NOISE] * n
        first_positions: List[int] = []
        for c, chain in enumerate(chains):
            positions = sorted(rng.sample(range(len(lines) + 1), len(chain)))
            if c == 0:
                first_positions = positions
            lines = interleave(lines, chain, positions)
        depths = [round(100 * p / n, 1) for p in first_positions] if num_chains == 1 else None
        text = VT_TEMPLATE.format(context="\n".join(lines), query=value)
        return text, VT_PREFIX.format(num_v=num_hops + 1, query=value), answer, depths

    def _vt_example(self, rng: random.Random, cfg: TaskConfig) -> str:
        """RULER's one-shot example: a short chain with 3-letter names, its answer filled in."""
        hops = min(10, cfg.num_hops)
        if self._vt_example_lines is None:
            # RULER sizes the example to 500 tokens (30 of them to generate); at most a quarter of the budget here.
            budget = min(500, self.max_length // 4) - cfg.max_new_tokens

            def length(n):
                text, prefix, answer, _ = self._vt_text(random.Random("ruler:vt-example"), n, cfg.num_chains, hops, 3)
                return self.count(text + prefix + " ".join(answer))

            self._vt_example_lines = largest_fitting(length, budget, hops, 64, hops) if length(hops) <= budget else hops
        text, prefix, answer, _ = self._vt_text(rng, self._vt_example_lines, cfg.num_chains, hops, 3)
        return text + prefix + " ".join(answer)

    def _build_vt(self, cfg: TaskConfig, rng: random.Random, n: int, index: int) -> Draft:
        example = self._vt_example(rng, cfg)
        text, prefix, answer, depths = self._vt_text(rng, n, cfg.num_chains, cfg.num_hops, 5)
        return Draft(example + "\n\n" + text, prefix, answer, depths)

    def _build_cwe(self, cfg: TaskConfig, rng: random.Random, n: int, index: int) -> Draft:
        vocab = common_words()
        # RULER: below 4096 tokens the lists are 6x/1x with a 20-word example, else freq_cw/freq_ucw with 40.
        if self.max_length < 4096:
            (ex_words, ex_cw, ex_ucw), (freq_cw, freq_ucw) = (20, 3, 1), (6, 1)
        else:
            (ex_words, ex_cw, ex_ucw), (freq_cw, freq_ucw) = (40, 10, 3), (cfg.freq_cw, cfg.freq_ucw)

        def word_list(words: List[str], cw: int, ucw: int) -> List[str]:
            out = words[:cfg.num_cw] * cw + words[cfg.num_cw:] * ucw
            rng.shuffle(out)
            return out

        ex = [vocab[i] for i in distinct_indices(rng, len(vocab), ex_words)]
        example = (CWE_TEMPLATE.format(context=numbered(word_list(ex, ex_cw, ex_ucw)), num_cw=cfg.num_cw)
                   + CWE_PREFIX.format(num_cw=cfg.num_cw) + " " + numbered(ex[:cfg.num_cw]))
        words = [vocab[i] for i in distinct_indices(rng, len(vocab), n)]
        text = CWE_TEMPLATE.format(context=numbered(word_list(words, freq_cw, freq_ucw)), num_cw=cfg.num_cw)
        return Draft(example + "\n" + text, CWE_PREFIX.format(num_cw=cfg.num_cw), words[:cfg.num_cw])

    def _fwe_vocab_size(self) -> int:
        return max(5, self.max_length // 50)  # RULER: max_seq_length // 50 coded words

    def _build_fwe(self, cfg: TaskConfig, rng: random.Random, n: int, index: int) -> Draft:
        letters = string.ascii_lowercase
        vocab = distinct(rng, lambda r: "".join(r.choices(letters, k=cfg.coded_wordlen)), self._fwe_vocab_size())
        vocab[0] = "..."  # RULER: the most frequent "word" is noise the prompt says to ignore
        z = zeta(cfg.alpha)
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -cfg.alpha / z))]
        rng.shuffle(words)
        return Draft(FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, vocab[1:4])

    def _qa(self, cfg: TaskConfig) -> QAData:
        data = self.qa_data.get(cfg.dataset)
        if data is None or not data.items:
            flag = "--squad" if cfg.dataset == "squad" else "--hotpotqa"
            raise ConfigError(f"{flag}: no {cfg.dataset} data loaded (pass a local dev JSON or a hub name)")
        return data

    def _build_qa(self, cfg: TaskConfig, rng: random.Random, n: int, index: int) -> Draft:
        data = self._qa(cfg)
        item = data.items[index % len(data.items)]  # RULER takes the questions in file order
        more = list(item.more)
        rng.shuffle(more)
        chosen = (item.gold + more)[:n]
        if len(chosen) < n:
            chosen += distinct_indices(rng, len(data.docs), n - len(chosen), exclude=item.gold + item.more)
        rng.shuffle(chosen)
        parts, starts, offset = [], {}, 0
        for i, d in enumerate(chosen):
            parts.append(DOCUMENT.format(i=i + 1, document=data.docs[d]))
            starts[d] = offset
            offset += len(parts[-1]) + 2
        context = "\n\n".join(parts)
        depth = [round(100 * starts[d] / len(context), 1) for d in item.support if d in starts] or None
        return Draft(QA_TEMPLATE.format(context=context, query=item.query), QA_PREFIX, list(item.outputs), depth)


def _cycle(words: Sequence[str], n: int) -> List[str]:
    """The first ``n`` words, wrapping around when the corpus is shorter (very long contexts)."""
    if n <= len(words):
        return list(words[:n])
    reps = -(-n // len(words))
    return (list(words) * reps)[:n]
