"""The statistics of the claims table on data with known answers."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ssl_pipeline.claims import statistics
from ssl_pipeline.claims.statistics import CONTRADICTED, INCONCLUSIVE, SUPPORTED


def test_the_confidence_interval_uses_the_t_quantile():
    # Textbook: t(0.975, 4) = 2.776; values 1..5 have mean 3 and sd sqrt(2.5).
    summary = statistics.describe([1, 2, 3, 4, 5])
    assert summary["mean"] == 3 and summary["std"] == pytest.approx(math.sqrt(2.5))
    assert summary["ci_high"] - 3 == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), abs=1e-3)


def test_the_95_percent_interval_covers_the_true_mean_in_about_95_percent_of_draws():
    rng = np.random.default_rng(0)
    covered = [(s["ci_low"] <= 0.7 <= s["ci_high"])
               for s in (statistics.describe(rng.normal(0.7, 0.02, 4)) for _ in range(4000))]
    assert 0.94 <= np.mean(covered) <= 0.96


def test_welch_and_paired_tests_agree_with_scipy():
    a, b = [0.81, 0.83, 0.80, 0.84, 0.82], [0.79, 0.80, 0.78, 0.81, 0.77]
    welch = statistics.greater(a, b, paired=False)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    assert welch["t"] == pytest.approx(reference.statistic) and welch["p_value"] == pytest.approx(reference.pvalue)
    paired = statistics.greater(a, b, paired=True)
    reference = scipy_stats.ttest_rel(a, b, alternative="greater")
    assert paired["t"] == pytest.approx(reference.statistic) and paired["p_value"] == pytest.approx(reference.pvalue)
    assert welch["test"] == "Welch's t-test" and paired["test"] == "paired t-test"
    assert welch["ci_low"] < welch["difference"] < welch["ci_high"] and welch["difference"] == pytest.approx(0.03)


def test_verdicts_of_a_greater_b_on_hand_made_results():
    assert statistics.greater([0.9, 0.91, 0.92], [0.80, 0.81, 0.82], paired=False)["verdict"] == SUPPORTED
    assert statistics.greater([0.80, 0.81, 0.82], [0.9, 0.91, 0.92], paired=False)["verdict"] == CONTRADICTED
    unclear = statistics.greater([0.80, 0.85, 0.82], [0.81, 0.83, 0.80], paired=False)
    assert unclear["verdict"] == INCONCLUSIVE and unclear["seeds_needed"] > 3
    assert statistics.greater([0.9, 0.91, 0.92], [0.80, 0.81, 0.82], paired=False)["seeds_needed"] is None


def test_verdicts_of_a_trend_on_hand_made_results():
    rising = [[0.70, 0.71], [0.75, 0.76], [0.80, 0.81]]
    assert statistics.increasing(rising)["verdict"] == SUPPORTED
    assert statistics.increasing(rising[::-1])["verdict"] == CONTRADICTED
    assert statistics.increasing([[0.7, 0.8], [0.75, 0.72], [0.78, 0.71]])["verdict"] == INCONCLUSIVE
    slope = scipy_stats.linregress([0, 0, 1, 1, 2, 2], sum(rising, [])).slope
    assert statistics.increasing(rising)["difference"] == pytest.approx(slope)


def test_verdicts_of_a_value_against_a_published_number():
    assert statistics.at_least([0.93, 0.931, 0.929], 0.925 - 0.005)["verdict"] == SUPPORTED
    assert statistics.at_least([0.90, 0.901, 0.899], 0.925 - 0.005)["verdict"] == CONTRADICTED
    inconclusive = statistics.at_least([0.915, 0.93, 0.921], 0.92)
    # mean 0.922, sd 0.00755: ((1.645 + 0.842) * 0.00755 / 0.002)^2 = 88.1, so 89 seeds.
    assert inconclusive["verdict"] == INCONCLUSIVE and inconclusive["seeds_needed"] == 89
    reference = scipy_stats.ttest_1samp([0.93, 0.931, 0.929], 0.92, alternative="greater")
    assert statistics.at_least([0.93, 0.931, 0.929], 0.92)["p_value"] == pytest.approx(reference.pvalue)


def test_one_seed_or_no_spread_never_makes_a_claim_supported():
    single = statistics.greater([0.9], [0.8], paired=False)
    assert single["verdict"] == INCONCLUSIVE and "too few seeds" in single["test"]
    assert statistics.at_least([0.95], 0.9)["verdict"] == INCONCLUSIVE
    same = statistics.greater([0.8, 0.8, 0.8], [0.8, 0.8, 0.8], paired=False)
    assert same["verdict"] == INCONCLUSIVE and same["t"] == 0


def test_seeds_needed_for_a_trend_are_per_variant():
    groups = [[0.70, 0.80], [0.76, 0.72], [0.78, 0.75]]
    result = statistics.increasing(groups)
    slope = scipy_stats.linregress([0, 0, 1, 1, 2, 2], sum(groups, []))
    residual_sd = math.sqrt(np.sum((np.array(sum(groups, [])) - (slope.intercept + slope.slope * np.array(
        [0, 0, 1, 1, 2, 2]))) ** 2) / 4)
    z = scipy_stats.norm.ppf(0.95) + scipy_stats.norm.ppf(0.8)
    total = math.ceil((z * residual_sd / (slope.slope * np.std([0, 1, 2]))) ** 2)
    assert result["verdict"] == INCONCLUSIVE and result["seeds_needed"] == math.ceil(total / 3)


def test_a_trend_with_one_run_per_variant_gives_no_verdict():
    result = statistics.increasing([[0.1], [0.2], [0.3]])
    assert result["verdict"] == "inconclusive" and "too few seeds" in result["test"]
