"""YAML files that become pydantic models, with errors a user can act on.

Every config clusterflow reads (pipeline specs, the event fabric) is refused the same way:
a missing file, broken YAML, a non-mapping, or fields that fail validation, each named by its
dotted path, before anything is created.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def format_errors(err: ValidationError,
                  rename: Callable[[list[str]], list[str]] | None = None) -> str:
    """One ``  path.to.field: message`` line per error; ``rename`` may rewrite a path."""
    lines = []
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        if rename is not None:
            parts = rename(parts)
        loc = ".".join(parts) or "<file>"
        lines.append(f"  {loc}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def read_text(path: Path, *, what: str, error: type[Exception]) -> str:
    """The file's text, or ``error`` saying in one line why it cannot be a config file.

    A directory, an unreadable file, a binary file and a file in another encoding are all
    things users pass by mistake (a glob, a tab completion, a Windows editor); each gets its
    own message, never a traceback.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a YAML file") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if b"\0" in data:
        raise error(f"{what} {path} is a binary file, not YAML text") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line "
                    f"{line}); save it as UTF-8") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_yaml_model(path: Path | str, model: type[M], *, what: str, error: type[Exception],
                    overrides: dict[str, Any] | None = None,
                    rename: Callable[[list[str]], list[str]] | None = None) -> M:
    """Read ``path`` into ``model``; ``overrides`` (non-None values) win over the file.

    Raises ``error`` with a message that starts with ``what`` and the path.
    """
    path = Path(path)
    text = read_text(path, what=what, error=error)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {yaml_problem(e)}") from None
    except TypeError as e:  # `{{ x }}` as a key once a library changed SafeLoader's mappings
        raise error(f"{what} {path} is not valid YAML: {e} (a {{{{ }}}} template placeholder "
                    "used as a value? render the template first)") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {path} must be a YAML mapping, got {type(raw).__name__}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise error(f"{what} {path} is invalid:\n{format_errors(e, rename)}") from None
