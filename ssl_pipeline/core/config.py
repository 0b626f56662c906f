"""Config validation with errors that name the key and what was expected.

The Snakefile calls `validate_config` before building the DAG, so a bad config stops the workflow
before any job runs.
"""
from pathlib import Path

import jsonschema
import yaml


class ConfigError(ValueError):
    pass


def key_path(error) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "(top level)"


def describe(error) -> str:
    key = key_path(error)
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        unknown = ", ".join(sorted(set(error.instance) - set(error.schema.get("properties", {}))))
        prefix = f"{key}." if error.absolute_path else ""
        return f"unknown key {prefix}{unknown}; expected one of: {allowed}"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        prefix = f"{key}." if error.absolute_path else ""
        return f"missing key {prefix}{missing}"
    expected = error.schema.get("description", "")
    hint = f" ({expected})" if expected else ""
    return f"config key {key}: {error.message}{hint}"


def semantic_errors(config: dict) -> list:
    """Rules that JSON schema cannot express."""
    errors = []
    for section, key in (("pretrain", "crop_scale"), ("pretrain", "crop_ratio")):
        low, high = config[section]["augment"][key]
        if low > high:
            errors.append(f"config key {section}.augment.{key}: lower bound {low} exceeds upper bound {high}")
    if config["compute"]["require_gpu"] and config["compute"]["device"] == "cpu":
        errors.append("config key compute.require_gpu: true contradicts compute.device: cpu")
    return errors + sweep_errors(config)


def sweep_errors(config: dict) -> list:
    """Sweeps that name no pretraining setting, fine-tuned variants no sweep defines, missing claim files."""
    from ssl_pipeline.core.sweeps import SweepError, sweep_variants

    try:
        variants = sweep_variants(config)
    except SweepError as error:
        return [str(error)]
    errors = [f"config key finetune.variants: '{name}' is not a variant of config sweeps (variants: "
              f"{', '.join(variants)})" for name in config["finetune"]["variants"] or [] if name not in variants]
    missing = [path for path in config["claims"]["files"] if not Path(path).is_file()]
    errors += [f"config key claims.files: {path} does not exist" for path in missing]
    if config["claims"]["files"] and not missing:
        from ssl_pipeline.claims.check import ClaimError, load_claims
        from ssl_pipeline.core.sweeps import run_name

        names = {variant: run_name(config, variant) for variant in variants}
        try:  # a claim that cannot be read fails now, not after hours of training
            for claim in load_claims(config["claims"]["files"], config["claims"]["alpha"], names):
                claim.check_variants()
        except ClaimError as error:
            errors.append(str(error))
    return errors


def merged(base: dict, override: dict) -> dict:
    """`override` on top of `base` as `snakemake --configfile` does it: nested dicts key by key,
    everything else replaced."""
    result = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        result[key] = merged(base[key], value) if both_dicts else value
    return result


def complete_config(given: dict, defaults_path) -> dict:
    """The whole config from the keys given: the defaults (config/config.yaml), then the experiments that
    the given key `experiment` names (a name or a list of names of config/experiments/<name>.yaml beside
    the defaults, in order), then the given keys themselves. The workflow builds its config so
    (workflow/rules/common.smk): `snakemake --configfile config/experiments/smoke.yaml` gives the same as a
    deploying project's config/config.yaml that holds only `experiment: smoke`. Keys given win over the
    experiments even where they equal the defaults: a deploying project should keep only the keys it
    changes, not a full copy of the defaults."""
    defaults_path = Path(defaults_path)
    config = yaml.safe_load(defaults_path.read_text())
    names = given.get("experiment", config.get("experiment"))  # set in the defaults file counts too
    experiments = defaults_path.parent / "experiments"
    for name in [] if names is None else [names] if isinstance(names, str) else names:
        path = experiments / f"{name}.yaml"
        if not isinstance(name, str) or "/" in name or not path.is_file():
            available = ", ".join(sorted(found.stem for found in experiments.glob("*.yaml")))
            raise ConfigError(f"config key experiment: {name!r} is not an experiment of {experiments} "
                              f"(there are: {available})")
        experiment = yaml.safe_load(path.read_text()) or {}
        if "experiment" in experiment:
            raise ConfigError(f"{path}: an experiment file cannot name other experiments (key experiment)")
        config = merged(config, experiment)
    return merged(config, given)


def load_config(config_path, override_paths, schema_path) -> dict:
    """config.yaml with experiment files on top, as the workflow builds it (complete_config), validated."""
    given = {}
    for path in override_paths:
        given = merged(given, yaml.safe_load(Path(path).read_text()) or {})
    config = complete_config(given, config_path)
    validate_config(config, schema_path)
    return config


def validate_config(config: dict, schema_path) -> None:
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    problems = [describe(error) for error in sorted(validator.iter_errors(config), key=key_path)]
    if not problems:
        problems = semantic_errors(config)
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"invalid configuration ({len(problems)} problem(s)):\n{listing}")
