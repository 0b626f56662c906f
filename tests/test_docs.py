"""The documentation a newcomer reads: README.md and docs/*.md, and the site mkdocs builds from docs/.

Links, anchors, `make` targets and experiment files named in the pages exist; pages stay short enough to
read; the configuration reference matches the schema; and `mkdocs build --strict` passes. No Snakemake.
"""
import os
import re
import subprocess
import sys
import unicodedata

import pytest
import yaml

from ssl_pipeline.tools import config_reference
from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README] + sorted(DOCS.glob("**/*.md"))
README_MAX_LINES = 200
PAGE_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`(?:[^`\n]|\n(?![ \t]*\n))+`")  # may wrap over lines, not over a blank one
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# [text](target) and ![alt](target); link text may wrap over lines, targets have no spaces.
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
MAKE_TARGET = re.compile(r"(?<![\w/.$-])make ([a-z][a-z0-9-]*)")
CONFIG_FILE = re.compile(r"config/(?:experiments|claims)/[\w.-]+\.yaml")


def rel(path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def prose(text: str) -> str:
    """The text without code blocks, inline code and HTML comments: what links and headings are read from."""
    return INLINE_CODE.sub("", FENCE.sub("", HTML_COMMENT.sub("", text)))


def code(text: str) -> str:
    """Only the code blocks and inline code, where commands are written."""
    text = HTML_COMMENT.sub("", text)
    return "\n".join([m.group(0) for m in FENCE.finditer(text)] + INLINE_CODE.findall(FENCE.sub("", text)))


def mkdocs_slug(heading: str) -> str:
    """The id mkdocs gives a heading: Python-Markdown's toc extension, which mkdocs.yml does not override."""
    from markdown.extensions.toc import slugify

    return slugify(heading, "-")


def github_slug(heading: str) -> str:
    """The id GitHub gives a heading (github-slugger): lowercase, punctuation and symbols dropped, each space a
    hyphen (runs are not merged, unlike mkdocs)."""
    kept = (ch for ch in heading.lower()
            if ch in " -_" or unicodedata.category(ch)[0] in "LNM" or unicodedata.category(ch) == "Pc")
    return "".join(kept).replace(" ", "-")


def heading_texts(text: str) -> list:
    """Headings as rendered text: inline code, emphasis and links reduced to their words."""
    texts = []
    for heading in HEADING.findall(FENCE.sub("", text)):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        texts.append(re.sub(r"[`*]", "", heading))
    return texts


def anchors(path) -> dict:
    """Each slugger's ids for the page's headings."""
    texts = heading_texts(path.read_text())
    return {"mkdocs": {mkdocs_slug(t) for t in texts}, "GitHub": {github_slug(t) for t in texts}}


def broken_links(path) -> list:
    """Every relative link of a page whose file or #anchor does not exist, as a message."""
    problems = []
    for _, target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{rel(path)}: link {target!r}: {file_part} does not exist")
        elif anchor:
            if linked.suffix != ".md":
                problems.append(f"{rel(path)}: link {target!r}: an anchor into a file that is not markdown")
                continue
            for slugger, ids in anchors(linked).items():
                if anchor not in ids:
                    problems.append(f"{rel(path)}: link {target!r}: no heading of {rel(linked)} has the "
                                    f"{slugger} id {anchor!r}")
    return problems


def makefile_targets() -> set:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", (REPO / "Makefile").read_text(), re.M))


def docs_map(path) -> list:
    """(link target, line) of each page in the '## Documentation' list, targets relative to docs/."""
    section = path.read_text().split("\n## Documentation\n", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^- \[([^\]]+)\]\(([^)]+)\)(.*?)(?=^- |\Z)", section, re.M | re.S)
    return [(target.removeprefix("docs/"), f"[{title}]{' '.join(rest.split())}") for title, target, rest in items]


# --- links, anchors, names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_every_relative_link_and_anchor_exists(path):
    assert broken_links(path) == []


def test_the_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Time to accuracy (same machine, 2026-11-23)\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## Sweeps, pretraining seeds and claims\n\n"
                    "[ok](other.md#time-to-accuracy-same-machine-2026-11-23)\n"
                    "[ok](#sweeps-pretraining-seeds-and-claims)\n"
                    "[gone](missing.md) [bad](other.md#nowhere) `[in code](missing-too.md)` [web](https://x.org/a)\n")
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "missing.md does not exist" in problems[0] and "'nowhere'" in problems[1] + problems[2]


def test_slugs_agree_with_mkdocs_and_github_on_this_projects_headings():
    # Worked by hand from both rules; the last one is where they differ (mkdocs merges the hyphen run).
    heading = "CPU: 2-core AMD EPYC (AVX512-BF16), 2 threads, bf16 autocast, torch 2.14.1, 2026-11-23"
    expected = "cpu-2-core-amd-epyc-avx512-bf16-2-threads-bf16-autocast-torch-2141-2026-11-23"
    assert mkdocs_slug(heading) == github_slug(heading) == expected
    assert mkdocs_slug("Reproducing SimCLR's claims") == github_slug("Reproducing SimCLR's claims") \
        == "reproducing-simclrs-claims"
    assert heading_texts("## GPU: `make gpu-check`\n") == ["GPU: make gpu-check"]
    assert (mkdocs_slug("a — b"), github_slug("a — b")) == ("a-b", "a--b")


@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_every_make_target_named_exists(path):
    missing = set(MAKE_TARGET.findall(code(path.read_text()))) - makefile_targets()
    assert not missing, f"{rel(path)} names make targets the Makefile lacks: {sorted(missing)}"


@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_every_experiment_and_claim_file_named_exists(path):
    missing = {name for name in CONFIG_FILE.findall(path.read_text()) if not (REPO / name).exists()}
    assert not missing, f"{rel(path)} names files that do not exist: {sorted(missing)}"


# --- size and structure ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_pages_are_short_enough_to_read(path):
    limit = README_MAX_LINES if path == README else PAGE_MAX_LINES
    lines = len(path.read_text().splitlines())
    assert lines <= limit, f"{rel(path)} has {lines} lines, more than {limit}: split it into pages"


def test_the_readme_and_the_home_page_map_every_page_alike():
    readme_map, home_map = docs_map(README), docs_map(DOCS / "index.md")
    assert readme_map == home_map, "README.md's '## Documentation' list and docs/index.md's differ"
    pages = {rel(path).removeprefix("docs/") for path in DOCS.glob("**/*.md")} - {"index.md"}
    assert {target for target, _ in readme_map} == pages


def test_the_site_navigation_lists_every_page():
    def leaves(nav):
        for entry in nav:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from leaves(value) if isinstance(value, list) else [value]

    nav = set(leaves(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))
    assert nav == {rel(path).removeprefix("docs/") for path in DOCS.glob("**/*.md")}


# --- the configuration reference -------------------------------------------------------------------------------

def test_the_configuration_reference_is_current():
    assert config_reference.check() is None


def test_the_configuration_reference_check_names_a_stale_page(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(config_reference.render_file().replace("Peak AdamW learning rate", "Learning rate"))
    assert f"{stale} is out of date" in config_reference.check(stale)
    done = subprocess.run([sys.executable, "-m", "ssl_pipeline.tools.config_reference", "--check", "--out", str(stale)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "is out of date" in done.stderr


def test_the_configuration_reference_has_a_row_for_every_key_of_the_default_config():
    def paths(value, prefix):
        if isinstance(value, dict) and value:
            return [p for key, child in value.items() for p in paths(child, f"{prefix}.{key}" if prefix else key)]
        return [prefix]

    page = (DOCS / "configuration.md").read_text()
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    missing = [path for path in paths(default, "") if f"| `{path}` |" not in page]
    assert not missing


def test_the_configuration_reference_flattens_refs_nullable_objects_arrays_and_free_names():
    schema = {
        "$defs": {"file": {"type": "object", "properties": {"name": {"type": "string", "description": "Name."}}}},
        "properties": {"group": {"type": "object", "description": "A group.", "properties": {
            "count": {"type": "integer", "minimum": 1, "default": 3, "description": "How many | which."},
            "file": {"$ref": "#/$defs/file"},
            "extra": {"description": "Or null.", "default": None,
                      "oneOf": [{"type": "null"}, {"type": "object", "properties": {"k": {"enum": ["a", "b"]}}}]},
            "list": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}, "default": [1, 2]},
            "rows": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "boolean"}}}},
            "named": {"type": "object", "additionalProperties": {"type": "string"}, "description": "In `a/<b>`, <b>."},
        }}},
    }
    assert [row[:3] for row in config_reference.rows(schema["properties"]["group"], "group", schema, group=True)] == [
        ("group.count", "integer ≥ 1", "`3`"),
        ("group.file", "object", "—"),
        ("group.file.name", "string", "—"),
        ("group.extra", "null or object", "`null`"),
        ("group.extra.k", "one of `a`, `b`", "—"),
        ("group.list", "array (2 items) of number", "`[1, 2]`"),
        ("group.rows", "array of object", "—"),
        ("group.rows[].x", "boolean", "—"),
        ("group.named", "object", "—"),
        ("group.named.<name>", "string", "—"),
    ]
    page = config_reference.render(schema)
    assert "## group\n\nA group.\n" in page and "| `group.count` | integer ≥ 1 | `3` | How many \\| which. |" in page
    assert "| In `a/<b>`, &lt;b>. |" in page  # else the tag vanishes from the rendered page


# --- the site --------------------------------------------------------------------------------------------------

def test_mkdocs_builds_the_site_strictly_without_warnings(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs): every page in the nav, every link and anchor resolved,
    the README's sections found by the home page's snippets. About 1 s warm, 6 s on a cold disk cache."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's end-of-life banner, not about our docs
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "configuration" / "index.html").exists()
    home = (tmp_path / "site" / "index.html").read_text()
    assert "0.8344 ± 0.0033" in home, "the home page lacks the README's results table"
