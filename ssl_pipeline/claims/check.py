"""Check the claims of config/claims/*.yaml against a run's results: results/claims.csv.

A claim file (config/claims/simclr.yaml is the example) lists claims under `claims:`, each with
- `id`, `statement`, `source` (paper and section or table) and `experiment` (the file it needs);
- `metric`: linear_probe_accuracy or knn_accuracy (one value per pretraining run), test_accuracy (one per
  fine-tuning run; `fraction` says which labels; variant `scratch` is training from scratch), or
  pretraining_gain (a pretrained run's test accuracy minus the scratch run's of the same fine-tuning seed
  and labels);
- `objective` (default simclr) and `compare`, one of
  - {type: greater, a: VARIANT, b: VARIANT} with `test: welch` or `test: paired` and `why` (for the
    fine-tuning metrics, `a_fraction` and `b_fraction` may compare one variant at two label fractions);
  - {type: trend, over: variants | fractions, values: [...], direction: increasing | decreasing};
  - {type: at_least, variant: VARIANT, published: NUMBER, tolerance: NUMBER};
- `alpha` (default config claims.alpha).
A claim that does not hold is a row with its verdict, never an error; a claim that cannot be evaluated
(unknown variant, no runs) is an error naming the file and the claim.
"""
import csv
import logging
import math

import yaml

from ssl_pipeline.core.artifacts import atomic_path
from ssl_pipeline.claims import statistics
from ssl_pipeline.core.html_table import write_html_table
from ssl_pipeline.core.results_table import SCRATCH, pretraining_frame, runs_frame

log = logging.getLogger(__name__)
METRICS = ("linear_probe_accuracy", "knn_accuracy", "test_accuracy", "pretraining_gain")
COMPARISONS = ("greater", "trend", "at_least")
REQUIRED = {"greater": ("a", "b"), "trend": ("values",), "at_least": ("variant", "published")}
COLUMNS = ["id", "statement", "source", "experiment", "metric", "comparison", "groups", "difference",
           "difference_ci_low", "difference_ci_high", "test", "why", "t", "df", "p_value", "alpha", "verdict",
           "seeds_needed"]


class ClaimError(ValueError):
    pass


class Claim:
    def __init__(self, entry: dict, where: str, alpha: float, variant_names: dict):
        self.where = f"{where}: claim '{entry.get('id', '?')}'"
        for field in ("id", "statement", "source", "experiment", "metric", "compare"):
            if field not in entry:
                raise ClaimError(f"{self.where}: missing field '{field}'")
        self.entry, self.compare = entry, entry["compare"]
        self.metric, self.objective = entry["metric"], entry.get("objective", "simclr")
        self.alpha = float(entry.get("alpha", alpha))
        self.variant_names = variant_names
        if self.metric not in METRICS:
            raise ClaimError(f"{self.where}: metric '{self.metric}' is not one of {', '.join(METRICS)}")
        if not isinstance(self.compare, dict) or self.compare.get("type") not in COMPARISONS:
            raise ClaimError(f"{self.where}: compare.type must be one of {', '.join(COMPARISONS)}")
        kind = self.compare["type"]
        for field in REQUIRED[kind]:
            if field not in self.compare:
                raise ClaimError(f"{self.where}: a '{kind}' comparison needs compare.{field}")
        for field, allowed in (("direction", ("increasing", "decreasing")), ("over", ("variants", "fractions"))):
            if kind == "trend" and self.compare.get(field, allowed[0]) not in allowed:
                raise ClaimError(f"{self.where}: compare.{field} must be one of {', '.join(allowed)}")
        if kind == "greater" and entry.get("test") not in ("welch", "paired"):
            raise ClaimError(f"{self.where}: a 'greater' claim needs test: welch or test: paired (and why)")
        if self.metric == "pretraining_gain" and SCRATCH in (self.compare.get("a"), self.compare.get("b"),
                                                            self.compare.get("variant"), entry.get("variant")):
            raise ClaimError(f"{self.where}: pretraining_gain is a pretrained variant's gain over scratch; "
                             "'scratch' has none")

    def check_variants(self) -> None:
        """Raise a ClaimError for a variant the run's sweeps do not define."""
        compare = self.compare
        named = [compare.get("a"), compare.get("b"), compare.get("variant"), self.entry.get("variant"),
                 *(compare["values"] if compare["type"] == "trend" and compare.get("over", "variants") == "variants"
                   else [])]
        for variant in filter(None, named):
            self.run_variant(variant)

    def run_variant(self, variant: str) -> str:
        if variant == SCRATCH:
            return variant
        if variant not in self.variant_names:
            raise ClaimError(f"{self.where}: variant '{variant}' is not in this run's sweeps (variants: "
                             f"{', '.join(self.variant_names)}); run the experiment {self.entry['experiment']}")
        return self.variant_names[variant]

    def fraction(self, value=None) -> float:
        value = self.entry.get("fraction") if value is None else value
        if value is None:
            raise ClaimError(f"{self.where}: metric {self.metric} needs `fraction` (the share of labels)")
        return float(value)

    def samples(self, runs, pretraining, variant: str, fraction=None):
        """The metric's values for one variant (and label fraction), one per independent unit, indexed by
        its seed: a pretraining run (its fine-tuning runs share its encoder, so they are averaged into
        one value), or a scratch run's fine-tuning seed."""
        if self.metric in ("linear_probe_accuracy", "knn_accuracy"):
            column = "linear_accuracy" if self.metric == "linear_probe_accuracy" else "knn_accuracy"
            rows = pretraining[(pretraining["objective"] == self.objective)
                               & (pretraining["variant"] == self.run_variant(variant))]
            values = rows.set_index("pretrain_seed")[column]
        else:
            at_fraction = runs[(runs["label_fraction"] - self.fraction(fraction)).abs() < 1e-9]
            scratch = at_fraction[at_fraction["init"] == SCRATCH].set_index("seed")["test_accuracy"]
            if variant == SCRATCH:
                values = scratch
            else:
                rows = at_fraction[(at_fraction["init"] == "pretrained") & (at_fraction["objective"] == self.objective)
                                   & (at_fraction["variant"] == self.run_variant(variant))]
                values = rows.set_index(["pretrain_seed", "seed"])["test_accuracy"]
                if self.metric == "pretraining_gain":
                    missing = set(values.index.get_level_values("seed")) - set(scratch.index)
                    if missing:
                        raise ClaimError(f"{self.where}: pretraining_gain needs scratch runs of fine-tuning seeds "
                                         f"{sorted(missing)} at fraction {self.fraction(fraction)}")
                    # Against the scratch run of the same fine-tuning seed: the same labeled subset.
                    values = values - scratch.reindex(values.index.get_level_values("seed")).to_numpy()
                values = values.groupby(level="pretrain_seed").mean()
        if values.empty:
            where = "" if self.metric in ("linear_probe_accuracy", "knn_accuracy") else \
                f", fraction {self.fraction(fraction)}"
            raise ClaimError(f"{self.where}: no runs of variant '{variant}' (objective {self.objective}{where}) "
                             "in the results")
        return values.sort_index()

    def evaluate(self, runs, pretraining) -> dict:
        kind, compare = self.compare["type"], self.compare
        if kind == "greater":
            a, b = (self.samples(runs, pretraining, compare[side], compare.get(f"{side}_fraction"))
                    for side in ("a", "b"))
            paired = self.entry["test"] == "paired"
            if paired:
                shared = a.index.intersection(b.index)
                if len(shared) != len(a) or len(shared) != len(b):
                    raise ClaimError(f"{self.where}: a paired test needs the same seeds on both sides; "
                                     f"{compare['a']} has {list(a.index)}, {compare['b']} {list(b.index)}")
            groups = {side_name(compare, "a"): a, side_name(compare, "b"): b}
            result = statistics.greater(a.to_numpy(), b.to_numpy(), paired, self.alpha)
        elif kind == "trend":
            over = compare.get("over", "variants")
            values = compare["values"]
            if over == "fractions":
                variant = self.entry.get("variant", "base")
                groups = {f"{100 * float(f):g}% labels": self.samples(runs, pretraining, variant, f) for f in values}
            else:
                groups = {v: self.samples(runs, pretraining, v) for v in values}
            sign = -1 if compare.get("direction") == "decreasing" else 1
            result = statistics.increasing([sign * g.to_numpy() for g in groups.values()], self.alpha)
            if sign < 0:  # the test ran on the negated metric: report the slope of the metric itself
                result.update(difference=-result["difference"], ci_low=-result["ci_high"],
                              ci_high=-result["ci_low"], t=-result["t"])
        else:
            values = self.samples(runs, pretraining, compare["variant"])
            threshold = float(compare["published"]) - float(compare.get("tolerance", 0))
            groups = {compare["variant"]: values}
            result = statistics.at_least(values.to_numpy(), threshold, self.alpha)
        return self.row(groups, result)

    def row(self, groups: dict, result: dict) -> dict:
        described = []
        for name, values in groups.items():
            d = statistics.describe(values.to_numpy())
            ci = f" [{d['ci_low']:.4f}, {d['ci_high']:.4f}]" if d["n"] > 1 else ""
            described.append(f"{name}: {d['mean']:.4f}{ci} (n={d['n']})")
        return {**{field: self.entry[field] for field in ("id", "statement", "source", "experiment", "metric")},
                "comparison": describe_comparison(self.compare), "groups": "; ".join(described),
                "difference": result["difference"], "difference_ci_low": result["ci_low"],
                "difference_ci_high": result["ci_high"], "test": result["test"], "why": self.entry.get("why", ""),
                "t": result["t"], "df": result["df"], "p_value": result["p_value"], "alpha": self.alpha,
                "verdict": result["verdict"], "seeds_needed": result["seeds_needed"]}


def side_name(compare: dict, side: str) -> str:
    fraction = compare.get(f"{side}_fraction")
    return compare[side] + (f" at {100 * float(fraction):g}% labels" if fraction is not None else "")


def describe_comparison(compare: dict) -> str:
    if compare["type"] == "greater":
        return f"{side_name(compare, 'a')} > {side_name(compare, 'b')}"
    if compare["type"] == "trend":
        return f"{compare.get('direction', 'increasing')} over {', '.join(map(str, compare['values']))}"
    return f"{compare['variant']} >= {compare['published']} - {compare.get('tolerance', 0)}"


def load_claims(paths, alpha: float, variant_names: dict) -> list:
    claims = []
    for path in paths:
        try:
            with open(path) as handle:
                document = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError) as error:
            raise ClaimError(f"{path}: cannot read the claims: {error}") from None
        if not isinstance(document, dict) or not isinstance(document.get("claims"), list):
            raise ClaimError(f"{path}: expected a mapping with a list under 'claims'")
        claims += [Claim(entry, str(path), alpha, variant_names) for entry in document["claims"]]
    return claims


def format_cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{0.0 if abs(value) < 1e-12 else value:.6g}"  # no -5.55e-17
    return "" if value is None else value


def check_claims(claim_files, run_metrics, knn, linear, settings: dict, variant_names: dict, out_path,
                 html_path=None) -> list:
    """Evaluate every claim; write one row per claim to `out_path` (CSV) and `html_path` (its table as a
    page for Snakemake's HTML report). settings: config `claims`."""
    claims = load_claims(claim_files, settings["alpha"], variant_names)
    runs, pretraining = runs_frame(run_metrics), pretraining_frame(knn, linear)
    rows = [claim.evaluate(runs, pretraining) for claim in claims]
    with atomic_path(out_path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: format_cell(value) for key, value in row.items()} for row in rows)
    if html_path:
        write_html_table(html_path, "Claims", COLUMNS, [{k: format_cell(v) for k, v in row.items()} for row in rows],
                         "Each claim: the runs behind it (mean [95 % CI] (n) per group), the one-sided test, the "
                         "difference with its 95 % CI, and the verdict at the claim's alpha.")
    for row in rows:
        log.info("%s: %s (p = %s)", row["id"], row["verdict"], format_cell(row["p_value"]))
    return rows
