"""One shape for every config problem clusterflow reports: a field path and a message.

ParallelCluster's schema (marshmallow), clusterflow's Batch model (pydantic) and clusterflow's
own checks all report through ``ConfigIssue`` so ``clusterflow validate`` prints them the same
way: ``Scheduling.SlurmQueues[0].ComputeResources[0].MaxCount: Must be greater than ...``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class ConfigIssue:
    """``level`` is ``error`` (the config is refused) or ``warning`` (said, not refused: what
    ParallelCluster itself reports as a WARNING, or a hint it does not give at all)."""

    path: str
    message: str
    level: str = "error"

    def __str__(self) -> str:
        return f"{self.path}: {'warning: ' if self.level == 'warning' else ''}{self.message}"


def warning(path: str, message: str) -> ConfigIssue:
    return ConfigIssue(path, message, "warning")


class ConfigInvalid(ValueError):
    """A config that must not be used; ``issues`` holds every problem found, each with its path.

    Raised before any AWS resource is created, so fixing the file and re-running is always safe.
    """

    def __init__(self, source: str, issues: Iterable[ConfigIssue],
                 warnings: Iterable[ConfigIssue] = ()) -> None:
        self.source = source
        self.issues = list(issues)
        self.warnings = list(warnings)
        lines = "\n".join(f"  {i}" for i in self.issues)
        super().__init__(f"{source} is invalid ({len(self.issues)} error(s)):\n{lines}")


def join_path(prefix: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def path_of(loc: Iterable[str | int]) -> str:
    path = ""
    for part in loc:
        path = join_path(path, part)
    return path or "<root>"


def flatten_marshmallow(messages: Any, prefix: str = "") -> Iterator[ConfigIssue]:
    """marshmallow's nested error dict -> one issue per message, with a dotted/indexed path.

    ``{'Scheduling': {'SlurmQueues': {0: {'MaxCount': ['Must be ...']}}}}`` becomes
    ``Scheduling.SlurmQueues[0].MaxCount: Must be ...``; schema-level messages (``_schema``)
    belong to the object that holds them.
    """
    if isinstance(messages, Mapping):
        for key, value in messages.items():
            path = prefix if key == "_schema" else join_path(prefix, key)
            yield from flatten_marshmallow(value, path)
    elif isinstance(messages, (list, tuple)):
        for item in messages:
            yield from flatten_marshmallow(item, prefix)
    else:
        yield ConfigIssue(prefix or "<root>", str(messages))


def yaml_error_line(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message (context, caret drawing) as one line with its position."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(x for x in (e.context, e.problem) if x)
        return f"{where}{what}"
    return " ".join(str(e).split())


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; anything else (missing, a directory, unreadable,
    not UTF-8, binary, not YAML) is a ConfigInvalid naming the file, in one line."""
    def refuse(message: str) -> ConfigInvalid:
        return ConfigInvalid(str(path), [ConfigIssue("<file>", message)])

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise refuse("no such file") from None
    except IsADirectoryError:
        raise refuse("is a directory, not a config file: name the YAML files in it") from None
    except OSError as e:
        raise refuse(f"cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise refuse(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                     "save it as UTF-8; binary files are not configs") from None
    if "\x00" in text:
        raise refuse("a binary file (it contains NUL bytes), not a YAML config") from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, TypeError) as e:
        # `{{ x }}` is a mapping used as a key: PyYAML says "unhashable key", or (once a
        # library has added its own constructors to SafeLoader, as ParallelCluster's import
        # does) raises a bare TypeError. Either way it is the file, not clusterflow.
        hint = ("; it holds {{ }} template placeholders: render the template first"
                if "{{" in text else "")
        said = yaml_error_line(e) if isinstance(e, yaml.YAMLError) else str(e)
        raise refuse(f"not readable YAML: {said}{hint}") from None
    if not isinstance(raw, dict):
        raise ConfigInvalid(str(path), [ConfigIssue(
            "<root>", f"expected a YAML mapping, got {type(raw).__name__}")])
    return raw
