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


def load_yaml_model(path: Path | str, model: type[M], *, what: str, error: type[Exception],
                    overrides: dict[str, Any] | None = None,
                    rename: Callable[[list[str]], list[str]] | None = None) -> M:
    """Read ``path`` into ``model``; ``overrides`` (non-None values) win over the file.

    Raises ``error`` with a message that starts with ``what`` and the path.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {path} must be a YAML mapping, got {type(raw).__name__}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise error(f"{what} {path} is invalid:\n{format_errors(e, rename)}") from None
