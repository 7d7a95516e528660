"""Is this an AWS region? Answered offline from botocore's own endpoint data.

A region that is a template placeholder (``{{ region }}``), malformed (``us east 2``) or unknown
(``us-north-9``) otherwise reaches botocore, which raises ``InvalidRegionError`` (a traceback) or
sends requests to a host that does not exist (a long wait, then a 500 page). botocore's
``endpoints.json`` lists every region of every partition and, per partition, the pattern its
region names follow; both are what botocore itself resolves endpoints with.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\$\{|<[^>]*>|%\(")


@lru_cache(maxsize=1)
def _partitions() -> list[dict[str, Any]]:
    import botocore.loaders

    return list(botocore.loaders.create_loader().load_data("endpoints")["partitions"])


@lru_cache(maxsize=1)
def known_regions() -> frozenset[str]:
    """Every region botocore's endpoint data lists, across partitions (aws, aws-cn, GovCloud…)."""
    return frozenset(r for p in _partitions() for r in p.get("regions", {}))


def region_problem(value: object) -> str | None:
    """None for a region botocore knows, else a one-line reason naming the value."""
    if not isinstance(value, str):
        return f"{value!r} is not a region name (a string such as us-east-2)"
    if _PLACEHOLDER.search(value):
        return (f"{value!r} is a template placeholder, not a region: render the template (or "
                "write the region, e.g. us-east-2) before using the file")
    if value in known_regions():
        return None
    if not any(re.match(p["regionRegex"], value) for p in _partitions() if "regionRegex" in p):
        return (f"{value!r} is not a well-formed AWS region name (they look like us-east-2, "
                "eu-west-1, ap-southeast-2)")
    import botocore

    close = difflib.get_close_matches(value, known_regions(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(sorted(close))}?" if close else ""
    return (f"{value!r} is not an AWS region botocore {botocore.__version__} knows{hint} "
            "(if it is new, upgrade botocore)")
