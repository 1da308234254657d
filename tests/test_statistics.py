"""compare.py's statistics (and common.confusion_scores): values computed by hand or independently, and calibration
by simulation.

The simulations draw livedoor-like test sets (n = 736 articles, 9 classes in livedoor's test proportions) from a
population whose truth is known exactly, and classifiers over seeds:
- article i has a class, a difficulty h_i ~ N(0, TAU^2) (hard articles: at accuracy 0.97 about 1% are more often
  wrong than right) and a confusable class (its class's usual neighbour 60% of the time);
- a model (a row) has a skill mu; its seed s has a seed effect delta_s ~ N(0, sigma_delta^2); the run of seed s is
  right on article i when z + h_i - KAPPA[class] < mu + delta_s, where z ~ N(0, 1) is the model's own draw for the
  article, shared by its seeds with probability RHO (a seed changes a modest share of predictions: two seeds of one
  model disagree on about 3% of the articles at accuracy 0.97, 12% at 0.85) and fresh otherwise; a wrong run
  predicts the article's confusable class 70% of the time, else another class at random;
- different models share the articles' difficulty (their errors correlate) but not their own draws.
So a run's population accuracy of class c is Phi((mu + delta + KAPPA[c]) / sqrt(1 + TAU^2)), its population
confusion matrix follows in closed form, and the truth of a row, its expected population score over seeds, is an
integral over delta (done by quadrature). Seed spread is given in points of the population macro-F1 (the standard
deviation over seeds). Every simulation is seeded: the figures asserted below are exactly reproducible, and the
comments give them; the test output (pytest -s) prints them.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from typing import Hashable, NamedTuple

import pytest

import compare as sd
from common import confusion_scores

NORMAL = statistics.NormalDist()


class Run(NamedTuple):  # what compare.py's statistics read of a run (sweep.Run has the same attributes)
    seed: int
    fold: Hashable
    gold: list[int]
    predicted: list[int]
    n_labels: int
    val_f1: float | None = None


def scores(gold: list[int], predicted: list[int], n_labels: int) -> tuple[float, float]:
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for g, p in zip(gold, predicted):
        matrix[g][p] += 1
    result = confusion_scores(matrix)
    return result["accuracy"], result["f1"]


def run_interval(gold: list[int], predicted: list[int], n_labels: int, metric: str) -> tuple[float, float]:
    """One run's interval: ABC over its confusion cells, as row_interval gives a row of one run."""
    return sd._abc([Counter(g * n_labels + p for g, p in zip(gold, predicted))], n_labels, metric, sd.LEVEL)

# ------------------------------------------------------------------------------------ hand-computed values


def test_scores_by_hand():
    # label 0: tp 1, gold 2, predicted 2 -> F1 2*1/(2+2) = 1/2; label 1: tp 2, gold 2, predicted 3 -> 4/5;
    # label 2: tp 0 -> 0; label 3: neither gold nor predicted -> left out of the mean (scikit-learn's default)
    accuracy, f1 = scores([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 4)
    assert accuracy == 3 / 5
    assert f1 == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    # a label only predicted counts (F1 0): 3 labels present
    assert scores([0, 0, 1], [0, 2, 1], 3) == (pytest.approx(2 / 3), pytest.approx((2 / 3 + 1 + 0) / 3))
    assert scores([0, 1, 2], [0, 1, 2], 5) == (1.0, 1.0)


def test_scores_match_an_independent_count():
    rng = random.Random(0)
    gold = [rng.randrange(9) for _ in range(300)]
    predicted = [g if rng.random() < 0.8 else rng.randrange(9) for g in gold]
    f1s = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(g == p == label for g, p in zip(gold, predicted))
        precision = tp / predicted.count(label) if predicted.count(label) else 0.0
        recall = tp / gold.count(label) if gold.count(label) else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    accuracy, f1 = scores(gold, predicted, 9)
    assert accuracy == sum(g == p for g, p in zip(gold, predicted)) / 300
    assert f1 == pytest.approx(statistics.fmean(f1s), abs=1e-15)


@pytest.mark.parametrize("only_a, only_b, p", [
    (0, 0, 1.0),  # no discordant example: no evidence either way
    (0, 1, 1.0),  # 2 * C(1,0) / 2^1 = 1
    (1, 5, 14 / 64),  # 2 * (C(6,0) + C(6,1)) / 2^6
    (5, 1, 14 / 64),  # two-sided: symmetric
    (0, 6, 2 / 64),  # 2 * C(6,0) / 2^6
    (2, 2, 1.0),  # 2 * (1 + 4 + 6) / 16 > 1: capped
    (3, 12, 1152 / 32768),  # 2 * (1 + 15 + 105 + 455) / 2^15
])
def test_mcnemar_exact_p_by_hand(only_a, only_b, p):
    assert sd.mcnemar_p(only_a, only_b) == p


def test_holm_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> kept at 0.06 (monotone)
    assert sd.holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert sd.holm_adjusted([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert sd.holm_adjusted([0.04]) == [0.04] and sd.holm_adjusted([]) == []


def test_run_interval_of_accuracy_is_the_skew_corrected_proportion_interval():
    # for a proportion the ABC interval has a closed form: z0 = a = (1 - 2p) / (6 sqrt(n p (1 - p))), endpoints
    # p + sigma * w / (1 - a w)^2 with w = z0 -+ 1.96 and sigma = sqrt(p (1 - p) / n)
    n, right = 736, 714
    p, sigma = right / n, math.sqrt(right / n * (1 - right / n) / n)
    a = (1 - 2 * p) / (6 * math.sqrt(n * p * (1 - p)))
    expected = [p + sigma * w / (1 - a * w) ** 2 for w in (a - 1.959963984540054, a + 1.959963984540054)]
    gold = [i % 9 for i in range(n)]
    predicted = [g if i < right else (g + 1) % 9 for i, g in enumerate(gold)]
    assert run_interval(gold, predicted, 9, "accuracy") == pytest.approx(expected, abs=1e-9)
    low, high = expected
    assert p - low > high - p  # longer towards 0.5: the skew a percentile or normal interval ignores
    assert run_interval(gold, gold, 9, "f1") == (1.0, 1.0)  # all right: nothing varies


def test_run_interval_agrees_with_a_monte_carlo_bca():
    # BCa by resampling (Efron 1987): z0 from the share of replicates below the estimate, a from the jackknife
    rng = random.Random(4)
    gold = [rng.randrange(4) for _ in range(120)]
    predicted = [g if rng.random() < 0.85 else rng.randrange(4) for g in gold]
    estimate = scores(gold, predicted, 4)[1]
    replicates = []
    for _ in range(4000):
        sample = rng.choices(range(120), k=120)
        replicates.append(scores([gold[i] for i in sample], [predicted[i] for i in sample], 4)[1])
    replicates.sort()
    z0 = NORMAL.inv_cdf(sum(r < estimate for r in replicates) / len(replicates))
    loo = [scores(gold[:i] + gold[i + 1:], predicted[:i] + predicted[i + 1:], 4)[1] for i in range(120)]
    u = [statistics.fmean(loo) - v for v in loo]
    a = sum(x ** 3 for x in u) / 6 / sum(x * x for x in u) ** 1.5
    ends = []
    for z in (-1.959963984540054, 1.959963984540054):
        q = NORMAL.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
        ends.append(replicates[min(len(replicates) - 1, int(q * len(replicates)))])
    assert run_interval(gold, predicted, 4, "f1") == pytest.approx(ends, abs=0.006)  # Monte Carlo error ~0.003


def test_seed_level_variance_parts_equal_a_brute_force_jackknife():
    # delete each article in turn, rescore every run from scratch, and build s^2 / S and the mean cross-seed
    # jackknife covariance from those scores: the cell shortcuts must give the same numbers
    rng = random.Random(5)
    folds = {f: [rng.randrange(3) for _ in range(25)] for f in ("f0", "f1")}
    runs = [Run(s, f, gold, [g if rng.random() < 0.7 else rng.randrange(3) for g in gold], 3)
            for s in range(3) for f, gold in folds.items()]
    estimate, seed_part, shared = sd._seed_level([(r.seed, r.fold, 1 / 2, r) for r in runs], 3, "f1")
    per_seed = [statistics.fmean(scores(r.gold, r.predicted, 3)[1] for r in runs if r.seed == s) for s in range(3)]
    assert estimate == pytest.approx(statistics.fmean(per_seed), abs=1e-15)
    assert seed_part == pytest.approx(statistics.variance(per_seed) / 3, abs=1e-15)
    covariance = 0.0
    for f, gold in folds.items():
        n = len(gold)
        deleted = {s: [] for s in range(3)}  # seed -> fold-f score without article i, for each i
        for s in range(3):
            (run,) = [r for r in runs if r.seed == s and r.fold == f]
            for i in range(n):
                deleted[s].append(scores(gold[:i] + gold[i + 1:], run.predicted[:i] + run.predicted[i + 1:], 3)[1])
        for s in range(3):
            for t in range(3):
                if s != t:
                    ms, mt = statistics.fmean(deleted[s]), statistics.fmean(deleted[t])
                    covariance += (n - 1) / n * sum((x - ms) * (y - mt) for x, y in zip(deleted[s], deleted[t])) / 4
    assert shared == pytest.approx(max(0.0, covariance / 6), rel=1e-9)


def test_generalized_pivot_reduces_to_t_and_normal():
    # no shared part: Z sqrt(s^2/S k/U) is Student's t with k df, known quantiles: t_{0.975, 1} = 12.7062047...,
    # t_{0.975, 2} = 4.30265272..., t_{0.975, 4} = 2.77644510...; P(|t_2| > x) = 1 - x / sqrt(2 + x^2)
    for k, quantile in ((1, 12.706204736174707), (2, 4.302652729749464), (4, 2.7764451051977987)):
        assert sd._half_width(0.95, sd._scales(1.0, 0.0, k)) == pytest.approx(quantile, rel=1e-7)
    for x in (0.5, 2.0, 9.0):
        assert 2 * sd._cdf(-x, sd._scales(1.0, 0.0, 2)) == pytest.approx(1 - x / math.sqrt(2 + x * x), rel=1e-7)
    # no seed part: the normal
    assert sd._half_width(0.95, sd._scales(0.0, 4.0, 2)) == pytest.approx(2 * 1.959963984540054, rel=1e-12)
    assert sd._cdf(-2.0, sd._scales(0.0, 4.0, 2)) == pytest.approx(NORMAL.cdf(-1.0), rel=1e-12)
    # both: between the two, and the interval and the p-value agree
    scales = sd._scales(1.0, 1.0, 2)
    half = sd._half_width(0.95, scales)
    assert 1.96 * math.sqrt(2) < half < 4.303 * math.sqrt(2)
    assert 2 * sd._cdf(-half, scales) == pytest.approx(0.05, abs=1e-9)


def test_row_interval_and_paired_test_on_small_grids():
    rng = random.Random(6)
    gold = [rng.randrange(3) for _ in range(60)]
    noisy = lambda accuracy: [g if rng.random() < accuracy else rng.randrange(3) for g in gold]  # noqa: E731
    one = Run(0, None, gold, noisy(0.8), 3)
    assert sd.row_interval([one], "accuracy") == run_interval(gold, one.predicted, 3, "accuracy")
    a = [Run(s, None, gold, noisy(0.8), 3) for s in range(3)]
    b = [Run(s, None, gold, noisy(0.7), 3) for s in range(4)]
    low, high = sd.row_interval(a, "f1")
    assert low < statistics.fmean(scores(gold, r.predicted, 3)[1] for r in a) < high
    same = sd.paired_test(a, a)
    assert (same["diff"], same["p"], same["ci"], same["p_less"]) == (0.0, 1.0, (0.0, 0.0), 1.0)
    test = sd.paired_test(a, b, "accuracy")
    assert test["seeds"] == 3 and test["folds"] == 1 and test["left_out"] == 1  # b's seed 3 has no partner
    assert test["ci"][0] < test["diff"] < test["ci"][1]
    assert test["p"] == pytest.approx(2 * min(test["p_less"], 1 - test["p_less"]))
    reverse = sd.paired_test(b, a, "accuracy")
    assert reverse["diff"] == pytest.approx(-test["diff"]) and reverse["p"] == pytest.approx(test["p"])
    with pytest.raises(ValueError, match=r"missing \(seed, fold\): \(1, 'f1'\)"):
        sd.row_interval([Run(0, "f0", gold, gold, 3), Run(0, "f1", gold, gold, 3),
                         Run(1, "f0", gold, gold, 3)])
    with pytest.raises(ValueError, match="share no"):
        sd.paired_test(a, [Run(9, None, gold, gold, 3)])
    with pytest.raises(ValueError, match="different gold"):
        sd.paired_test(a[:1], [Run(0, None, gold[::-1], gold, 3)])


def test_best_lr_compares_only_the_runs_every_lr_has():
    def runs(lr_val_by_key):
        return [Run(seed, fold, [0], [0], 1, val) for (seed, fold), val in lr_val_by_key.items()]
    # the audit's case: 1e-5 ran on fold 0 only, 3e-5 on folds 0-2; 1e-5's mean (0.85) beats 3e-5's over three
    # folds (0.833), but on fold 0, the only run both have, 3e-5 is better (0.90)
    by_lr = {1e-5: runs({(0, 0): 0.85}), 3e-5: runs({(0, 0): 0.90, (0, 1): 0.80, (0, 2): 0.80})}
    lr, chosen, note = sd.best_lr(by_lr)
    assert lr == 3e-5 and chosen == by_lr[3e-5]
    assert note == "lrs compared on the 1 (seed, fold) runs they all have; left out: lr 3e-05 (0, 1), (0, 2)"
    assert sd.best_lr({2e-5: runs({(0, 0): 0.9}), 1e-5: runs({(0, 0): 0.9})})[0] == 1e-5  # ties: the smaller
    assert sd.best_lr({2e-5: runs({(0, 0): 0.9})})[2] == ""
    no_common = r"share no \(seed, fold\).*lr 1e-05 has \[\(0, 0\)\]; lr 3e-05 has \[\(1, 0\)\]"
    with pytest.raises(ValueError, match=no_common):
        sd.best_lr({1e-5: runs({(0, 0): 0.9}), 3e-5: runs({(1, 0): 0.9})})


def test_table_marks_take_the_reference_from_validation_and_adjust_by_holm():
    rng = random.Random(7)
    gold = [rng.randrange(3) for _ in range(400)]

    def row(accuracy, val):
        return [Run(s, None, gold, [g if rng.random() < accuracy else (g + 1) % 3 for g in gold], 3, val)
                for s in range(3)]
    # row 1 is the best on test, row 0 on validation: row 0 is the reference; row 3 is far worse; row 4 has other
    # seeds, so it cannot be paired and is left out of the family
    rows = [row(0.90, 0.92), row(0.95, 0.90), row(0.89, 0.91), row(0.70, 0.83), row(0.90, 0.50)]
    rows[4] = [Run(s + 10, r.fold, r.gold, r.predicted, 3, r.val_f1) for s, r in enumerate(rows[4])]
    marks = sd.table_marks(rows)
    assert marks["reference"] == 0
    entries = marks["rows"]
    assert entries[0]["mark"] is True and entries[0]["p_holm"] is None
    assert entries[1]["mark"] is True and entries[1]["diff"] > 0  # better than the reference: never "worse"
    assert entries[3]["mark"] is False and entries[3]["p_holm"] <= 0.05
    assert entries[4]["mark"] is None and "share no" in entries[4]["note"]
    compared = [entries[i]["p_worse"] for i in (1, 2, 3)]
    assert [entries[i]["p_holm"] for i in (1, 2, 3)] == pytest.approx(sd.holm_adjusted(compared))


# --------------------------------------------------------------------------------------- simulations

LIVEDOOR = (87, 87, 86, 51, 87, 84, 87, 90, 77)  # test articles per class in livedoor's default split: 736
C, N = len(LIVEDOOR), sum(LIVEDOOR)
SHARE = [m / N for m in LIVEDOOR]
CUMULATIVE = [sum(LIVEDOOR[:c + 1]) for c in range(C)]
KAPPA = (0.3, 0.2, 0.0, -0.6, 0.3, -0.4, 0.2, 0.5, -0.1)  # how easy each class is (probit scale)
NEIGHBOUR = (5, 6, 1, 0, 8, 0, 1, 8, 7)  # each class's usual confusion
TAU, RHO, NEAR, FOLLOW = 1.2, 0.75, 0.6, 0.7
WRONG = [[0.0 if c == d else FOLLOW * (NEAR * (d == NEIGHBOUR[c]) + (1 - NEAR) / (C - 1)) + (1 - FOLLOW) / (C - 1)
          for d in range(C)] for c in range(C)]  # P(predicted d | gold c, wrong)


def population(x: float) -> tuple[float, float, list[float]]:
    """(accuracy, macro-F1, cell probabilities) in the population of a run with skill x = mu + delta."""
    right = [NORMAL.cdf((x + k) / math.sqrt(1 + TAU ** 2)) for k in KAPPA]
    cells = [SHARE[c] * (right[c] if c == d else (1 - right[c]) * WRONG[c][d]) for c in range(C) for d in range(C)]
    tp = [cells[c * C + c] for c in range(C)]
    predicted = [sum(cells[c * C + d] for c in range(C)) for d in range(C)]
    return sum(tp), statistics.fmean(2 * t / (g + p) for t, g, p in zip(tp, SHARE, predicted)), cells


def truth(mu: float, sigma_delta: float, nodes: int = 101) -> tuple[float, float]:
    """A row's true (accuracy, macro-F1): the population score's expectation over seed effects (midpoint rule in
    probability)."""
    values = [population(mu + sigma_delta * NORMAL.inv_cdf((j + 0.5) / nodes))[:2] for j in range(nodes)]
    return statistics.fmean(v[0] for v in values), statistics.fmean(v[1] for v in values)


def skill_for(accuracy: float) -> float:
    low, high = -5.0, 10.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if population(middle)[0] < accuracy else (low, middle)
    return (low + high) / 2


def seed_sd_for(mu: float, points: float) -> float:
    """sigma_delta for a seed spread of `points` points of population macro-F1."""
    slope = (population(mu + 1e-4)[1] - population(mu - 1e-4)[1]) / 2e-4
    return points / 100 / slope


def skill_gaining(mu: float, sigma_delta: float, points: float) -> float:
    """The skill whose row's true macro-F1 is `points` points above mu's."""
    target, low, high = truth(mu, sigma_delta)[1] + points / 100, mu, mu + 3
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if truth(middle, sigma_delta)[1] < target else (low, middle)
    return (low + high) / 2


def draw_test_set(rng: random.Random) -> tuple[list[int], list[float], list[int]]:
    """Gold labels, each article's offset (KAPPA[class] - h_i) and its confusable class."""
    gold = rng.choices(range(C), cum_weights=CUMULATIVE, k=N)
    offset = [KAPPA[g] - rng.gauss(0, TAU) for g in gold]
    confusable = [NEIGHBOUR[g] if rng.random() < NEAR else (g + 1 + rng.randrange(C - 1)) % C for g in gold]
    return gold, offset, confusable


def model(rng: random.Random, offset: list[float], seeds: int) -> list[list[float]]:
    """Per seed, each article's margin z - offset: the run is right where margin < mu + delta."""
    own = [rng.gauss(0, 1) - o for o in offset]
    return [[m if rng.random() < RHO else rng.gauss(0, 1) - o for m, o in zip(own, offset)] for _ in range(seeds)]


def predict(rng: random.Random, gold: list[int], confusable: list[int], margins: list[float], x: float) -> list[int]:
    predicted = list(gold)
    for i in [i for i, m in enumerate(margins) if m >= x]:
        predicted[i] = confusable[i] if rng.random() < FOLLOW else (gold[i] + 1 + rng.randrange(C - 1)) % C
    return predicted


def rate(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def test_single_run_interval_covers_95_percent():
    # a fixed model's test predictions: (gold, predicted) pairs are draws from its population confusion matrix.
    # Measured here: accuracy 0.97: 94.7% (accuracy), 95.1% (macro-F1); accuracy 0.85: 94.9%, 94.7%. With 8000
    # test sets: 94.8%, 94.9% and 95.2%, 95.2% (the percentile interval: 93.2-93.5% at 0.97, per the audit)
    for accuracy, repeats in ((0.97, 1500), (0.85, 1000)):
        rng = random.Random(10)
        true_accuracy, true_f1, cells = population(skill_for(accuracy))
        covered = {"accuracy": [], "f1": []}
        for _ in range(repeats):
            drawn = rng.choices(range(C * C), weights=cells, k=N)
            gold, predicted = [c // C for c in drawn], [c % C for c in drawn]
            for metric, true in (("accuracy", true_accuracy), ("f1", true_f1)):
                low, high = run_interval(gold, predicted, C, metric)
                covered[metric].append(low <= true <= high)
        print(f"\none run, accuracy {accuracy}, {repeats} test sets: coverage of accuracy "
              f"{rate(covered['accuracy']):.3f}, of macro-F1 {rate(covered['f1']):.3f}")
        for metric in covered:
            assert 0.935 <= rate(covered[metric]) <= 0.965, (accuracy, metric)


def test_rows_over_seeds_cover_and_their_paired_test_holds_its_level():
    # rows of 3 and 5 seeds with seed spreads of 0, 0.5 and 1 point of macro-F1, accuracy 0.97, one test set of
    # 736 articles: coverage of the row's true macro-F1 by row_interval, false positives of paired_test between
    # two equally good rows (two-sided, 5%), and its power against a row 1 point better (significant and right
    # way round). The 3- and 5-seed rows are the first 3 and all 5 seeds of the same models.
    repeats, mu = 400, skill_for(0.97)
    settings = {}
    for spread in (0.0, 0.5, 1.0):
        sigma = seed_sd_for(mu, spread)
        settings[spread] = (sigma, truth(mu, sigma)[1], skill_gaining(mu, sigma, 1.0))
    results = {(seeds, spread): ([], [], []) for seeds in (3, 5) for spread in settings}
    rng = random.Random(11)
    for _ in range(repeats):
        gold, offset, confusable = draw_test_set(rng)
        margins = {name: model(rng, offset, 5) for name in "ab"}
        effects = {name: [rng.gauss(0, 1) for _ in range(5)] for name in "ab"}
        for spread, (sigma, true_f1, better) in settings.items():
            def row(name, skill):
                return [Run(s, None, gold, predict(rng, gold, confusable, margins[name][s],
                                                      skill + sigma * effects[name][s]), C) for s in range(5)]
            a, b, gain = row("a", mu), row("b", mu), row("b", better)  # gain: model b, 1 point better
            for seeds in (3, 5):
                covered, false_positive, found = results[seeds, spread]
                low, high = sd.row_interval(a[:seeds], "f1")
                covered.append(low <= true_f1 <= high)
                false_positive.append(sd.paired_test(a[:seeds], b[:seeds])["p"] < 0.05)
                test = sd.paired_test(gain[:seeds], a[:seeds])
                found.append(test["p"] < 0.05 and test["diff"] > 0)
    print()
    for (seeds, spread), (covered, false_positive, found) in results.items():
        print(f"{seeds} seeds, seed spread {spread} points, {repeats} test sets: coverage {rate(covered):.3f}, "
              f"false positives {rate(false_positive):.3f}, power for +1 point {rate(found):.3f}")
    for key, (covered, false_positive, found) in results.items():
        assert 0.93 <= rate(covered) <= 0.98, key
        assert rate(false_positive) <= 0.06, key
    # power for a 1-point gain, measured here: 3 seeds 0.233 / 0.152 / 0.077 and 5 seeds 0.372 / 0.305 / 0.160 at
    # seed spreads 0 / 0.5 / 1 point (the audit's all-seeds McNemar: 0.01 with 3 seeds, 0 with 5). More seeds help;
    # with 3 seeds the test is conservative (false positives 1-3%), the price of estimating a variance from 3 values
    power = {key: rate(found) for key, (_, _, found) in results.items()}
    assert power[3, 0.0] >= 0.15 and power[5, 0.0] >= 0.25 and power[5, 1.0] >= 0.10
    assert all(power[5, spread] > power[3, spread] for spread in settings)


def test_folds_and_accuracy_085():
    # 3 seeds x 3 folds (each article tested once per seed; a run per seed and fold, each with its own seed
    # effect), seed spread 1 point, accuracy 0.85: coverage of both metrics and false positives
    repeats, folds, mu = 250, 3, skill_for(0.85)
    sigma = seed_sd_for(mu, 1.0)
    true_accuracy, true_f1 = truth(mu, sigma)
    covered, false_positive = {"accuracy": [], "f1": []}, []
    rng = random.Random(12)
    for _ in range(repeats):
        gold, offset, confusable = draw_test_set(rng)
        rows = []
        for margins in (model(rng, offset, 3), model(rng, offset, 3)):
            runs = []
            for s in range(3):
                for k in range(folds):
                    x = mu + sigma * rng.gauss(0, 1)
                    part = slice(k, None, folds)
                    predicted = predict(rng, gold[part], confusable[part], margins[s][part], x)
                    runs.append(Run(s, f"fold-{k}", gold[part], predicted, C))
            rows.append(runs)
        for metric, true in (("accuracy", true_accuracy), ("f1", true_f1)):
            low, high = sd.row_interval(rows[0], metric)
            covered[metric].append(low <= true <= high)
        false_positive.append(sd.paired_test(rows[0], rows[1])["p"] < 0.05)
    print(f"\n3 seeds x 3 folds, seed spread 1 point, accuracy 0.85, {repeats} test sets: coverage of accuracy "
          f"{rate(covered['accuracy']):.3f}, of macro-F1 {rate(covered['f1']):.3f}, false positives "
          f"{rate(false_positive):.3f}")
    for metric in covered:  # with 3 seeds the interval errs on the safe side (more so here: the seed effect is
        assert rate(covered[metric]) >= 0.93, metric  # averaged over 3 fold models), so only the floor is asserted
    assert rate(false_positive) <= 0.06


@pytest.mark.parametrize("n_rows, seeds, spread, repeats", [(17, 1, 0.0, 300), (6, 3, 1.0, 150)])
def test_table_marks_hold_the_family_wise_error(n_rows, seeds, spread, repeats):
    # equally good rows (the same true macro-F1; different models), reference chosen by validation scores that
    # say nothing about test: the share of tables where any row loses its mark must stay near 5% or below
    # (the audit's per-row test at 5%: 70-82% of such tables with 17 rows)
    mu = skill_for(0.97)
    sigma = seed_sd_for(mu, spread)
    rng = random.Random(13)
    any_lost, lost = [], 0
    for _ in range(repeats):
        gold, offset, confusable = draw_test_set(rng)
        rows = []
        for _ in range(n_rows):
            margins = model(rng, offset, seeds)
            rows.append([Run(s, None, gold, predict(rng, gold, confusable, margins[s], mu + sigma * rng.gauss(0, 1)),
                                C, 0.96 + rng.gauss(0, 0.005)) for s in range(seeds)])
        marks = [entry["mark"] for entry in sd.table_marks(rows)["rows"]]
        assert None not in marks
        any_lost.append(False in marks)
        lost += marks.count(False)
    print(f"\n{n_rows} equal rows x {seeds} seeds, seed spread {spread}, {repeats} tables: family-wise error "
          f"{rate(any_lost):.3f}, share of rows unmarked {lost / repeats / (n_rows - 1):.4f}")
    assert rate(any_lost) <= 0.065
