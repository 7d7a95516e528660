"""``{placeholders}`` in a step's command and environment, and the values they take.

The syntax is Python's ``str.format`` field syntax reduced to names: ``{out}``,
``{inputs.mesh}``, ``{params.alpha}``, ``{ranks}``, ``{spec_dir}``, ``{run_id}``,
``{point}``; ``{{`` and ``}}`` are literal braces. Each argument is substituted on its own and
stays one argv element, so a value with spaces or shell characters never becomes code.
"""

from __future__ import annotations

import re
import string

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class PlaceholderError(ValueError):
    """A malformed placeholder, or one that names nothing."""


def names_in(text: str) -> list[str]:
    """The placeholder names in ``text``, in order."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise PlaceholderError(f"{text!r}: {e} (write {{{{ and }}}} for literal braces)") \
            from None
    out = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if spec or conv or not _NAME.match(name):
            raise PlaceholderError(f"{{{name}{'!' + conv if conv else ''}"
                                   f"{':' + spec if spec else ''}}} is not a placeholder "
                                   "(use {out}, {inputs.NAME}, {params.NAME}, {ranks}, "
                                   "{spec_dir}, {run_id} or {point})")
        out.append(name)
    return out


def fill(text: str, values: dict[str, str]) -> str:
    """``text`` with every placeholder replaced; an unknown one raises PlaceholderError."""
    pieces = []
    for literal, name, _, _ in string.Formatter().parse(text):
        pieces.append(literal)
        if name is not None:
            if name not in values:
                raise PlaceholderError(f"placeholder {{{name}}} names nothing")
            pieces.append(values[name])
    return "".join(pieces)
