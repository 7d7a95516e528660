"""Rich markup is never printed literally.

A ``console.print("[red]error:[/] ...", markup=False)`` shows the tags themselves to the user
(a failed run printed ``[red]error:[/] pipeline failed: ...``). Where a message holds user
text, the fix is ``escape()`` on that text with markup left on. This reads every print call
of the shipped packages with ``ast`` and refuses markup tags next to ``markup=False``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "infra", "event_bridge", "mpi_jobs")
TAG = re.compile(r"\[/?(?:red|green|yellow|blue|cyan|magenta|bold|dim|italic)?\]|\[/\]")


def _literal_text(node: ast.AST) -> str:
    """The constant parts of a string or f-string argument."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal_text(v) for v in node.values)
    return ""


def _offenders(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "print"):
            continue
        plain = any(k.arg == "markup" and isinstance(k.value, ast.Constant)
                    and k.value.value is False for k in node.keywords)
        if plain and any(TAG.search(_literal_text(a)) for a in node.args):
            found.append(f"{name}:{node.lineno}")
    return found


def test_the_check_finds_literal_markup():
    bad = 'err.print(f"[red]error:[/] pipeline failed: {e}", markup=False)\n'
    good = 'err.print(f"[red]error:[/] pipeline failed: {escape(str(e))}")\n'
    assert _offenders(bad, "x.py") == ["x.py:1"]
    assert _offenders(good, "x.py") == []
    assert _offenders('out.print(f"{a} [b]", markup=False)\n', "x.py") == []


def test_no_print_shows_markup_tags_literally():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found += _offenders(path.read_text(), str(path.relative_to(REPO)))
    assert found == [], f"markup tags printed with markup=False: {found}"
