"""Statistics for results tables: bootstrap intervals, the paired bootstrap test and the exact McNemar test.

What this module is not about: BERT, runs, files or flags. It imports only the standard library (no numpy or
scipy for users to install) and works on labels as integers 0..n_labels-1; sweep.py and compare.py feed it the
test predictions of finished runs.

- scores / scores_of_counts: accuracy and macro-F1, computed exactly as bertcls.py computes them
- resample_scores: the scores of several prediction lists on the same bootstrap resamples of their examples
- seed_means: a second level of resampling, over the training seeds, on top of the examples'
- quantile, percentile_interval, bootstrap_p: an interval and a two-sided p-value from bootstrap replicates
- mcnemar_p, mcnemar_p_same_way: the exact McNemar test (binomial test on the discordant examples), for one
  table and for several tables that must all point the same way

A bootstrap resample draws n of the n test examples with replacement. Scores depend on a resample only through
its confusion-matrix counts, so each prediction list is reduced once to one confusion cell per example and a
resample costs one C-level count of n cells per list (736 examples x 2000 resamples: well under a second).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Mapping, Sequence


def scores_of_counts(cell_counts: Mapping[int, int], n_labels: int) -> tuple[float, float]:
    """(accuracy, macro-F1) from confusion-matrix counts keyed by cell = gold * n_labels + predicted.

    Macro-F1 is the mean over all n_labels labels of per-label F1, 0 for a label with no gold or no predicted
    example, with the same operations in the same order as bertcls.macro_prf, so the values agree bit for bit.
    """
    tp, predicted, support = [0] * n_labels, [0] * n_labels, [0] * n_labels
    for cell, count in cell_counts.items():
        gold, guess = divmod(cell, n_labels)
        support[gold] += count
        predicted[guess] += count
        if gold == guess:
            tp[gold] += count
    f1s = []
    for label in range(n_labels):
        precision = tp[label] / predicted[label] if predicted[label] else 0.0
        recall = tp[label] / support[label] if support[label] else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(tp) / sum(support), sum(f1s) / n_labels


def cells(gold: Sequence[int], predicted: Sequence[int], n_labels: int) -> list[int]:
    """The confusion-matrix cell of each example."""
    return [g * n_labels + p for g, p in zip(gold, predicted, strict=True)]


def scores(gold: Sequence[int], predicted: Sequence[int], n_labels: int) -> tuple[float, float]:
    """(accuracy, macro-F1) of predictions."""
    return scores_of_counts(Counter(cells(gold, predicted, n_labels)), n_labels)


def resample_scores(gold: Sequence[int], predictions: Sequence[Sequence[int]], n_labels: int, n_resamples: int,
                    rng: random.Random) -> list[tuple[list[float], list[float]]]:
    """For each prediction list, its accuracies and macro-F1s on n_resamples bootstrap resamples of the examples.

    Every list is scored on the same resamples, in the same order: a difference between two lists' values at
    one index is a paired difference, on the same examples.
    """
    example_cells = [cells(gold, predicted, n_labels) for predicted in predictions]
    replicates: list[tuple[list[float], list[float]]] = [([], []) for _ in predictions]
    examples = range(len(gold))
    for _ in range(n_resamples):
        sample = rng.choices(examples, k=len(gold))
        for per_example, (accuracies, f1s) in zip(example_cells, replicates):
            accuracy, f1 = scores_of_counts(Counter(map(per_example.__getitem__, sample)), n_labels)
            accuracies.append(accuracy)
            f1s.append(f1)
    return replicates


def seed_means(per_seed: Sequence[Sequence[Sequence[float]]], rng: random.Random) -> list[float]:
    """Replicates of a mean over seeds, resampling the seeds as well as the examples.

    per_seed[s] holds the replicate vectors (one value per example resample, all of one length) of seed s's runs,
    e.g. one per fold. Replicate b draws len(per_seed) seeds with replacement and averages, over the drawn seeds,
    the mean of their runs' b-th values; so the spread covers which seeds were trained as well as which examples
    were tested. With one seed it is the plain mean over its runs: the example bootstrap alone.
    """
    seed_vectors = [[math.fsum(values) / len(runs) for values in zip(*runs)] for runs in per_seed]
    if len(seed_vectors) == 1:
        return seed_vectors[0]
    means = []
    for b in range(len(seed_vectors[0])):
        drawn = rng.choices(seed_vectors, k=len(seed_vectors))
        means.append(math.fsum(vector[b] for vector in drawn) / len(drawn))
    return means


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated between order statistics (statistics.quantiles'
    'inclusive' method, R's type 7)."""
    position = q * (len(sorted_values) - 1)
    below = math.floor(position)
    above = min(below + 1, len(sorted_values) - 1)
    return sorted_values[below] + (sorted_values[above] - sorted_values[below]) * (position - below)


def percentile_interval(replicates: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval: the central `level` share of the replicates."""
    ordered = sorted(replicates)
    tail = (1 - level) / 2
    return quantile(ordered, tail), quantile(ordered, 1 - tail)


def bootstrap_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of 'no difference' from bootstrap replicates of a difference.

    Twice the smaller share of replicates on one side of 0 (0 itself counts on both sides), with one added to
    count and total so that a finite number of resamples never claims p = 0; at most 1. It is below 1 - level
    about when the percentile interval of that level leaves out 0. Identical predictions give p = 1.
    """
    at_or_below = sum(d <= 0 for d in differences)
    at_or_above = sum(d >= 0 for d in differences)
    return min(1.0, 2 * (min(at_or_below, at_or_above) + 1) / (len(differences) + 1))


def at_least(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly: sum_{i >= k} C(n, i) / 2^n."""
    if k <= 0:
        return 1.0
    term = tail = 1  # C(n, 0), then C(n, i + 1) = C(n, i) * (n - i) / (i + 1) in exact integers
    for i in range(n - k):  # by symmetry, sum_{i >= k} C(n, i) = sum_{i <= n - k} C(n, i)
        term = term * (n - i) // (i + 1)
        tail += term
    return tail / 2 ** n


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact McNemar test: the two-sided binomial test that the examples only A gets right (only_a) and those
    only B gets right (only_b) are equally likely, P = min(1, 2 * sum_{i <= min} C(n, i) / 2^n), n = their sum.
    Examples both get right or both get wrong say nothing about which is better and do not enter."""
    return mcnemar_p_same_way([(only_a, only_b)])


def mcnemar_p_same_way(tables: Sequence[tuple[int, int]]) -> float:
    """Exact McNemar over several (only_a, only_b) tables that must all point the same way (e.g. one per seed).

    Intersection-union test: the one-sided p that A is better is the largest over the tables, likewise for B,
    and the two-sided p is twice the smaller of the two, at most 1. Valid however the tables are correlated
    (seeds tested on the same examples are), and 1 when the tables disagree. One table: the usual exact test.
    """
    a_better = max(at_least(only_a, only_a + only_b) for only_a, only_b in tables)
    b_better = max(at_least(only_b, only_a + only_b) for only_a, only_b in tables)
    return min(1.0, 2 * min(a_better, b_better))
