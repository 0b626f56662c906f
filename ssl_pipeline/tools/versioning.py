"""DVC versions what the Snakemake DAG produces.

`python -m ssl_pipeline.tools.versioning <command>` (the Makefile wraps each):
    dvc-yaml  write dvc.yaml from the Snakemake DAG: one stage per rule (a `foreach` over its jobs),
              whose cmd runs Snakemake for that job's outputs, so `dvc repro` and `dvc exp run` use
              the same rules and envs; `--check` fails instead when the file on disk differs
    record    `dvc commit` after a Snakemake run, once Snakemake agrees that every output is current
    push      `dvc push`
    pull      fetch, check out, then make Snakemake agree that the pulled outputs are up to date

Why the last step: DVC does not keep timestamps, so after a checkout Snakemake sees outputs older
than their inputs and would retrain everything. Once DVC confirms that the outputs match this
commit's config and code, `snakemake --touch` marks them current, in DAG order.
"""
import argparse
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path

import yaml

from ssl_pipeline.core.settings import has_key, rule_leaf_keys
from ssl_pipeline.core.stage_code import PACKAGE, stage_files, stage_of_command

DVC_YAML = "dvc.yaml"
DEFAULT_CONFIG = "config/config.yaml"
HEADER = """\
# Generated from the Snakemake DAG by `make dvc-yaml` (python -m ssl_pipeline.tools.versioning dvc-yaml).
# Do not edit: tests/test_dvc.py fails when this file differs from what that command writes.
# Each stage runs Snakemake for its job's outputs, so DVC and Snakemake share rules and envs.
"""
# Outputs that are metrics, and rules whose `curve` output is a plot: (x column, y column, title).
METRICS = ["results/metrics.json"]
# Rules whose every job's `metrics` output is a DVC metric too: the kNN and linear probes, one per pretraining run.
METRIC_RULES = ["knn_probe", "linear_probe"]
CURVES = {"pretrain": ("epoch", "loss", "pretraining loss"),
          "finetune": ("step", "val_accuracy", "fine-tuning validation accuracy")}


class VersioningError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------
# The Snakemake DAG
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One job of the Snakemake DAG, as dvc.yaml needs it."""
    rule: str
    wildcards: dict
    inputs: list
    outputs: dict  # name (or position) -> path
    input_patterns: list  # the rule's input patterns; functions are left out
    output_patterns: list
    command: str
    rule_file: str  # the .smk file that defines the rule, relative to the workflow


def snakemake_jobs(workdir: Path, configfiles: list):
    """(config, jobs) for every job the default target needs, whatever exists on disk."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, Quietness, ResourceSettings

    workdir = Path(workdir).resolve()
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[workdir / path for path in configfiles]),
            snakefile=workdir / "Snakefile", workdir=workdir)
        workflow_api.dag(DAGSettings(forceall=True))
        # Snakemake has no public call that returns the job DAG; these two are what its own
        # --d3dag and --filegraph use (snakemake is pinned in requirements.txt).
        workflow = workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        accept_checkpoint_outputs(workflow, workdir, configfiles)
        workflow._build_dag()
        jobs = [Job(rule=job.rule.name, wildcards=dict(job.wildcards),
                    inputs=[str(path) for path in job.input],
                    outputs=named_paths(job.output),
                    input_patterns=[p for p in job.rule.input if not callable(p)],
                    output_patterns=list(job.rule.output), command=job.rule.shellcmd,
                    rule_file=str(Path(job.rule.snakefile).relative_to(workdir)))
                for job in workflow.dag.jobs if job.rule.shellcmd]  # `rule all` runs nothing
        return dict(workflow.config), jobs


def accept_checkpoint_outputs(workflow, workdir: Path, configfiles: list) -> None:
    """Let the DAG grow past its checkpoints from their outputs on disk: the shard jobs of sharded
    preprocessing are known only from the plan its checkpoint writes (forceall would rerun it and leave
    them unknown). So dvc.yaml gets a stage per shard, and DVC versions each shard as its own output."""
    for rule in (rule for rule in workflow.rules if rule.is_checkpoint):
        outputs = [str(path) for path in rule.output]
        missing = [path for path in outputs if not (workdir / path).exists()]
        if missing:
            config = "".join(f" --configfile {path}" for path in configfiles)
            raise VersioningError(f"the jobs after checkpoint {rule.name} come from its outputs, and {missing[0]} is "
                                  f"missing: run `snakemake --cores 1{config} -- {' '.join(outputs)}` first")
        workflow.checkpoints.created_output.update(outputs)


def named_paths(files) -> dict:
    names = {str(path): name for name, path in files.items()}
    return {names.get(str(path), str(index)): str(path) for index, path in enumerate(files)}


def topological_rules(jobs) -> list:
    """Rule names, each after the rules it takes inputs from; ties in name order, so output is stable."""
    producer = {path: job.rule for job in jobs for path in job.outputs.values()}
    graph = {job.rule: set() for job in jobs}
    for job in jobs:
        graph[job.rule] |= {producer[path] for path in job.inputs if path in producer} - {job.rule}
    sorter = TopologicalSorter(graph)
    sorter.prepare()
    ordered = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        ordered += ready
        sorter.done(*ready)
    return ordered


# ---------------------------------------------------------------------------------------------------
# dvc.yaml
# ---------------------------------------------------------------------------------------------------

def as_template(path: str, patterns, wildcards: dict) -> str:
    """The rule pattern that produced `path` for this job, with {name} written as DVC's ${item.name};
    `path` itself when it came from an input function (no pattern)."""
    for pattern in patterns:
        match = pattern.match(path)
        if match and all(wildcards.get(name) == value for name, value in match.groupdict().items()):
            return re.sub(r"\{(\w+)(,[^}]*)?\}", r"${item.\1}", str(pattern))
    return path


def param_sources(keys: list, configfiles: list, workdir: Path) -> list:
    """[{config file: the keys it sets last}]; Snakemake lets later --configfile files override. The
    experiments named by key `experiment` (ssl_pipeline/core/config.py) come between the defaults and the
    config files, as the workflow merges them."""
    given = [DEFAULT_CONFIG] + list(configfiles)
    contents = {name: yaml.safe_load((workdir / name).read_text()) or {} for name in given}
    names = next((contents[name]["experiment"] for name in reversed(given) if "experiment" in contents[name]), None)
    experiments = [f"config/experiments/{name}.yaml" for name in
                   ([] if names is None else [names] if isinstance(names, str) else names)]
    files = [DEFAULT_CONFIG] + experiments + list(configfiles)
    contents.update({name: yaml.safe_load((workdir / name).read_text()) or {} for name in experiments})
    sources = defaultdict(list)
    for key in keys:
        setting = [name for name in files if has_key(contents[name], key)]
        if not setting:
            raise VersioningError(f"config key {key} is set in none of {files}; DVC can only track a key "
                                  "that a config file sets")
        sources[setting[-1]].append(key)
    return [{name: sources[name]} for name in files if sources[name]]


def stage_groups(rule_jobs: list, config: dict) -> dict:
    """Jobs of one rule grouped by identical dep/out templates and config keys. Wildcards alone tell
    most jobs apart; an input function can add a dep to some (finetune's encoder, except from scratch),
    and a pretraining job reads the config section of its own objective only."""
    groups = defaultdict(list)
    for job in rule_jobs:
        deps = tuple(as_template(path, job.input_patterns, job.wildcards) for path in job.inputs)
        outs = tuple(as_template(path, job.output_patterns, job.wildcards) for path in job.outputs.values())
        objective = job.wildcards.get("objective")
        keys = tuple(rule_leaf_keys(config, job.rule, objective))
        groups[(deps, outs, keys, objective)].append(job)
    return groups


def group_names(rule: str, groups: dict) -> dict:
    """rule, or rule_<values> when its jobs form several groups: the wildcard values that are constant
    within a group but differ between groups (finetune_simclr, finetune_scratch). A job of one objective
    is always named after it (pretrain_simclr, knn_probe_simclr), so that adding an objective renames
    no stage and DVC keeps the others' locked state."""
    if all(key[3] for key in groups):
        return {key: f"{rule}_{key[3]}" for key in groups}
    if len(groups) == 1:
        return {key: rule for key in groups}
    names = {}
    for key, jobs in groups.items():
        constant = {name: value for name, value in jobs[0].wildcards.items()
                    if all(job.wildcards[name] == value for job in jobs)}
        distinct = [value for name, value in constant.items()
                    if any(other[0].wildcards[name] != value for other in groups.values())]
        # A pretraining run's path segments (objective/variant/seedN) become one name: DVC forbids "/".
        names[key] = "_".join([rule, *(value.replace("/", "-") for value in distinct)])
    if len(set(names.values())) < len(names):
        raise VersioningError(f"the jobs of rule {rule} need stages of their own, but no wildcard tells them "
                              f"apart: {sorted(names.values())}")
    return names


def snakemake_command(rule: str, outs, configfiles: list) -> str:
    config = "".join(f" --configfile {path}" for path in configfiles)
    return f"snakemake --cores all --allowed-rules {rule}{config} -- {' '.join(outs)}"


def stage_definition(rule, deps, outs, jobs, configfiles, params) -> dict:
    """One stage, or a `foreach` over the wildcards that vary between the jobs; a wildcard with one
    value in the group is written out."""
    varying = [name for name in jobs[0].wildcards if len({job.wildcards[name] for job in jobs}) > 1]
    constant = {name: value for name, value in jobs[0].wildcards.items() if name not in varying}

    def filled(template):
        for name, value in constant.items():
            template = template.replace("${item.%s}" % name, value)
        return template

    code = [jobs[0].rule_file] + [str(path.relative_to(PACKAGE.parent))
                                  for path in stage_files(stage_of_command(jobs[0].command))]
    outs = [filled(out) for out in outs]
    definition = {
        "cmd": snakemake_command(rule, outs, configfiles),
        "deps": [filled(dep) for dep in deps] + code,
        **({"params": params} if params else {}),
        "outs": outs,
    }
    if not varying:
        return definition
    items = {"-".join(job.wildcards[name].replace("/", "-") for name in varying):
             {name: job.wildcards[name] for name in varying}
             for job in sorted(jobs, key=lambda job: [job.wildcards[name] for name in varying])}
    return {"foreach": items, "do": definition}


def build_dvc_yaml(workdir: Path, configfiles: list) -> str:
    workdir = Path(workdir)
    config, jobs = snakemake_jobs(workdir, configfiles)
    by_rule = defaultdict(list)
    for job in jobs:
        by_rule[job.rule].append(job)
    stages, outputs = {}, set()
    for rule in topological_rules(jobs):
        groups = stage_groups(by_rule[rule], config)
        names = group_names(rule, groups)
        for key, group in sorted(groups.items(), key=lambda item: names[item[0]]):
            deps, outs, keys, _ = key
            # A list per stage: a shared one would be written as a YAML anchor and alias.
            params = param_sources(list(keys), configfiles, workdir)
            stage = stage_definition(rule, deps, outs, group, configfiles, params)
            stages[names[key]] = stage
        outputs |= {path for job in by_rule[rule] for path in job.outputs.values()}
    missing = [path for path in METRICS if path not in outputs]
    if missing:
        raise VersioningError(f"metrics {missing} are not outputs of any rule; update METRICS in {__file__}")
    plots = [{title: {"x": x, "y": {job.outputs["curve"]: y for job in sorted(by_rule[rule], key=lambda job: job.outputs["curve"])}}}
             for rule, (x, y, title) in CURVES.items()]
    metrics = METRICS + sorted(job.outputs["metrics"] for rule in METRIC_RULES for job in by_rule[rule])
    document = {"vars": [{"configfiles": list(configfiles)}], "stages": stages, "metrics": metrics,
                "plots": plots}
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=1000)


def configfiles_of(workdir: Path) -> list:
    """The experiment files dvc.yaml was generated for (its `vars`)."""
    path = Path(workdir) / DVC_YAML
    if not path.is_file():
        raise VersioningError(f"{path} is missing: write it with `make dvc-yaml`")
    return yaml.safe_load(path.read_text())["vars"][0]["configfiles"]


def write_dvc_yaml(workdir: Path, configfiles: list) -> None:
    (Path(workdir) / DVC_YAML).write_text(build_dvc_yaml(workdir, configfiles))


def check_dvc_yaml(workdir: Path, configfiles: list) -> None:
    """Raise VersioningError with a diff when dvc.yaml on disk is not what the DAG gives."""
    import difflib

    path = Path(workdir) / DVC_YAML
    expected = build_dvc_yaml(workdir, configfiles)
    actual = path.read_text() if path.is_file() else ""
    if actual != expected:
        diff = "".join(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                            f"{DVC_YAML} (on disk)", f"{DVC_YAML} (from the Snakemake DAG)"))
        raise VersioningError(f"{path} has drifted from the Snakemake DAG; run `make dvc-yaml`.\n{diff}")


# ---------------------------------------------------------------------------------------------------
# record, push, pull
# ---------------------------------------------------------------------------------------------------

def run_tool(args: list, workdir: Path, failure: str) -> subprocess.CompletedProcess:
    """Run `python -m <tool> ...` of this environment; raise VersioningError(failure + its output)."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise VersioningError(f"{failure}\n`{' '.join(args)}` said:\n{output}")
    return result


def snakemake_config_args(workdir: Path) -> list:
    return [arg for path in configfiles_of(workdir) for arg in ("--configfile", path)]


def locked_outputs(workdir: Path) -> list:
    """Every output path dvc.lock records, in stage order."""
    if not (Path(workdir) / "dvc.lock").is_file():
        raise VersioningError(f"{Path(workdir) / 'dvc.lock'} is missing: nothing was recorded (`make record`) "
                              "in this commit")
    return [path for path, _ in locked_objects(workdir)]


def locked_objects(workdir: Path) -> list:
    """(path, md5) of every output dvc.lock records."""
    stages = yaml.safe_load((Path(workdir) / "dvc.lock").read_text())["stages"]
    return [(out["path"], out["md5"]) for stage in stages.values() for out in stage.get("outs", [])]


def describe_remote(repo, remote=None) -> str:
    name = remote or repo.config["core"].get("remote")
    return f"'{name}' ({repo.config['remote'].get(name, {}).get('url', '?')})"


def record(workdir: Path) -> None:
    """dvc commit, once dvc.yaml matches the DAG and Snakemake has nothing left to run."""
    check_dvc_yaml(workdir, configfiles_of(workdir))
    dry_run = run_tool(["snakemake", "--dry-run", "--cores", "1", *snakemake_config_args(workdir)], workdir,
                       "Snakemake cannot plan the workflow, so there is nothing consistent to record.")
    plan = dry_run.stdout + dry_run.stderr
    if "Nothing to be done" not in plan:
        experiment = " ".join(snakemake_config_args(workdir)) or "the default config"
        raise VersioningError(f"Snakemake would still run jobs of dvc.yaml's experiment ({experiment}), so the "
                              "outputs are not current: run the pipeline first, or `make dvc-yaml EXPERIMENT=...` "
                              "for the experiment you ran, then record.\n" + plan[-2000:])
    run_tool(["dvc", "commit", "--force", "--quiet"], workdir, "dvc commit failed.")
    # dvc commit rewrites outputs from its cache (new mtimes, in no particular order).
    mark_current_in_snakemake(workdir)
    print("recorded every output in dvc.lock; commit it: git add dvc.lock && git commit")


def push(workdir: Path, remote=None) -> None:
    remote_args = ["--remote", remote] if remote else []
    print(run_tool(["dvc", "push", *remote_args], workdir, "dvc push failed.").stdout.strip())


def pull(workdir: Path, remote=None) -> None:
    """Fetch into DVC's cache first: if the remote is unreachable or lacks data, stop before the
    workspace is touched. Then check out, and tell Snakemake the outputs are current, but only once
    DVC confirms that they are what this commit's config and code produce. DVC runs in this process:
    three `dvc` commands would spend most of the time starting up."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    outputs = locked_outputs(workdir)
    failure = "could not fetch the outputs recorded in dvc.lock from the DVC remote; the workspace was left as it was."
    with Repo(str(workdir)) as repo:
        try:
            repo.fetch(remote=remote)
        except DvcException as error:
            raise VersioningError(f"{failure}\n{error}") from error
        # fetch only warns when the remote lacks files or cannot be reached at all.
        missing = [path for path, oid in locked_objects(workdir) if not repo.cache.repo.exists(oid)]
        if missing:
            raise VersioningError(f"{failure}\n{len(missing)} of {len(outputs)} outputs are neither in the local "
                                  f"cache nor on remote {describe_remote(repo, remote)}, e.g. {missing[:3]}.")
        try:
            repo.checkout()
        except DvcException as error:
            raise VersioningError(f"dvc checkout failed after a successful fetch:\n{error}") from error
        changed = repo.status()
    if changed:
        raise VersioningError(
            f"pulled {len(outputs)} outputs, but the workspace's config or code differs from what "
            f"dvc.lock recorded for stages {sorted(changed)}, so Snakemake was not told they are current "
            "and will rerun what changed. `dvc status` shows the differences.")
    mark_current_in_snakemake(workdir)
    print(f"pulled {len(outputs)} outputs; Snakemake sees them as up to date")


def mark_current_in_snakemake(workdir: Path) -> None:
    """DVC does not keep timestamps, so outputs it writes look stale to Snakemake. `snakemake --touch`
    touches them in DAG order and records the current params and code as their provenance; with
    --forceall for every job, also those whose outputs DVC happened to write in an order that already
    looked current (without their provenance, a later change of their params would go unnoticed)."""
    touch = run_tool(["snakemake", "--touch", "--forceall", "--cores", "1", *snakemake_config_args(workdir)], workdir,
                     "Snakemake could not mark the outputs as up to date.")
    said = touch.stdout + touch.stderr
    if "not touched because they don't exist" in said:  # --touch only warns about these
        raise VersioningError("Snakemake's DAG has outputs that DVC did not restore (is dvc.yaml from another "
                              "experiment than the config?); they were not marked up to date.\n" + said[-2000:])


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_pipeline.tools.versioning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("dvc-yaml", help="write dvc.yaml from the Snakemake DAG")
    generate.add_argument("--configfile", action="append", default=[],
                          help="experiment file(s) on top of config/config.yaml, as for snakemake")
    generate.add_argument("--check", action="store_true", help="fail if dvc.yaml differs, write nothing")
    commands.add_parser("record", help="dvc commit after a Snakemake run")
    for name, text in (("push", "dvc push"), ("pull", "dvc pull, then make Snakemake agree")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--remote", help="a DVC remote other than the default")
    args = parser.parse_args(argv)
    workdir = Path.cwd()
    try:
        if args.command == "dvc-yaml":
            (check_dvc_yaml if args.check else write_dvc_yaml)(workdir, args.configfile)
        elif args.command == "record":
            record(workdir)
        else:
            {"push": push, "pull": pull}[args.command](workdir, args.remote)
    except VersioningError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
