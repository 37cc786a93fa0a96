"""The README's table of Helm values, generated from values.yaml's `# --` comments and the schema.

`python -m devtools.values_doc` prints the table; `--readme README.md` rewrites it in place
(`make chart-docs`). A test fails when the README's copy drifts from values.yaml.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from devtools.helm import CHART

BEGIN = "<!-- BEGIN GENERATED HELM VALUES (make chart-docs) -->"
END = "<!-- END GENERATED HELM VALUES -->"
DOC_PREFIX = "# -- "
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][A-Za-z0-9]*):")
# Helm passes `global` to every chart; it is not one of ours.
IGNORED = {"global"}


def descriptions(text: str) -> dict[str, str]:
    """Dotted key path -> the `# --` comment just above the key in a values file."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(DOC_PREFIX):
            pending = stripped.removeprefix(DOC_PREFIX)
            continue
        match = KEY_LINE.match(line)
        if not match:
            pending = "" if not stripped.startswith("#") else pending
            continue
        indent = len(match["indent"])
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, match["key"])]
        if pending:
            found[".".join(k for _, k in stack)] = pending
        pending = ""
    return found


def is_group(schema: dict[str, Any], value: Any) -> bool:
    """True for the chart's own groups of keys, which values.yaml spells out in full.

    Kubernetes-typed values (resources, affinity, ...) are single entries even when the schema
    names some of their fields.
    """
    declared = set(schema.get("properties", {}))
    return bool(declared) and isinstance(value, dict) and declared <= set(value)


def entries(
    schema: dict[str, Any], values: dict[str, Any], prefix: str = ""
) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every documented key (groups before their keys) with its schema and default."""
    for key, sub in schema.get("properties", {}).items():
        if not prefix and key in IGNORED:
            continue
        path, value = f"{prefix}{key}", values[key]
        yield path, sub, value
        if is_group(sub, value):
            yield from entries(sub, value, f"{path}.")


def type_of(schema: dict[str, Any]) -> str:
    """A short type name for the table."""
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "anyOf" in schema:
        return " or ".join(type_of(s) for s in schema["anyOf"])
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return f"list of {type_of(schema.get('items', {}))}"
    return kind


def default_cell(value: Any) -> str:
    """A default as inline code; JSON keeps types visible (`""`, `{}`, `8000`)."""
    text = json.dumps(value, separators=(", ", ": "))
    return f"`{text}`".replace("|", "\\|")


def load() -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The chart's values, schema and key descriptions."""
    text = (CHART / "values.yaml").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    return yaml.safe_load(text), schema, descriptions(text)


def table() -> str:
    """The Markdown table: one row per leaf key (objects with declared keys are expanded)."""
    values, schema, docs = load()
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for path, sub, value in entries(schema, values):
        if is_group(sub, value):
            continue
        description = docs.get(path, "").replace("|", "\\|")
        rows.append(f"| `{path}` | {type_of(sub)} | {default_cell(value)} | {description} |")
    return "\n".join(rows)


def splice(readme: str) -> str:
    """The README with the text between the markers replaced by the current table."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return f"{readme[:start]}\n{table()}\n{readme[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table, or rewrite it in a README."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", type=Path, help="README whose generated values table to rewrite")
    args = parser.parse_args(argv)
    if args.readme:
        args.readme.write_text(splice(args.readme.read_text()))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
