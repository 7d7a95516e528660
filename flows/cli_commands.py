"""The ``clusterflow`` commands that live in other packages, imported only when used.

Every area owns its commands (``events``, ``local``, ``slurm``, ``ha``, ``guard``,
``telemetry``, ``validate``, ``stage``, ``deploy``, ``plan``); mounting them all at start-up
imported their modules on every invocation, ``clusterflow run`` included, which never uses
them (a few tenths of a second of each run's fixed overhead:
``python -X importtime -c 'import flows.cli'``). This group
knows them by name and imports a command's module the first time click asks for it: to run
it, to complete it, or to list it in ``--help``.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

# name -> (module, attribute, how): "group" is a Typer app mounted under the name,
# "register" a function that adds the command to an app. In the order --help lists them.
LAZY: dict[str, tuple[str, str, str]] = {
    "validate": ("infra.clusters.validate_cli", "register", "register"),
    "stage": ("infra.staging.cli", "register", "register"),
    "deploy": ("flows.local_cli", "register", "register"),
    "plan": ("flows.planning.command", "register", "register"),
    "events": ("event_bridge.cli", "app", "group"),  # apply | show | drain | replay | dlq
    "local": ("flows.local_cli", "local_app", "group"),  # up | down | status
    "slurm": ("infra.clusters.slurm_local.cli", "app", "group"),  # up | down | status
    "ha": ("infra.ha.cli", "ha_app", "group"),  # drill ...
    "guard": ("infra.guard.cli", "guard_app", "group"),  # block | unblock | list | audit ...
    "telemetry": ("infra.telemetry.cli", "telemetry_app", "group"),  # show RUN
}


def load(name: str) -> Any:
    """The click command ``name``, built exactly as mounting it on the app would."""
    module, attr, how = LAZY[name]
    target = getattr(importlib.import_module(module), attr)
    parent = typer.Typer(add_completion=False)
    if how == "group":
        parent.add_typer(target, name=name)
    else:
        target(parent)
        parent.callback()(lambda: None)  # a group even with one command, to look it up
    return typer.main.get_command(parent).commands[name]  # type: ignore[attr-defined]


class LazyGroup(TyperGroup):
    """The root group: its own commands at once, the other packages' on first use."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.commands, *(n for n in LAZY if n not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in LAZY:
            self.commands[cmd_name] = load(cmd_name)
        return self.commands.get(cmd_name)
