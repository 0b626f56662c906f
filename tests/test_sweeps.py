"""Sweeps: Paramspace names, rows equal to the base config sharing its runs, the overrides a pretraining
job gets, and clear errors for sweeps that cannot work."""
import copy

import pytest
import yaml

from ssl_pipeline.core.config import ConfigError, validate_config
from ssl_pipeline.core.settings import rule_settings
from ssl_pipeline.core.sweeps import BASE, pretraining_variants, run_name, sweep_variants
from tests.conftest import REPO

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def with_sweeps(sweeps, **finetune):
    config = copy.deepcopy(DEFAULT)
    config["sweeps"] = sweeps
    config["finetune"].update(finetune)
    return config


def test_without_sweeps_there_is_one_variant_and_the_pretraining_settings_keep_the_seed():
    assert pretraining_variants(DEFAULT) == [BASE]
    settings = rule_settings(DEFAULT, "pretrain", "simclr")["pretrain"]
    assert settings["seed"] == 0 and settings["variant"] == BASE and "seeds" not in settings


def test_variants_are_named_as_paramspace_names_them_and_a_row_equal_to_the_base_is_the_base():
    config = with_sweeps({"temperature": {"pretrain.simclr.temperature": [0.1, 0.2]},
                          "batch": {"pretrain.batch_size": [64, 256], "pretrain.learning_rate": [0.001, 0.004]}})
    variants = sweep_variants(config)
    # Sweeps in the order of their names, columns in the order of their keys: YAML's order does not matter.
    assert list(variants) == [BASE, "batch_size~64_learning_rate~0.001", "batch_size~256_learning_rate~0.004",
                              "temperature~0.1", "temperature~0.2"]
    assert pretraining_variants(config) == [BASE, "batch_size~64_learning_rate~0.001", "temperature~0.1"]
    assert run_name(config, "temperature~0.2") == BASE and run_name(config, "batch_size~256_learning_rate~0.004") == BASE
    settings = rule_settings(config, "pretrain", "simclr", {"variant": "batch_size~64_learning_rate~0.001", "seed": "3"})
    assert settings["pretrain"]["batch_size"] == 64 and settings["pretrain"]["learning_rate"] == 0.001
    assert settings["pretrain"]["seed"] == 3
    # Jobs after pretraining read no swept key: their settings are the same for every variant.
    assert rule_settings(config, "finetune") == rule_settings(DEFAULT, "finetune")


@pytest.mark.parametrize("sweeps, fragment", [
    ({"lr": {"finetune.learning_rate": [0.1]}}, "config sweeps.lr.finetune.learning_rate: only existing pretrain.* settings"),
    ({"s": {"pretrain.seeds": [1]}}, "only existing pretrain.* settings can be swept (not the run lists"),
    ({"s": {"pretrain.no_such_key": [1]}}, "config sweeps.s.pretrain.no_such_key: only existing pretrain"),
    ({"s": {"pretrain.augment": [1]}}, "config sweeps.s.pretrain.augment: a section, not a setting"),
    ({"s": {"pretrain.batch_size": [64, 128], "pretrain.learning_rate": [0.1]}}, "every key needs as many values"),
    ({"s": {"pretrain.batch_size": [[64]]}}, "config key sweeps.s.pretrain.batch_size.0: [64] is not of type"),
    ({"a": {"pretrain.simclr.temperature": [0.1]}, "b": {"pretrain.moco_v2.temperature": [0.1]}},
     "its name 'temperature' is also the last part of pretrain.simclr.temperature"),
])
def test_a_sweep_that_cannot_work_is_a_config_error_naming_it(sweeps, fragment):
    with pytest.raises(ConfigError) as error:
        validate_config(with_sweeps(sweeps), SCHEMA)
    assert fragment in str(error.value)


def test_fine_tuned_variants_and_claim_files_must_exist():
    config = with_sweeps({"t": {"pretrain.simclr.temperature": [0.1]}}, variants=["temperature~0.3"])
    config["claims"]["files"] = ["config/claims/missing.yaml"]
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert "finetune.variants: 'temperature~0.3' is not a variant of config sweeps" in str(error.value)
    assert "claims.files: config/claims/missing.yaml does not exist" in str(error.value)


def test_the_reproduce_experiment_and_its_claims_agree():
    from ssl_pipeline.claims.check import load_claims
    from ssl_pipeline.core.config import load_config

    experiment = REPO / "config" / "experiments" / "reproduce-simclr.yaml"
    config = load_config(REPO / "config" / "config.yaml", [experiment], SCHEMA)
    names = {variant: run_name(config, variant) for variant in sweep_variants(config)}
    claims = load_claims([REPO / path for path in config["claims"]["files"]], 0.05, names)
    assert len(claims) >= 6 and len(config["pretrain"]["seeds"]) >= 3
    for claim in claims:
        claim.check_variants()  # raises for a variant the sweeps do not define


def test_a_claim_naming_a_variant_no_sweep_defines_fails_when_the_config_loads(tmp_path):
    claims = tmp_path / "claims.yaml"
    claims.write_text(yaml.safe_dump({"claims": [{
        "id": "t", "statement": "s", "source": "p", "experiment": "e", "metric": "knn_accuracy",
        "compare": {"type": "greater", "a": "temperature~0.7", "b": "base"}, "test": "welch"}]}))
    config = with_sweeps({"t": {"pretrain.simclr.temperature": [0.1]}})
    config["claims"]["files"] = [str(claims)]
    with pytest.raises(ConfigError, match="claim 't': variant 'temperature~0.7' is not in this run's sweeps"):
        validate_config(config, SCHEMA)


def test_a_sweep_of_one_objectives_setting_gives_the_other_objectives_no_runs_of_their_own():
    from ssl_pipeline.core.sweeps import applies_to

    config = with_sweeps({"t": {"pretrain.simclr.temperature": [1.0]}, "e": {"pretrain.epochs": [1]}})
    assert applies_to(config, "temperature~1.0", "simclr") and not applies_to(config, "temperature~1.0", "byol")
    assert applies_to(config, "epochs~1", "byol") and applies_to(config, BASE, "byol")
