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
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigInvalid(ValueError):
    """A config that must not be used; ``issues`` holds every problem found, each with its path.

    Raised before any AWS resource is created, so fixing the file and re-running is always safe.
    """

    def __init__(self, source: str, issues: Iterable[ConfigIssue]) -> None:
        self.source = source
        self.issues = list(issues)
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


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; anything else is a ConfigInvalid naming the file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigInvalid(str(path), [ConfigIssue("<file>", "no such file")]) from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigInvalid(str(path), [ConfigIssue("<file>", f"not readable YAML: {e}")]) from None
    if not isinstance(raw, dict):
        raise ConfigInvalid(str(path), [ConfigIssue(
            "<root>", f"expected a YAML mapping, got {type(raw).__name__}")])
    return raw
