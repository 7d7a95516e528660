"""Make an already imported Prefect read its settings and logging from this environment.

In a fresh interpreter Prefect reads its settings and builds its log handlers when it is
imported, after ``flows.prefect_runtime.configure`` has set the run's defaults. A run forked
from the local stack's warm runner (``flows.warm_runner``) finds Prefect imported with the
runner's environment: ``refresh_settings`` rebuilds the global settings context (API URL,
home, logging level) and the logging configuration (console handlers on this stderr, with
its colours) from the run's own, using Prefect's own ``setup_logging``.

Prefect's logging template costs 0.12-0.2 s to load on a busy 2-core VM, nearly all of it
serialising every setting to substitute three of them (the logging levels). The runner loads
it once (``remember_logging``); a run whose inputs to it are the same (the template file,
the settings it names, the ``PREFECT_LOGGING_*`` overrides) gets a copy of that result, and
any other run loads its own.
"""

from __future__ import annotations

import copy
import os
import string
import sys
from pathlib import Path
from typing import Any

_remembered: tuple[tuple[Any, ...], dict[str, Any]] | None = None


def _template_path() -> Path:
    """The file ``setup_logging`` loads (the same choice it makes)."""
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH
    from prefect.settings import PREFECT_LOGGING_SETTINGS_PATH

    path = PREFECT_LOGGING_SETTINGS_PATH.value()
    return path if path.exists() else DEFAULT_LOGGING_SETTINGS_PATH


def _inputs(path: Path) -> tuple[Any, ...] | None:
    """What ``load_logging_config(path)`` depends on, or None if not cheaply known."""
    import prefect.settings

    text = path.read_text()
    values = []
    for name in sorted(string.Template(text).get_identifiers()):
        setting = getattr(prefect.settings, name, None)
        if setting is None or not hasattr(setting, "value"):
            return None
        values.append((name, str(setting.value())))
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("PREFECT_LOGGING_"))
    return str(path), text, tuple(values), tuple(env)


def remember_logging() -> None:
    """In the runner, after Prefect's import: keep the loaded logging configuration."""
    global _remembered
    from prefect.logging.configuration import load_logging_config

    path = _template_path()
    key = _inputs(path)
    if key is not None:
        _remembered = (key, copy.deepcopy(load_logging_config(path)))


def refresh_settings() -> None:
    """Rebuild Prefect's settings and logging from the environment, if Prefect is imported."""
    if "prefect.context" not in sys.modules:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.logging import configuration

    refresh_global_settings_context()
    if _remembered is not None and _inputs(_template_path()) == _remembered[0]:
        config = _remembered[1]
        original = configuration.load_logging_config
        configuration.load_logging_config = lambda _path: copy.deepcopy(config)
        try:
            configuration.setup_logging(incremental=False)
        finally:
            configuration.load_logging_config = original
    else:
        configuration.setup_logging(incremental=False)
