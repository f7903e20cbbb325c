"""Agreement of a ranking with the teacher's (method.md section 6).

Every function takes score vectors over the same N training items, higher = more influential.
``average_precision``: the teacher's top-L items are the positives, AP is computed over the whole
ranking the other scores induce. Ties are broken by item order, the same way for every method.
"""

from __future__ import annotations

import numpy as np


def ranking(scores: np.ndarray) -> np.ndarray:
    """Item indices, highest score first (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def top_set(scores: np.ndarray, count: int) -> np.ndarray:
    return ranking(scores)[:count]


def average_precision(teacher: np.ndarray, student: np.ndarray, count: int) -> float:
    """AP of the student's full ranking, the teacher's top ``count`` items being the positives."""
    positive = np.zeros(len(teacher), dtype=bool)
    positive[top_set(teacher, count)] = True
    hits = positive[ranking(student)]
    ranks = np.flatnonzero(hits) + 1  # 1-based positions of the positives in the student's ranking
    return float((np.arange(1, len(ranks) + 1) / ranks).mean())


def recall_at(teacher: np.ndarray, student: np.ndarray, count: int) -> float:
    """Share of the teacher's top ``count`` found in the student's top ``count``."""
    return len(set(top_set(teacher, count)) & set(top_set(student, count))) / count


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank_a, rank_b = np.argsort(np.argsort(a, kind="stable")), np.argsort(np.argsort(b, kind="stable"))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def mean_and_stderr(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
