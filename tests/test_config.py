"""The config documents itself: every key is validated, described, defaulted and commented."""
import copy
import shutil
import re

import pytest
import yaml

from ssl_pipeline.core.config import ConfigError, complete_config, merged, validate_config
from ssl_pipeline.objectives import OBJECTIVES
from ssl_pipeline.core.settings import OBJECTIVE_SECTIONS, RULE_CONFIG_KEYS, leaf_keys, rule_leaf_keys, rule_settings
from tests.conftest import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIG_TEXT = (REPO / "config" / "config.yaml").read_text()
DEFAULT = yaml.safe_load(CONFIG_TEXT)


def schema_leaves(schema, prefix=()):
    """(key path, schema) of every leaf property, following $refs into $defs."""
    definitions = yaml.safe_load(SCHEMA.read_text())["$defs"]
    for key, child in schema.get("properties", {}).items():
        if "$ref" in child:
            child = definitions[child["$ref"].rsplit("/", 1)[1]]
        if child.get("type") == "object" and "properties" in child:
            yield from schema_leaves(child, prefix + (key,))
        else:
            yield prefix + (key,), child


def lookup(config, path):
    for key in path:
        config = config[key]
    return config


def test_default_config_is_valid():
    validate_config(DEFAULT, SCHEMA)


@pytest.mark.parametrize("experiment", sorted((REPO / "config" / "experiments").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_every_experiment_is_valid_on_top_of_the_default(experiment):
    validate_config(merged(DEFAULT, yaml.safe_load(experiment.read_text())), SCHEMA)


# Keys that describe one dataset have no sensible default.
DATASET_SPECIFIC = ("dataset", "report")


def test_every_key_is_described_and_its_default_matches_config_yaml():
    leaves = list(schema_leaves(yaml.safe_load(SCHEMA.read_text())))
    assert len(leaves) > 40
    for path, schema in leaves:
        name = ".".join(path)
        if path[:2] == ("dataset", "files"):
            continue  # the shared idx_file definition: name and sha256 differ per file
        assert schema.get("description"), f"schema key {name} has no description"
        if path[0] not in DATASET_SPECIFIC:
            assert "default" in schema, f"schema key {name} has no default"
            assert lookup(DEFAULT, path) == schema["default"], f"default of {name} differs from config.yaml"


def test_every_key_of_config_yaml_is_commented():
    lines = CONFIG_TEXT.splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([a-z_]+):", line)
        if not match or line.lstrip().startswith("- "):
            continue
        previous = lines[number - 1].strip() if number else ""
        commented = "#" in line or previous.startswith("#")
        # Keys inside a commented mapping block (the four IDX files) share their parent's comment.
        inside_files = re.match(r"^\s{4,}(name|sha256|size|train_\w+|test_\w+):", line)
        assert commented or inside_files, f"config/config.yaml line {number + 1} has no comment: {line!r}"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["pretrain"].update(epochs="ten"), "config key pretrain.epochs: 'ten' is not of type 'integer'"),
        (lambda c: c["finetune"].update(label_fractions=[0.5, 1.5]), "config key finetune.label_fractions.1: 1.5"),
        (lambda c: c["compute"].update(device="tpu"), "config key compute.device: 'tpu' does not match"),
        (lambda c: c["finetune"].update(mode="frozen"), "config key finetune.mode: 'frozen' is not one of"),
        (lambda c: c["model"].update(width=[8]), "unknown key model.width; expected one of: architecture, convs_per_stage"),
        (lambda c: c["data"].pop("split_seed"), "missing key data.split_seed"),
        (lambda c: c["dataset"]["files"]["train_images"].update(sha256="abc"),
         "config key dataset.files.train_images.sha256: 'abc' does not match"),
        (lambda c: c["compute"].update(device="cpu", require_gpu=True),
         "config key compute.require_gpu: true contradicts compute.device: cpu"),
        (lambda c: c["pretrain"]["augment"].update(crop_scale=[0.9, 0.2]),
         "config key pretrain.augment.crop_scale: lower bound 0.9 exceeds upper bound 0.2"),
    ],
)
def test_errors_name_the_key_and_what_was_expected(change, message):
    config = copy.deepcopy(DEFAULT)
    change(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert message in str(error.value)


# ---- which rule reads which key (ssl_pipeline/core/settings.py) --------------------------------------------

def test_every_config_key_is_read_by_some_rule_or_is_a_run_list():
    read = {key for rule in RULE_CONFIG_KEYS for objective in (None, *OBJECTIVE_SECTIONS)
            for key in rule_leaf_keys(DEFAULT, rule, objective)}
    every_leaf = {key for section in DEFAULT for key in leaf_keys(DEFAULT, section)}
    assert every_leaf - read == set()
    assert read <= every_leaf


def test_a_pretraining_job_reads_its_own_objectives_section_only():
    settings = rule_settings(DEFAULT, "pretrain", "byol")["pretrain"]
    assert settings["objective"] == "byol" and settings["byol"] == DEFAULT["pretrain"]["byol"]
    assert not set(settings) & (set(OBJECTIVE_SECTIONS) - {"byol"})
    assert "objectives" not in settings and settings["augment"] == DEFAULT["pretrain"]["augment"]
    assert set(OBJECTIVE_SECTIONS) == set(OBJECTIVES)  # settings.py knows every objective's section


def test_rule_settings_hold_the_keys_the_rule_reads_and_no_run_list():
    settings = rule_settings(DEFAULT, "finetune")
    assert set(settings) == {"finetune", "model", "compute"}
    assert settings["model"] == DEFAULT["model"]
    assert "label_fractions" not in settings["finetune"] and "seeds" not in settings["finetune"]
    assert settings["finetune"]["augment"] == DEFAULT["finetune"]["augment"]
    assert "threads" not in settings["compute"] and settings["compute"]["device"] == "auto"
    assert rule_settings(DEFAULT, "download")["dataset"] == {
        "format": "idx", "files": DEFAULT["dataset"]["files"], "archive": None,
        "imagenet": {"val_archive": None, "val_labels": None, "synsets": None},
        "mirrors": DEFAULT["dataset"]["mirrors"], "unlabeled": None}


def test_experiment_smoke_gives_the_config_of_the_smoke_file():
    """The two ways to select an experiment build the same config (ssl_pipeline.core.config.complete_config)."""
    defaults = REPO / "config" / "config.yaml"
    smoke = yaml.safe_load((REPO / "config" / "experiments" / "smoke.yaml").read_text())
    by_file = complete_config(smoke, defaults)
    by_key = complete_config({"experiment": "smoke"}, defaults)
    assert by_key == {**by_file, "experiment": "smoke"}
    assert by_file == merged(yaml.safe_load(defaults.read_text()), smoke)
    # Keys given beside it win over the experiment's.
    assert complete_config({"experiment": ["smoke"], "pretrain": {"epochs": 7}}, defaults)["pretrain"]["epochs"] == 7
    assert by_file != complete_config({}, defaults)
    with pytest.raises(ConfigError, match=r"config key experiment: 'smoke/../smoke' is not an experiment of"):
        complete_config({"experiment": "smoke/../smoke"}, defaults)


def test_an_experiment_named_in_the_defaults_file_applies_too(tmp_path):
    """`experiment: smoke` written into config/config.yaml itself (not only in the keys given) selects it."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    defaults = tmp_path / "config" / "config.yaml"
    defaults.write_text(defaults.read_text().replace("\nexperiment: null\n", "\nexperiment: smoke\n"))
    smoke = yaml.safe_load((REPO / "config" / "experiments" / "smoke.yaml").read_text())
    assert complete_config({}, defaults)["pretrain"]["epochs"] == smoke["pretrain"]["epochs"] == 1
    assert complete_config({"experiment": None}, defaults)["pretrain"]["epochs"] == 5
