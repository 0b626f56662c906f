"""Static stand-in for `--use-conda` (conda cannot run on our CI): every rule has its own pinned env,
and that env provides every third-party module the code the rule runs imports."""
import re

import pytest
import yaml

from ssl_pipeline.core.stage_code import stage_files, stage_of_command, third_party_imports
from tests.conftest import REPO

# Import name -> conda-forge packages that provide it.
CONDA_PACKAGES = {
    "torch": {"pytorch"},
    "torchvision": {"torchvision"},
    "PIL": {"pillow"},
    "numpy": {"numpy"},
    "matplotlib": {"matplotlib", "matplotlib-base"},
    "yaml": {"pyyaml"},
    "jsonschema": {"jsonschema"},
    "scipy": {"scipy"},
    "pandas": {"pandas"},
}
# Conda package -> the name requirements.txt pins it under, to keep the two environments in step.
PIP_NAMES = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
TRAINING_RULES = {"pretrain", "finetune"}
SLOW_RULES = {"pretrain", "finetune", "knn_probe", "linear_probe"}


def parse_rules() -> dict:
    """rule name -> its text, from every .smk file."""
    rules = {}
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = path.read_text()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*(?:rule|checkpoint) (\w+):", text, re.M)]
        for (start, name), (end, _) in zip(starts, starts[1:] + [(len(text), None)]):
            rules[name] = text[start:end]
    return rules


RULES = parse_rules()


def pinned_packages(env_path) -> dict:
    env = yaml.safe_load(env_path.read_text())
    assert env["channels"][0] == "conda-forge", f"{env_path}: conda-forge must be the first channel"
    assert "nodefaults" in env["channels"], f"{env_path}: add 'nodefaults' so defaults never mixes in"
    packages = {}
    for spec in env["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==?([0-9][0-9A-Za-z.]*)", spec)
        assert match, f"{env_path}: '{spec}' is not pinned to an exact version (name=version)"
        packages[match.group(1)] = match.group(2)
    return packages


def test_the_workflow_has_the_expected_rules():
    assert set(RULES) == {"download", "preprocess", "preprocess_plan", "preprocess_shard", "preprocess_index",
                          "label_subset", "pretrain", "finetune", "evaluate", "knn_probe", "linear_probe", "claims",
                          "report"}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_declares_its_own_env_log_threads_and_resources(rule):
    text = RULES[rule]
    env = re.search(r'conda:\s*\n\s*"([^"]+)"', text).group(1)
    assert env == f"../../envs/{rule}.yaml", f"rule {rule} must use its own env file envs/{rule}.yaml"
    for directive in ("log:", "threads:", "resources:", "shell:"):
        assert f"    {directive}" in text, f"rule {rule} lacks {directive}"
    assert "> {log} 2>&1" in text, f"rule {rule} must send its output to its log"
    # pretraining's GPU is in pretrain_resources(): a GPU on one node, a gres per node on several (compute.nodes)
    asks_for_gpu = "gpu=1" in text or "**pretrain_resources()" in text
    assert asks_for_gpu == (rule in TRAINING_RULES), f"only training rules ask for a GPU ({rule})"
    if rule in SLOW_RULES:
        assert "    benchmark:" in text, f"slow rule {rule} lacks benchmark:"


@pytest.mark.parametrize("rule", sorted(RULES))
def test_env_provides_every_third_party_module_the_rule_imports(rule):
    env_path = REPO / "envs" / f"{rule}.yaml"
    packages = pinned_packages(env_path)
    assert "python" in packages, f"{env_path} must pin python"
    for module in third_party_imports(stage_of_command(RULES[rule])):
        assert module in CONDA_PACKAGES, f"no conda package known for module {module}; extend CONDA_PACKAGES"
        assert CONDA_PACKAGES[module] & set(packages), (
            f"rule {rule} imports {module}, but {env_path.name} has none of {sorted(CONDA_PACKAGES[module])}")


def test_import_walk_sees_the_stage_dependencies():
    assert third_party_imports("pretrain") == {"torch", "torchvision", "numpy"}  # torchvision: the ResNets
    assert third_party_imports("download") == set()
    assert third_party_imports("report") == {"matplotlib", "numpy", "pandas", "scipy"}
    names = {path.name for path in stage_files("pretrain")}
    assert {"__main__.py", "__init__.py", "pretrain.py", "geometric.py", "photometric.py", "byol.py", "moco_v2.py", "common.py",
            "cnn.py", "resnet.py"} <= names  # `from ssl_pipeline.backbones import cnn, resnet` names modules
    assert not names & {"finetune.py", "report.py", "download.py"}


def test_env_pins_agree_with_requirements_txt():
    requirements = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements.txt").read_text(), re.M))
    requirements = {name.lower(): version for name, version in requirements.items()}
    for env_path in sorted((REPO / "envs").glob("*.yaml")):
        for package, version in pinned_packages(env_path).items():
            pip_name = PIP_NAMES.get(package, package)
            if pip_name in requirements:
                assert requirements[pip_name] == version, f"{env_path.name} pins {package}={version}, " \
                                                          f"requirements.txt {pip_name}=={requirements[pip_name]}"


def test_no_env_file_is_unused():
    used = {f"{rule}.yaml" for rule in RULES}
    assert {path.name for path in (REPO / "envs").glob("*.yaml")} == used
