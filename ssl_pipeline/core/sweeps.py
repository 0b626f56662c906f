"""Sweeps: named variants of the pretraining settings, a dimension of the DAG.

An experiment's `sweeps` maps a sweep's name to columns of pretraining keys and their values, one row
per variant (config/config.yaml documents the format):

    sweeps:
      temperature: {pretrain.simclr.temperature: [0.1, 0.5]}

Variant names and paths follow Snakemake's `Paramspace` convention: the last part of each key, `~`, the
value, `_` between columns ("temperature~0.1"); sweeps come in the order of their names and columns in
the order of their keys, whatever the YAML's order. The config without overrides is the variant `base`; a
row whose values equal the base config's is that same run, so it shares the base's jobs (its name maps
to `base`). Only `pretrain.*` keys may be swept: everything downstream of pretraining then depends on a
variant through its encoder alone, so scratch runs and data jobs are shared by every variant.
"""
import copy
import functools
import json

from ssl_pipeline.core.config_keys import NOT_JOB_SETTINGS, has_key, lookup, other_objectives

BASE = "base"


class SweepError(ValueError):
    pass


def _columns(config: dict, sweep: str, keys: dict) -> dict:
    if not isinstance(keys, dict) or not keys:
        raise SweepError(f"config sweeps.{sweep}: give one or more pretrain keys, each with a list of values")
    lengths = set()
    for key, values in keys.items():
        where = f"config sweeps.{sweep}.{key}"
        if not key.startswith("pretrain.") or key in NOT_JOB_SETTINGS or not has_key(config, key):
            raise SweepError(f"{where}: only existing pretrain.* settings can be swept (not the run lists "
                             "pretrain.objectives and pretrain.seeds)")
        if isinstance(lookup(config, key), dict):
            raise SweepError(f"{where}: a section, not a setting; sweep its keys one by one")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: a list of one or more values")
        if any(isinstance(value, (dict, list)) for value in values):
            raise SweepError(f"{where}: values must be numbers, strings or booleans (they name paths)")
        lengths.add(len(values))
    if len(lengths) > 1:
        raise SweepError(f"config sweeps.{sweep}: every key needs as many values as the others (one row "
                         "per variant)")
    return keys


def _sweep_variants(config: dict) -> dict:
    """name -> {dotted key: value} for every row of every sweep, plus the base config."""
    import pandas as pd
    from snakemake.utils import Paramspace

    variants = {BASE: {}}
    columns_seen = {}
    for sweep, keys in (config.get("sweeps") or {}).items():
        keys = _columns(config, sweep, keys)
        names = {key: key.rsplit(".", 1)[-1] for key in keys}
        for key, column in names.items():
            if columns_seen.setdefault(column, key) != key:
                raise SweepError(f"config sweeps.{sweep}.{key}: its name '{column}' is also the last part of "
                                 f"{columns_seen[column]}; variant names would be ambiguous")
        frame = pd.DataFrame({names[key]: values for key, values in keys.items()}, dtype=object)
        space = Paramspace(frame, filename_params="*")
        for name, (_, row) in zip(space.instance_patterns, frame.iterrows()):
            overrides = {key: row[names[key]] for key in keys}
            same_as_base = all(lookup(config, key) == value for key, value in overrides.items())
            variants[name] = {} if same_as_base else overrides
    return variants


@functools.lru_cache(maxsize=64)
def _cached(config_json: str) -> dict:
    return _sweep_variants(json.loads(config_json))


def sweep_variants(config: dict) -> dict:
    """Every variant name -> its overrides ({} for the base config and rows equal to it)."""
    # Sorted keys: names and order do not depend on how a YAML file orders its keys.
    return _cached(json.dumps(config, sort_keys=True, default=str))


def run_name(config: dict, variant: str) -> str:
    """The name a variant's jobs run under: `base` for the rows equal to the base config."""
    variants = sweep_variants(config)
    if variant not in variants:
        raise SweepError(f"variant '{variant}' is not in config sweeps; variants: {', '.join(variants)}")
    return variant if variants[variant] else BASE


def pretraining_variants(config: dict) -> list:
    """The variants that get pretraining jobs of their own: base first, then every distinct row."""
    return [name for name, overrides in sweep_variants(config).items() if name == BASE or overrides]


def applies_to(config: dict, variant: str, objective: str) -> bool:
    """Whether the variant changes anything for `objective`: a sweep of simclr's temperature has no
    byol run of its own (it would repeat byol's base run)."""
    overrides = sweep_variants(config)[run_name(config, variant)]
    return not overrides or any(not other_objectives(key, objective) for key in overrides)


def variant_config(config: dict, variant: str) -> dict:
    """`config` with the variant's overrides applied (a copy; `config` itself for the base config)."""
    overrides = sweep_variants(config)[run_name(config, variant)]
    if not overrides:
        return config
    changed = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, name = key.split(".")
        node = changed
        for parent in parents:
            node = node[parent]
        node[name] = value.item() if hasattr(value, "item") else value
    return changed
