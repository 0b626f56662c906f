"""The code a pipeline stage runs, found by walking imports from its command-line entry.

`python -m ssl_pipeline <stage>` imports only that stage's modules (see __main__.py), so the walk
gives, per stage, the package files it executes (dvc.yaml lists them as the stage's deps) and the
third-party modules it needs (tests/test_envs.py checks that the rule's conda env provides them).
"""
import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # ssl_pipeline/
ENTRY = "ssl_pipeline.__main__"


def stage_of_command(shell_command: str) -> str:
    """'python -m ssl_pipeline knn-probe --data-dir ...' -> 'knn-probe'."""
    match = re.search(r"python -m ssl_pipeline ([\w-]+)", shell_command)
    if not match:
        raise ValueError(f"not a call into the package: {shell_command!r}")
    return match.group(1)


def module_path(module: str) -> Path:
    """'ssl_pipeline.stages.pretrain' -> pretrain.py; a subpackage ('ssl_pipeline.objectives') -> its __init__.py."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def is_package_module(name: str) -> bool:
    return name.split(".")[0] == "ssl_pipeline" and module_path(name).is_file()


def imports_in(tree: ast.AST) -> set:
    """Absolute names of every module `tree` imports, at any depth."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            # `from package import name` imports the submodule package.name when there is one.
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if is_package_module(f"{node.module}.{alias.name}"))
    return names


def entry_imports(stage: str) -> set:
    """What __main__ imports for `stage`: its top-level imports (they run for every stage) and those
    inside the stage's handler `run_<stage>`."""
    tree = ast.parse(module_path(ENTRY).read_text())
    top_level = set().union(*(imports_in(node) for node in tree.body
                              if isinstance(node, (ast.Import, ast.ImportFrom))))
    handler_name = f"run_{stage.replace('-', '_')}"
    handlers = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == handler_name]
    if not handlers:
        raise ValueError(f"{module_path(ENTRY)} has no handler {handler_name} for stage {stage!r}")
    return top_level | imports_in(handlers[0])


def walk_stage(stage: str):
    """(package modules, third-party top-level modules) the stage imports, transitively."""
    package_modules, third_party = {ENTRY}, set()
    pending = set(entry_imports(stage)) | {"ssl_pipeline"}
    while pending:
        name = pending.pop()
        top = name.split(".")[0]
        if top != "ssl_pipeline":
            if top not in sys.stdlib_module_names:
                third_party.add(top)
            continue
        if name in package_modules:
            continue
        package_modules.add(name)
        pending |= imports_in(ast.parse(module_path(name).read_text()))
        # Importing a.b.c runs the __init__ of a.b first.
        pending.add(name.rpartition(".")[0] or name)
    return package_modules, third_party


def stage_files(stage: str) -> list:
    """The package's source files that `stage` runs, sorted."""
    return sorted(module_path(module) for module in walk_stage(stage)[0])


def third_party_imports(stage: str) -> set:
    return walk_stage(stage)[1]
