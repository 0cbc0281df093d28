"""LongBench's metrics, re-implemented with the same behaviour as its ``metrics.py`` / ``eval.py``.

Every metric has the signature ``metric(prediction, ground_truth, all_classes=None) -> float`` and
scores one prediction against one reference in [0, 1]; :func:`score` and :func:`score_e` turn a
dataset's predictions into LongBench's percentage. Where LongBench's code has a quirk that moves
numbers (the classification filter, the ``fuzzywuzzy`` backend, rounding), the quirk is kept and
explained, since the point is to reproduce published scores.

jieba (Chinese metrics) and rouge (summaries) are imported when first needed, so English-only
scoring works without them.
"""
from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from lacache_core.errors import ConfigError
from longbench.config import FIRST_LINE_ONLY, METRICS

# LongBench's Chinese punctuation list, verbatim: note it has the closing 》 but not the opening 《.
ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
                  "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
                  "–—‘’‛“”„‟…‧﹏.")
_EN_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")

#: LongBench-E length buckets (by the sample's ``length`` in words/characters, as LongBench stores it).
BUCKETS = ("0-4k", "4-8k", "8k+")

# ----------------------------------------------------------------------------------- optional deps
def _jieba():
    try:
        import jieba
    except ImportError as err:
        raise ConfigError("LongBench's Chinese metrics need jieba: pip install jieba "
                          "(or pip install -e '.[longbench]')") from err
    jieba.setLogLevel(logging.WARNING)  # its first cut logs "Building prefix dict..." at INFO otherwise
    return jieba


def _rouge_class():
    try:
        from rouge import Rouge
    except ImportError as err:
        raise ConfigError("LongBench's summary metrics need rouge: pip install rouge "
                          "(or pip install -e '.[longbench]')") from err
    return Rouge


def _cut(text: str) -> List[str]:
    """jieba's default (accurate-mode) segmentation, as LongBench calls it."""
    return list(_jieba().cut(text, cut_all=False))


# ----------------------------------------------------------------------------------- normalisation
def normalize_en(text: str) -> str:
    """SQuAD-style English normalisation.

    Lower-case, drop ASCII punctuation, replace the articles *a*, *an*, *the* by spaces and
    collapse whitespace, in that order (the order matters: "the," loses its comma first and then
    counts as an article).

    Parameters
    ----------
    text : str
        Answer text.

    Returns
    -------
    str
        Space-separated normalised words.
    """
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh(text: str) -> str:
    """LongBench's Chinese normalisation: lower-case, drop ASCII and Chinese punctuation and all whitespace.

    Parameters
    ----------
    text : str
        A token (LongBench applies it to each jieba token).

    Returns
    -------
    str
        The token without punctuation or whitespace (possibly empty).
    """
    return "".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION and not ch.isspace())


def token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap).

    Parameters
    ----------
    prediction_tokens, ground_truth_tokens : sequence of str
        Tokens; repeated tokens count as often as they appear in both.

    Returns
    -------
    float
        ``2PR / (P + R)`` with ``P = overlap / len(prediction)``, ``R = overlap / len(ground truth)``;
        0 when nothing overlaps (including empty inputs).
    """
    overlap = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------- metrics
def qa_f1(prediction: str, ground_truth: str, all_classes=None) -> float:
    """English QA token F1 after :func:`normalize_en` (narrativeqa, qasper, HotpotQA, TriviaQA, ...).

    Parameters
    ----------
    prediction, ground_truth : str
        Model answer and one reference answer.
    all_classes : ignored
        Accepted so that every metric has the same signature.

    Returns
    -------
    float
        F1 in [0, 1].
    """
    return token_f1(normalize_en(prediction).split(), normalize_en(ground_truth).split())


def qa_f1_zh(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Chinese QA token F1 over jieba words (multifieldqa_zh).

    Each jieba token goes through :func:`normalize_zh`; tokens left empty (punctuation, spaces)
    are dropped before the F1.

    Parameters
    ----------
    prediction, ground_truth : str
        Model answer and one reference answer.
    all_classes : ignored

    Returns
    -------
    float
        F1 in [0, 1].
    """
    def tokens(text):
        return [t for t in (normalize_zh(tok) for tok in _cut(text)) if t]

    return token_f1(tokens(prediction), tokens(ground_truth))


def rouge(prediction: str, ground_truth: str, all_classes=None) -> float:
    """ROUGE-L F of the ``rouge`` package (gov_report, qmsum, multi_news, samsum).

    The package splits sentences on ``.`` and words on whitespace, without lower-casing. It raises
    on an empty hypothesis or reference (also one of only full stops); LongBench scores any
    exception as 0, and so does this function.

    Parameters
    ----------
    prediction, ground_truth : str
        Summary and one reference summary.
    all_classes : ignored

    Returns
    -------
    float
        ROUGE-L F in [0, 1].
    """
    scorer = _rouge_class()()  # outside the try: a missing package must not read as a zero score
    try:
        return float(scorer.get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except Exception:  # LongBench: bare except -> 0 (empty texts, recursion depth on long ones)
        return 0.0


def rouge_zh(prediction: str, ground_truth: str, all_classes=None) -> float:
    """ROUGE-L F over jieba words joined by spaces (dureader, vcsum).

    Parameters
    ----------
    prediction, ground_truth : str
        Answer or summary, and one reference.
    all_classes : ignored

    Returns
    -------
    float
        ROUGE-L F in [0, 1] (0 where the ``rouge`` package raises).
    """
    return rouge(" ".join(_cut(prediction)), " ".join(_cut(ground_truth)))


def classification(prediction: str, ground_truth: str, all_classes=None) -> float:
    """LongBench's class-match score (trec, lsht).

    1. The classes that occur (case-sensitively) as substrings of the prediction, in
       ``all_classes`` order.
    2. Walk that list dropping each class that is a substring of the ground truth without being
       the ground truth (a prediction "New York" must not be credited for class "New" when the
       truth is "New York"). LongBench removes the items from the list *while iterating over it*,
       so the item right after a removed one is never examined; that is reproduced here because
       it changes scores.
    3. Score ``1 / len(list)`` if the ground truth is in the list, else 0. (LongBench's fallback
       for an empty list is dead code — it tests ``list != 0`` — so no match scores 0.)

    Parameters
    ----------
    prediction, ground_truth : str
        Model output and the true class name.
    all_classes : list of str
        The dataset's class names.

    Returns
    -------
    float
        Score in [0, 1].
    """
    matches = [name for name in (all_classes or []) if name in prediction]
    # Python's list iterator semantics, spelled out: position i advances after every item, and a
    # removal shifts the next item into position i, where it is skipped.
    i = 0
    while i < len(matches):
        name = matches[i]
        if name in ground_truth and name != ground_truth:
            matches.remove(name)  # first occurrence, as list.remove in LongBench
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_hits(prediction: str, target: str) -> float:
    """Share of the numbers in ``prediction`` that equal ``target`` (0 if it has no numbers)."""
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def _paragraph_id(pattern: str, ground_truth: str) -> str:
    found = re.findall(pattern, ground_truth)
    if not found:  # LongBench would raise IndexError; say what is wrong instead
        raise ValueError(f"ground truth {ground_truth!r} has no paragraph id matching {pattern!r}")
    return found[0]


def retrieval(prediction: str, ground_truth: str, all_classes=None) -> float:
    """passage_retrieval_en: the truth is "Paragraph N"; score = share of the prediction's numbers equal to N.

    Parameters
    ----------
    prediction : str
        Model output, e.g. "Paragraph 3".
    ground_truth : str
        "Paragraph N".
    all_classes : ignored

    Returns
    -------
    float
        ``right / total`` over every digit run of the prediction (so "Paragraph 3 or 4" scores 0.5
        when N is 3), 0 when the prediction has no number.
    """
    return _number_hits(prediction, _paragraph_id(r"Paragraph (\d+)", ground_truth))


def retrieval_zh(prediction: str, ground_truth: str, all_classes=None) -> float:
    """passage_retrieval_zh: as :func:`retrieval` with the truth "段落N".

    Parameters
    ----------
    prediction : str
        Model output, e.g. "段落3".
    ground_truth : str
        "段落N".
    all_classes : ignored

    Returns
    -------
    float
        Share of the prediction's numbers equal to N (0 without numbers).
    """
    return _number_hits(prediction, _paragraph_id(r"段落(\d+)", ground_truth))


def count(prediction: str, ground_truth: str, all_classes=None) -> float:
    """passage_count: share of the numbers in the prediction equal to the true count.

    Parameters
    ----------
    prediction : str
        Model output, e.g. "There are 12 unique paragraphs".
    ground_truth : str
        The count, e.g. "12".
    all_classes : ignored

    Returns
    -------
    float
        ``right / total`` over the prediction's digit runs; 0 when it has none.
    """
    return _number_hits(prediction, str(ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` as LongBench ran it: difflib's similarity, as a rounded percentage.

    fuzzywuzzy uses ``difflib.SequenceMatcher`` unless python-Levenshtein is installed. LongBench
    v1 does not ask for python-Levenshtein, and the LaCache repository's environment.yml pins
    fuzzywuzzy 0.18.0 without it (nor rapidfuzz), so the published code scores came from difflib;
    this function computes exactly that without needing fuzzywuzzy. ``rapidfuzz.fuzz.ratio`` is
    *not* the same number: it is the exact Indel (LCS) similarity and unrounded, while difflib
    matches blocks greedily. They agree on many code lines ('return x + 1' vs 'return x+1': 91 vs
    90.9) but not on all (on random 1-60 character strings over a small alphabet they differed
    after rounding in 70% of 2000 pairs), hence no rapidfuzz here.

    Parameters
    ----------
    a, b : str
        Strings to compare.

    Returns
    -------
    int
        0-100: 100 for equal strings (also two empty ones), 0 if exactly one is empty, else
        ``round(100 * SequenceMatcher(None, a, b).ratio())`` (Python's round, as fuzzywuzzy).
    """
    # fuzzywuzzy's decorators, in their order: None -> 0, equal -> 100, one empty -> 0
    if a is None or b is None:
        return 0
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim(prediction: str, ground_truth: str, all_classes=None) -> float:
    """lcc, repobench-p: edit similarity of the first code line of the prediction.

    The first line (after leading newlines) that contains no backtick, no ``#`` and no ``//`` is
    taken as the predicted line, skipping markdown fences and comments; none -> empty string.
    LongBench tests for a single backtick, not only a ``` fence.

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        The true next line of code.
    all_classes : ignored

    Returns
    -------
    float
        ``fuzz_ratio(line, ground_truth) / 100``.
    """
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, ground_truth) / 100


#: metric name (the values of ``config.METRICS``) -> function
METRIC_FUNCTIONS: Dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "rouge": rouge, "rouge_zh": rouge_zh,
    "classification": classification, "retrieval": retrieval, "retrieval_zh": retrieval_zh,
    "count": count, "code_sim": code_sim,
}


def metric_for(dataset: str) -> Callable[..., float]:
    """The metric function of a LongBench dataset (KeyError for an unknown name)."""
    return METRIC_FUNCTIONS[METRICS[dataset]]


# ----------------------------------------------------------------------------------- datasets
def sample_scores(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                  all_classes: Optional[Sequence[str]] = None) -> List[float]:
    """Per-sample scores in [0, 1]: the best over each sample's reference answers.

    Parameters
    ----------
    dataset : str
        LongBench dataset name (picks the metric; trec/triviaqa/samsum/lsht keep only the first
        line of the prediction, after leading newlines).
    predictions : sequence of str
        One model output per sample.
    answers : sequence of list of str
        The reference answers of each sample (no reference scores 0).
    all_classes : list of str, optional
        Class names, for trec and lsht (one list for the whole dataset, as LongBench).

    Returns
    -------
    list of float
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{dataset}: {len(predictions)} predictions but {len(answers)} answer lists")
    fn = metric_for(dataset)
    out = []
    for prediction, references in zip(predictions, answers):
        if dataset in FIRST_LINE_ONLY:
            prediction = prediction.lstrip("\n").split("\n")[0]
        best = 0.0
        for reference in references:
            best = max(best, fn(prediction, reference, all_classes=all_classes))
        out.append(best)
    return out


def score(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
          all_classes: Optional[Sequence[str]] = None) -> float:
    """A dataset's LongBench score: ``round(100 * mean, 2)`` of :func:`sample_scores`.

    Parameters
    ----------
    dataset, predictions, answers, all_classes
        As :func:`sample_scores`.

    Returns
    -------
    float
        Percentage with two decimals.

    Raises
    ------
    ValueError
        With no predictions (LongBench divides by zero there).
    """
    per_sample = sample_scores(dataset, predictions, answers, all_classes)
    if not per_sample:
        raise ValueError(f"{dataset}: no predictions to score")
    # A plain running sum like LongBench's loop: Python >= 3.12's sum() compensates rounding
    # errors and could move the last bit, hence a rounding at the 2nd decimal.
    total = 0.0
    for value in per_sample:
        total += value
    return round(100 * total / len(per_sample), 2)


def bucket_of(length: int) -> str:
    """LongBench-E bucket of a sample length: < 4000, < 8000, else."""
    return BUCKETS[0] if length < 4000 else BUCKETS[1] if length < 8000 else BUCKETS[2]


def score_e(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
            lengths: Sequence[int], all_classes: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """LongBench-E scores by length bucket.

    Parameters
    ----------
    dataset, predictions, answers, all_classes
        As :func:`sample_scores`.
    lengths : sequence of int
        Each sample's ``length`` field.

    Returns
    -------
    dict
        ``{"0-4k": s, "4-8k": s, "8k+": s}``, each ``round(100 * mean, 2)`` over the bucket's
        samples, NaN for an empty bucket (as LongBench's ``np.mean`` of an empty list).
    """
    if len(lengths) != len(predictions):
        raise ValueError(f"{dataset}: {len(predictions)} predictions but {len(lengths)} lengths")
    buckets: Dict[str, List[float]] = {name: [] for name in BUCKETS}
    for value, length in zip(sample_scores(dataset, predictions, answers, all_classes), lengths):
        buckets[bucket_of(length)].append(value)
    # np.mean and numpy's round (round() on a numpy float) as LongBench's scorer_e, so the second
    # decimal matches theirs bit for bit; NaN without numpy's empty-slice warning.
    return {name: float(round(100 * np.mean(values), 2)) if values else float("nan")
            for name, values in buckets.items()}
