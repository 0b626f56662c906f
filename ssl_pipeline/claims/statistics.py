"""The statistics behind a claim's verdict: means with t-based 95 % confidence intervals, and one-sided
tests of the three comparisons a claim can make.

- "a > b" (variant A beats variant B): Welch's t-test (Welch 1947) when the runs of A and B are
  independent; the paired t-test on per-seed differences when each seed's A and B runs share that seed's
  data (the same labeled subset and initialisation), which removes the between-seed variance they share.
- a monotone trend over an ordered list of variants: the t-test of the least-squares slope of the
  metric on the variant's rank (all runs as points), one-sided in the claimed direction.
- "value >= published - tolerance": the one-sample t-test of the mean against that threshold.

A verdict is **supported** when the one-sided test in the claimed direction rejects at alpha,
**contradicted** when the one-sided test in the opposite direction does, and **inconclusive** otherwise;
then it says how many seeds per variant a test of that size would need, at the observed effect and
variance, for 80 % power (the normal approximation n = ((z_{1-alpha} + z_{0.8}) * sd / effect)^2).
"""
import math

import numpy as np
from scipy import stats

POWER = 0.8
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


def describe(values, confidence: float = 0.95) -> dict:
    """n, mean, sample std and the t-based confidence interval of the mean (NaN bounds for n < 2)."""
    values = np.asarray(values, dtype=float)
    n, mean = len(values), float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def seeds_needed(effect: float, sd: float, alpha: float, groups: int = 1) -> float:
    """Seeds per variant for 80 % power at this effect and sd (groups=2: two independent groups)."""
    if abs(effect) < 1e-9 or not math.isfinite(sd) or sd == 0:  # no effect (up to rounding): no sample size
        return math.nan
    z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(POWER)
    return math.ceil(groups * (z * sd / abs(effect)) ** 2)


def verdict(p_greater: float, p_less: float, alpha: float) -> str:
    if p_greater < alpha:
        return SUPPORTED
    if p_less < alpha:
        return CONTRADICTED
    return INCONCLUSIVE


def t_statistic(difference: float, standard_error: float) -> float:
    """difference / standard_error; with no spread at all, +-inf for a real difference and 0 for none."""
    if standard_error > 0:
        return difference / standard_error
    return math.copysign(math.inf, difference) if difference else 0.0


def too_few(test: str, difference: float) -> dict:
    """A comparison with fewer than 2 values on a side: no variance, so no test."""
    return {"test": f"{test}: too few seeds (needs 2 per variant)", "difference": difference, "ci_low": math.nan,
            "ci_high": math.nan, "t": math.nan, "df": math.nan, "p_value": math.nan, "p_opposite": math.nan,
            "verdict": INCONCLUSIVE, "seeds_needed": math.nan}


def greater(a, b, paired: bool, alpha: float = 0.05, confidence: float = 0.95) -> dict:
    """Is mean(a) > mean(b)? a, b: per-seed values (paired: in the same seed order)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        return too_few("paired t-test" if paired else "Welch's t-test", float(a.mean() - b.mean()))
    if paired:
        if len(a) != len(b):
            raise ValueError(f"a paired test needs one value per seed on both sides, got {len(a)} and {len(b)}")
        differences = a - b
        summary = describe(differences, confidence)
        sd, df, groups = summary["std"], len(a) - 1, 1
        standard_error = sd / math.sqrt(len(a))
        test = "paired t-test"
    else:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        standard_error = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else math.inf
        sd, groups = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2), 2
        test = "Welch's t-test"
    difference = float(a.mean() - b.mean())
    t = t_statistic(difference, standard_error)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * standard_error
    result = {"test": test, "difference": difference, "ci_low": difference - half, "ci_high": difference + half,
              "t": t, "df": df, "p_value": float(stats.t.sf(t, df)), "p_opposite": float(stats.t.cdf(t, df))}
    result["verdict"] = verdict(result["p_value"], result["p_opposite"], alpha)
    result["seeds_needed"] = seeds_needed(difference, sd, alpha, groups) if result["verdict"] == INCONCLUSIVE else None
    return result


def increasing(groups: list, alpha: float = 0.05, confidence: float = 0.95) -> dict:
    """Does the metric grow along the ordered variants? groups: per-variant lists of values."""
    if min(len(values) for values in groups) < 2:  # the residual would be lack of fit, not seed noise
        return too_few("t-test of the least-squares slope on the variant rank",
                       float(np.mean(groups[-1]) - np.mean(groups[0])))
    ranks = np.concatenate([np.full(len(values), rank, dtype=float) for rank, values in enumerate(groups)])
    values = np.concatenate([np.asarray(values, dtype=float) for values in groups])
    fit = stats.linregress(ranks, values)
    df = len(values) - 2
    t = t_statistic(fit.slope, fit.stderr)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * fit.stderr
    result = {"test": "t-test of the least-squares slope on the variant rank", "difference": float(fit.slope),
              "ci_low": float(fit.slope - half), "ci_high": float(fit.slope + half), "t": float(t), "df": df,
              "p_value": float(stats.t.sf(t, df)), "p_opposite": float(stats.t.cdf(t, df))}
    result["verdict"] = verdict(result["p_value"], result["p_opposite"], alpha)
    residual_sd = math.sqrt(max(0.0, np.sum((values - (fit.intercept + fit.slope * ranks)) ** 2) / max(1, df)))
    spread = np.std(np.arange(len(groups)), ddof=0) or 1.0
    # var(slope) = sd^2 / (N sd_rank^2): the formula gives the total N, spread over the variants.
    total = seeds_needed(fit.slope * spread, residual_sd, alpha)
    result["seeds_needed"] = (math.ceil(total / len(groups)) if math.isfinite(total) else total) \
        if result["verdict"] == INCONCLUSIVE else None
    return result


def at_least(values, threshold: float, alpha: float = 0.05, confidence: float = 0.95) -> dict:
    """Is the mean at least `threshold` (a published number minus its tolerance)?"""
    summary = describe(values, confidence)
    n = summary["n"]
    difference = summary["mean"] - threshold
    if n < 2:
        return too_few("one-sample t-test against the threshold", difference)
    standard_error = summary["std"] / math.sqrt(n)
    t = t_statistic(difference, standard_error)
    df = max(1, n - 1)
    result = {"test": "one-sample t-test against the threshold", "difference": difference,
              "ci_low": summary["ci_low"] - threshold, "ci_high": summary["ci_high"] - threshold, "t": t, "df": df,
              "p_value": float(stats.t.sf(t, df)), "p_opposite": float(stats.t.cdf(t, df))}
    result["verdict"] = verdict(result["p_value"], result["p_opposite"], alpha)
    result["seeds_needed"] = (seeds_needed(difference, summary["std"], alpha) if result["verdict"] == INCONCLUSIVE
                              else None)
    return result
