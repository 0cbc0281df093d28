"""RULER's scores: case-insensitive substring matching of the references in the prediction.

``string_match_all`` (every task but QA): per sample, the fraction of references found;
``string_match_part`` (``qa_1``, ``qa_2``): per sample, 1 if any reference is found. A task's score
is 100 times the mean over its samples.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    """RULER's clean-up of a prediction: control characters become newlines, ends are stripped."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def match_all(pred: str, refs: Sequence[str]) -> float:
    """Fraction of ``refs`` that occur in ``pred`` (case-insensitive)."""
    low = pred.lower()
    return sum(r.lower() in low for r in refs) / len(refs)


def match_part(pred: str, refs: Sequence[str]) -> float:
    """1.0 if any of ``refs`` occurs in ``pred`` (case-insensitive), else 0.0."""
    low = pred.lower()
    return float(any(r.lower() in low for r in refs))


def _task_score(sample_score: Callable[[str, Sequence[str]], float]):
    def score(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
        if len(preds) != len(refs) or not preds:
            raise ValueError(f"need as many predictions as references (and at least one), got {len(preds)} and "
                             f"{len(refs)}")
        return 100.0 * sum(sample_score(postprocess(p), r) for p, r in zip(preds, refs)) / len(preds)
    return score


string_match_all = _task_score(match_all)
string_match_all.__doc__ = "100 x mean over samples of the fraction of references found in the prediction."
string_match_part = _task_score(match_part)
string_match_part.__doc__ = "100 x mean over samples of whether any reference is found in the prediction."

METRICS: Dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "qa_1": string_match_part,
    "qa_2": string_match_part,
}


def metric_for(task: str):
    """The task's metric: ``string_match_part`` for QA, ``string_match_all`` otherwise."""
    return METRICS.get(task, string_match_all)


def score_task(task: str, preds: List[str], refs: List[List[str]]) -> float:
    return metric_for(task)(preds, refs)
