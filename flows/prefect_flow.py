"""``flow``: Prefect's flow decorator, minus FastAPI on the way to a flow run.

Prefect stores a flow run's parameters after passing each one through FastAPI's
``jsonable_encoder`` (``Flow.serialize_parameters``), and imports ``fastapi`` for that on
the first flow run of a process (``fastapi.openapi.models`` builds its pydantic models and
regexes at import): 0.5-0.6 s of every ``clusterflow run`` on a busy 2-core VM, to encode a
spec path, a rank count and two names. For values that already are JSON (str, int, float,
bool, None, and lists and str-keyed dicts of them) that encoder returns them unchanged, so
``JsonParamsFlow`` returns those as they are and hands anything else (a ``Path``, a pydantic
model, a future) to Prefect's own encoding. What the API stores is the same either way
(``tests/flows/test_prefect_flow.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


class JsonParamsFlow(Flow):  # type: ignore[type-arg]
    """A Prefect ``Flow`` that encodes JSON-native parameters without importing FastAPI."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        if all(_is_json(v) for v in parameters.values()):
            return dict(parameters)
        return super().serialize_parameters(parameters)


def flow(**options: Any) -> Callable[[Callable[..., Any]], JsonParamsFlow]:
    """``@prefect.flow(**options)``, building a ``JsonParamsFlow``."""

    def decorate(fn: Callable[..., Any]) -> JsonParamsFlow:
        return JsonParamsFlow(fn=fn, **options)

    return decorate
