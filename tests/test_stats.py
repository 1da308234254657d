"""stats.py against values computed by hand: McNemar from the binomial, macro-F1, quantiles, bootstrap intervals
with a known answer, p-values, and determinism under a seed."""

from __future__ import annotations

import math
import random
import statistics

import pytest

import bertcls
import stats


@pytest.mark.parametrize("only_a, only_b, p", [
    (0, 0, 1.0),  # no discordant example: no evidence either way
    (0, 1, 1.0),  # 2 * C(1,0) / 2^1 = 1
    (1, 5, 14 / 64),  # 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64
    (5, 1, 14 / 64),  # two-sided: symmetric
    (0, 6, 2 / 64),  # 2 * C(6,0) / 2^6
    (2, 2, 1.0),  # 2 * (1 + 4 + 6) / 16 > 1: capped
    (3, 12, 1152 / 32768),  # 2 * (1 + 15 + 105 + 455) / 2^15
])
def test_mcnemar_exact_p_by_hand(only_a, only_b, p):
    assert stats.mcnemar_p(only_a, only_b) == p


def test_mcnemar_large_counts_match_the_binomial_sum():
    only_a, only_b = 180, 240
    n = only_a + only_b
    assert stats.mcnemar_p(only_a, only_b) == min(1.0, 2 * sum(math.comb(n, i) for i in range(only_a + 1)) / 2 ** n)


def test_scores_by_hand():
    # label 0: tp 1, predicted 2, gold 2 -> P 1/2, R 1/2, F1 1/2; label 1: tp 2, predicted 3, gold 2 -> P 2/3,
    # R 1, F1 0.8; label 2: tp 0 -> F1 0; label 3: no gold, never predicted -> F1 0, still counted in the mean
    accuracy, f1 = stats.scores([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 4)
    assert accuracy == 3 / 5
    assert f1 == pytest.approx((0.5 + 0.8 + 0 + 0) / 4)


def test_scores_equal_bertcls_metrics_bit_for_bit():
    rng = random.Random(3)
    for n_labels in (2, 3, 9):
        gold = [rng.randrange(n_labels) for _ in range(200)]
        predicted = [g if rng.random() < 0.8 else rng.randrange(n_labels) for g in gold]
        expected = bertcls.classification_metrics(gold, predicted, 0.0, {i: str(i) for i in range(n_labels)})
        assert stats.scores(gold, predicted, n_labels) == (expected["accuracy"], expected["f1"])


def test_quantile_is_statistics_inclusive_method():
    values = sorted(random.Random(0).random() for _ in range(37))
    cuts = statistics.quantiles(values, n=40, method="inclusive")
    assert stats.quantile(values, 0.025) == pytest.approx(cuts[0])
    assert stats.quantile(values, 0.975) == pytest.approx(cuts[-1])
    assert stats.percentile_interval(list(range(101))) == pytest.approx((2.5, 97.5))  # positions 2.5, 97.5 of 0..100
    assert stats.percentile_interval([7.0] * 5) == (7.0, 7.0)


def test_bootstrap_p_by_hand():
    assert stats.bootstrap_p([0.0] * 50) == 1.0
    assert stats.bootstrap_p([-1, 1, 2, 3]) == 2 * (1 + 1) / 5  # one at or below 0, three at or above
    assert stats.bootstrap_p([0.1] * 99) == 2 * (0 + 1) / 100  # never at or below 0: the smallest p of 99
    assert stats.bootstrap_p([-2, -1, 1, 2]) == 1.0


def test_all_correct_gives_a_point_interval():
    gold = [0, 1, 2] * 10
    [(accuracies, f1s)] = stats.resample_scores(gold, [gold], 3, 200, random.Random(0))
    assert set(accuracies) == {1.0} and set(f1s) == {1.0}
    assert stats.percentile_interval(accuracies) == (1.0, 1.0)


def test_interval_of_two_examples_has_a_known_answer():
    # one of two examples right: a resample holds 0, 1 or 2 copies of it, so accuracy is 0, 1/2 or 1 with
    # probabilities 1/4, 1/2, 1/4; 2.5% and 97.5% of that lie at 0 and 1
    [(accuracies, _)] = stats.resample_scores([0, 1], [[0, 0]], 2, 4000, random.Random(1))
    shares = {value: accuracies.count(value) / len(accuracies) for value in (0.0, 0.5, 1.0)}
    assert sum(shares.values()) == 1.0
    assert shares[0.0] == pytest.approx(0.25, abs=0.03) and shares[0.5] == pytest.approx(0.5, abs=0.03)
    assert stats.percentile_interval(accuracies) == (0.0, 1.0)


def test_interval_of_a_coin_matches_the_binomial_quantiles():
    # 50 of 100 right: resampled accuracy is Binomial(100, 1/2) / 100, whose 2.5% and 97.5% quantiles are 40
    # and 60 (P(X <= 39) = 0.018 < 0.025 <= P(X <= 40) = 0.028, and symmetrically)
    cdf = [sum(math.comb(100, i) for i in range(k + 1)) / 2 ** 100 for k in range(101)]
    assert (next(k for k in range(101) if cdf[k] >= 0.025), next(k for k in range(101) if cdf[k] >= 0.975)) == (40, 60)
    gold = [0, 1] * 50
    [(accuracies, _)] = stats.resample_scores(gold, [[0] * 100], 2, 2000, random.Random(2))
    low, high = stats.percentile_interval(accuracies)
    assert low == pytest.approx(0.40, abs=0.015) and high == pytest.approx(0.60, abs=0.015)


def test_same_resamples_for_every_list_and_determinism_under_a_seed():
    rng = random.Random(5)
    gold = [rng.randrange(3) for _ in range(60)]
    a = [g if rng.random() < 0.9 else (g + 1) % 3 for g in gold]
    b = [g if rng.random() < 0.7 else (g + 1) % 3 for g in gold]
    first = stats.resample_scores(gold, [a, b, a], 3, 300, random.Random(9))
    assert first == stats.resample_scores(gold, [a, b, a], 3, 300, random.Random(9))
    assert first != stats.resample_scores(gold, [a, b, a], 3, 300, random.Random(10))
    assert first[0] == first[2]  # identical predictions, scored on the same resamples
    differences = [x - y for x, y in zip(first[0][1], first[2][1])]
    assert set(differences) == {0.0} and stats.bootstrap_p(differences) == 1.0
    # resampled accuracy is unbiased: its mean over resamples is close to the accuracy on all examples
    for predicted, (accuracies, _) in zip([a, b], first):
        assert statistics.fmean(accuracies) == pytest.approx(stats.scores(gold, predicted, 3)[0], abs=0.01)


def test_mcnemar_over_seeds_must_point_the_same_way():
    assert stats.mcnemar_p_same_way([(3, 12)]) == stats.mcnemar_p(3, 12)
    # A better in both seeds: one-sided p 1/2^10 and 1/2^8, the larger counts, doubled for two sides
    assert stats.mcnemar_p_same_way([(10, 0), (8, 0)]) == 2 * max(1 / 2 ** 10, 1 / 2 ** 8)
    # each seed alone is far below 0.05, but they disagree: no evidence that either model is better
    assert stats.mcnemar_p(117, 0) < 1e-30 and stats.mcnemar_p(0, 35) < 1e-10
    assert stats.mcnemar_p_same_way([(117, 0), (0, 35)]) == 1.0
    assert stats.at_least(5, 6) == 7 / 64 and stats.at_least(0, 6) == 1.0 and stats.at_least(6, 6) == 1 / 64


def test_seed_means_resample_seeds_on_top_of_examples():
    # one seed: no second level, the mean over its runs (e.g. folds) at each resample
    assert stats.seed_means([[[0.1, 0.2], [0.3, 0.6]]], random.Random(0)) == pytest.approx([0.2, 0.4])
    # two seeds scoring 0 and 1 on every resample: the mean of two seeds drawn with replacement is 0, 1/2 or 1
    # with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1] (not the single value 1/2)
    replicates = stats.seed_means([[[0.0] * 4000], [[1.0] * 4000]], random.Random(1))
    shares = {value: replicates.count(value) / 4000 for value in (0.0, 0.5, 1.0)}
    assert sum(shares.values()) == 1.0 and shares[0.5] == pytest.approx(0.5, abs=0.03)
    assert stats.percentile_interval(replicates) == (0.0, 1.0)
    assert replicates == stats.seed_means([[[0.0] * 4000], [[1.0] * 4000]], random.Random(1))
