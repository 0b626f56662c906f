"""The configuration reference, docs/configuration.md, rendered from the config schema so it cannot drift.

`python -m ssl_pipeline.tools.config_reference` writes the page; `--check` writes nothing and exits 1, naming
the file, when the page on disk differs from what the schema gives (tests/test_docs.py runs the check).

One table per top-level group of workflow/schemas/config.schema.yaml, one row per key: its path with
nested objects flattened (`pretrain.simclr.temperature`), its type and bounds, its default and its
description. `$ref`s are resolved; a key that may be null or an object (`dataset.unlabeled`) gets a row
of its own and one per key of the object; items of an array of objects are `key[].sub`, keys of a map
with free names `key.<name>`.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = Path("workflow/schemas/config.schema.yaml")
OUT = Path("docs/configuration.md")
COMMAND = "python -m ssl_pipeline.tools.config_reference"


def _resolve(node: dict, schema: dict) -> dict:
    """The node with a `$ref` into `$defs` replaced by its target (its own keys win)."""
    if "$ref" not in node:
        return node
    name = node["$ref"].removeprefix("#/$defs/")
    return {**schema["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}


def _alternatives(node: dict, schema: dict) -> list:
    """The typed alternatives of a oneOf/anyOf; a node with a type of its own uses them as constraints only."""
    if "type" in node or "enum" in node or "const" in node:
        return []
    return [_resolve(alt, schema) for alt in node.get("oneOf", node.get("anyOf", []))]


def _code(value) -> str:
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _bounds(node: dict) -> str:
    signs = {"exclusiveMinimum": ">", "minimum": "≥", "exclusiveMaximum": "<", "maximum": "≤"}
    return ", ".join(f"{sign} {node[key]}" for key, sign in signs.items() if key in node)


def _array(node: dict, schema: dict) -> str:
    least, most = node.get("minItems"), node.get("maxItems")
    size = [f"{least} items"] if least is not None and least == most else []
    size += [f"≥ {least} item{'s' if least > 1 else ''}"] if least and least != most else []
    size += [f"≤ {most} items"] if most is not None and most != least else []
    size += ["unique"] if node.get("uniqueItems") else []
    text = "array" + (f" ({', '.join(size)})" if size else "")
    return text + (f" of {type_of(node['items'], schema)}" if "items" in node else "")


def type_of(node: dict, schema: dict) -> str:
    """A short type for a table cell: `integer ≥ 1`, `one of idx, image_folder`, `array (2 items) of number`."""
    node = _resolve(node, schema)
    if "const" in node:
        return _code(node["const"])
    if "enum" in node:
        return "one of " + ", ".join(_code(value) for value in node["enum"])
    alternatives = _alternatives(node, schema)
    kinds = [type_of(alt, schema) for alt in alternatives]
    if not alternatives:
        types = node.get("type", "any")
        for kind in types if isinstance(types, list) else [types]:
            if kind == "array":
                kinds.append(_array(node, schema))
            elif kind in ("number", "integer") and _bounds(node):
                kinds.append(f"{kind} {_bounds(node)}")
            else:
                kinds.append(kind)
    # null first, so that "null or array of string" cannot read as an array of "string or null".
    return " or ".join(sorted(kinds, key=lambda kind: kind != "null"))


def rows(node: dict, path: str, schema: dict, group: bool = False):
    """(path, type, default, description) for the node and every key under it, depth first.

    A group (a top-level key) has a row of its own only when it has no keys to list (its description
    heads its table)."""
    node = _resolve(node, schema)
    objects = [node] + [alt for alt in _alternatives(node, schema) if "properties" in alt]
    if not group or not any("properties" in obj for obj in objects):
        default = _code(node["default"]) if "default" in node else "—"
        yield path, type_of(node, schema), default, "" if group else node.get("description", "")
    for obj in objects:
        for key, child in obj.get("properties", {}).items():
            yield from rows(child, f"{path}.{key}", schema)
        free = obj.get("additionalProperties")
        if isinstance(free, dict):
            yield from rows(free, f"{path}.{'<key>' if '<name>' in path else '<name>'}", schema)
    items = _resolve(node.get("items", {}), schema)
    for key, child in items.get("properties", {}).items():
        yield from rows(child, f"{path}[].{key}", schema)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _prose(text: str) -> str:
    """A description as a table cell; `<name>` outside code would be read as an HTML tag and vanish."""
    parts = _cell(text).split("`")  # odd parts are code, where `<` stays as it is
    return "`".join(re.sub(r"<(?=[A-Za-z/])", "&lt;", part) if i % 2 == 0 else part for i, part in enumerate(parts))


def render(schema: dict) -> str:
    """The markdown page for a schema (a dict as loaded from its YAML)."""
    lines = [
        f"<!-- Generated from {SCHEMA} by `{COMMAND}`; do not edit (tests/test_docs.py checks it). -->",
        "# Configuration reference",
        "",
        _prose(schema.get("description", "")),
        "",
        "Every key of the config, one table per top-level group, generated from the schema the workflow validates",
        f"the config against (`{SCHEMA}`). `config/config.yaml` sets every key, with a comment; keys without a",
        "default (—) are set there. Experiments override some of them (`config/experiments/*.yaml`).",
        "",
    ]
    for group, node in schema["properties"].items():
        node = _resolve(node, schema)
        lines += [f"## {group}", ""]
        if node.get("description"):
            lines += [_prose(node["description"]), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for path, kind, default, description in rows(node, group, schema, group=True):
            lines.append(f"| `{path}` | {_cell(kind)} | {_cell(default)} | {_prose(description)} |")
        lines.append("")
    return "\n".join(lines)


def render_file(schema_path: Path = REPO / SCHEMA) -> str:
    return render(yaml.safe_load(schema_path.read_text()))


def _shown(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def check(out: Path = REPO / OUT, schema_path: Path = REPO / SCHEMA) -> str | None:
    """None if `out` is what the schema renders to, else the message saying what to run."""
    if out.exists() and out.read_text() == render_file(schema_path):
        return None
    state = "is out of date" if out.exists() else "is missing"
    return f"{_shown(out)} {state} with {_shown(schema_path)}: run `{COMMAND}` and commit the page"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs; write nothing")
    parser.add_argument("--out", type=Path, default=REPO / OUT, help=f"the page (default {OUT})")
    parser.add_argument("--schema", type=Path, default=REPO / SCHEMA, help=f"the schema (default {SCHEMA})")
    args = parser.parse_args(argv)
    if args.check:
        problem = check(args.out, args.schema)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_file(args.schema))
    print(f"wrote {_shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
