"""Render docs/crd-reference.md from crds/piedeployments.pie.io.yaml (the schema is the single source of truth).

``python docs/gen_crd_reference.py`` rewrites the file; tests/unit/project/test_docs.py fails when it is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "piedeployments.pie.io.yaml"
OUT = REPO / "docs" / "crd-reference.md"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    t = node.get("type", "object")
    if t == "array":
        return f"[]{_type(node.get('items', {}))}"
    return t


def _rows(node: dict[str, Any], path: str) -> list[str]:
    rows = []
    required = set(node.get("required", []))
    for name, child in (node.get("properties") or {}).items():
        p = f"{path}.{name}"
        desc = " ".join(str(child.get("description", "")).split()).replace("|", "\\|")
        default = f"`{child['default']}`" if "default" in child and child["default"] != {} else ""
        enum = f" One of: {', '.join(f'`{e}`' for e in child['enum'])}." if "enum" in child else ""
        req = "yes" if name in required else ""
        rows.append(f"| `{p}` | {_type(child)} | {req} | {default} | {desc}{enum} |")
        target = child.get("items", child) if child.get("type") == "array" else child
        rows += _rows(target, p + ("[]" if child.get("type") == "array" else ""))
    return rows


def render() -> str:
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    lines = [
        "# PieDeployment reference",
        "",
        f"`{crd['spec']['group']}/{version['name']}`, kind `{crd['spec']['names']['kind']}`, short name "
        f"`{', '.join(crd['spec']['names'].get('shortNames', []))}`. Generated from `crds/` by "
        "`docs/gen_crd_reference.py`; `kubectl explain piedeployment.spec` prints the same descriptions.",
        "",
    ]
    for section in ("spec", "status"):
        node = schema["properties"][section]
        lines += [f"## {section}", "", " ".join(str(node.get("description", "")).split()), "",
                  "| field | type | required | default | description |", "|---|---|---|---|---|",
                  *_rows(node, section), ""]
    lines += ["## Validation rules (CEL, enforced by the API server)", "",
              "| where | rule | message |", "|---|---|---|"]
    # A literal | would end the table cell, CEL's || included.
    lines += [f"| `{w}` | `{r['rule']}` | {r.get('message', '')} |".replace("||", "\\|\\|")
              for w, r in _walk_rules(schema)]
    return "\n".join(lines) + "\n"


def _walk_rules(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path or ".", r) for r in node.get("x-kubernetes-validations", [])]
    for name, child in (node.get("properties") or {}).items():
        out += _walk_rules(child, f"{path}.{name}")
    if "items" in node:
        out += _walk_rules(node["items"], path + "[]")
    return out


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
