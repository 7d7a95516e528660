"""Spec and config values that end up in generated shell scripts: refused or quoted, never code.

clusterflow writes bash for others to run: Slurm batch scripts (which also record the
``sbatch`` line in a comment), scripts sent to a head node through SSM, EC2 user data, the idle
check. A value taken from a spec or config reaches those scripts in one of two ways, and each
has one rule here:

- **as an argument**: ``safe_arg`` / ``render_command`` quote it with ``shlex``, so ``;``,
  ``$(...)``, backticks and quotes stay literal text. ``render_command`` also keeps the result
  on one line (a control character is written as bash's ``$'\\n'`` escape), because a quoted
  newline is still a line break to everything that reads scripts line by line: a ``#`` comment
  ends there, ``#SBATCH`` directives start there, a heredoc's terminator matches there.
- **as a field of a spec or config**: ``NoControlChars`` (a pydantic base) refuses control
  characters (newline, carriage return, tab, NUL, escape, DEL, the C1 range and Unicode's line
  separators) in every string field, so such a value is a spec error naming its field (exit 2,
  nothing created). No field has a legitimate use for them.

Both layers apply: generators quote even what validation passed, and the providers check their
constructor arguments again, so code that builds a provider without a spec is covered too.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationInfo, field_validator

# C0 controls (incl. \t \n \r), DEL, C1 controls (incl. NEL), and Unicode line/paragraph
# separators, which some tools treat as line breaks.
_CONTROL = frozenset([*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), "\u2028", "\u2029"])
_NAMES = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\x00": "a NUL byte",
          "\x1b": "an escape character"}
_BASH_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\E", "\\": "\\\\", "'": "\\'"}


# A path that can go anywhere in a script or a #SBATCH directive unquoted: no spaces (sbatch
# splits directives on them), no '%' (sbatch's file-name patterns), no shell syntax.
PLAIN_PATH = r"^/[A-Za-z0-9._+@/-]*$"


class UnsafeValue(ValueError):
    """A value cannot be put into a generated script; the message names it and the character."""


def control_char(text: str) -> tuple[int, str] | None:
    """The first control character in ``text`` and its index, or None."""
    for i, ch in enumerate(text):
        if ch in _CONTROL:
            return i, ch
    return None


def describe_char(ch: str) -> str:
    return _NAMES.get(ch, f"the control character U+{ord(ch):04X}")


def _preview(text: str, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def reject_control_chars(value: str, what: str = "value") -> str:
    """``value`` unchanged, or ``UnsafeValue`` naming ``what`` and the offending character."""
    found = control_char(value)
    if found is not None:
        i, ch = found
        raise UnsafeValue(f"{what} {_preview(value)} contains {describe_char(ch)} at position "
                          f"{i}: values that reach a generated shell script must be one line "
                          "without control characters")
    return value


def safe_arg(value: str | PurePath, what: str = "value") -> str:
    """One shell word for ``value``: control characters refused, the rest ``shlex``-quoted."""
    return shlex.quote(reject_control_chars(str(value), what))


def _bash_word(arg: str) -> str:
    if control_char(arg) is None:
        return shlex.quote(arg)
    # ANSI-C quoting: the same string to bash, on one line. Other control characters go as
    # their UTF-8 bytes (\xHH), which does not depend on the script's locale.
    body = "".join(
        _BASH_ESCAPES.get(ch) or "".join(f"\\x{b:02x}" for b in ch.encode())
        if ch in _CONTROL or ch in "\\'" else ch for ch in arg)
    return f"$'{body}'"


def render_command(argv: Iterable[str | PurePath]) -> str:
    """A bash command line that runs exactly ``argv``, always on one line.

    Every word is ``shlex``-quoted, so shell syntax in an argument (``;``, ``|``, ``$(...)``,
    backticks, quotes, globs) is literal. An argument with a newline or another control
    character is written with bash's ``$'...'`` quoting, which bash reads as the same string,
    so the line can also sit in a ``#`` comment or next to a heredoc without breaking out.
    A NUL byte is refused: no argv can carry it. Needs bash (every script clusterflow writes
    starts with ``#!/bin/bash``).
    """
    words = [str(a) for a in argv]
    if not words:
        raise UnsafeValue("an empty command cannot be rendered")
    for w in words:
        if "\x00" in w:
            raise UnsafeValue(f"argument {_preview(w)} contains a NUL byte, which no command "
                              "line can carry")
    return " ".join(_bash_word(w) for w in words)


def export_line(name: str, value: str) -> str:
    """``export NAME=value`` for a script: the name must be a shell identifier."""
    if not name or not (name[0].isalpha() or name[0] == "_") or not all(
            c.isascii() and (c.isalnum() or c == "_") for c in name):
        raise UnsafeValue(f"environment variable name {_preview(name)} is not a shell "
                          "identifier (letters, digits and '_', not starting with a digit)")
    return f"export {name}={render_command([value])}"


def heredoc(path: str, content: str, delimiter: str = "CLUSTERFLOW_EOF") -> list[str]:
    """Lines that write ``content`` to ``path`` verbatim through a quoted heredoc.

    The delimiter is extended until no line of ``content`` equals it, so the content cannot
    end the heredoc early and run the rest as commands.
    """
    lines = set(content.splitlines())
    base, n = delimiter, 0
    while delimiter in lines:
        n += 1
        delimiter = f"{base}_{n}"
    return [f"cat > {safe_arg(path, 'path')} <<'{delimiter}'", content.rstrip("\n"), delimiter]


def check_values(value: Any, what: str) -> None:
    """Walk strings, paths, lists and mappings (keys too); nested models check themselves."""
    if isinstance(value, BaseModel) or value is None:
        return
    if isinstance(value, (str, PurePath)):
        reject_control_chars(str(value), what)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            check_values(k, f"{what} key")
            check_values(v, f"{what} [{k!r}]" if isinstance(k, str) else what)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            check_values(v, f"{what} [{i}]" if what != "value" else f"item [{i}]")


def _check_nul(value: Any, what: str) -> None:
    if isinstance(value, (str, PurePath)) and "\x00" in str(value):
        raise UnsafeValue(f"{what} {_preview(str(value))} contains a NUL byte, which no "
                          "command line can carry")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_nul(v, f"item [{i}]")


class NoControlChars(BaseModel):
    """Base for spec and config models: no string field may hold a control character.

    The check runs on every field after its own validation, so the error carries the field's
    path like any other spec error (``slurm.sbatch_args: item [0] ... contains a newline``).

    A field that is an argv the user writes (say a step's ``command:``), where a newline can
    be meant (``python -c "..."``), is named in ``argv_fields``: it may hold control characters
    but no NUL, and whoever puts it into a script must use ``render_command``.
    """

    argv_fields: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_chars(cls, value: Any, info: ValidationInfo) -> Any:
        try:
            if info.field_name in cls.argv_fields:
                _check_nul(value, "value")
            else:
                check_values(value, "value")
        except UnsafeValue as e:
            raise ValueError(str(e)) from None
        return value
