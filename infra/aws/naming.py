"""Names AWS will accept, checked offline before anything is created.

S3 refuses a bad bucket name only at ``CreateBucket`` time, and a region that does not exist
surfaces as an endpoint that never answers (or a 500 page from a local endpoint) after other
resources already exist. Both are knowable up front: S3 publishes its naming rules, and
botocore ships the list of every partition's regions (``partitions.json``/``endpoints.json``),
so a spec or a fabric file is checked here, once, by the same rules everywhere.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from functools import cache

# S3 "General purpose bucket naming rules" (Amazon S3 User Guide, checked 2026-12):
# 3-63 chars of a-z 0-9 . -, starting and ending with a letter or digit, no "..", not an IPv4
# address, and these reserved prefixes and suffixes (access point / Object Lambda / Multi-Region
# access point aliases, directory buckets, S3 Tables).
_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def bucket_name_problem(name: str) -> str | None:
    """Why S3 would refuse ``name`` as a general purpose bucket name, or None if it is fine."""
    if not 3 <= len(name) <= 63:
        return f"must be 3 to 63 characters long, got {len(name)}"
    if not _BUCKET_CHARS.match(name):
        return ("may contain only lower-case letters, digits, '.' and '-', and must begin and "
                "end with a letter or digit")
    if ".." in name:
        return "must not contain two adjacent periods"
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        return "must not be formatted as an IP address"
    for prefix in RESERVED_BUCKET_PREFIXES:
        if name.startswith(prefix):
            return f"must not start with the reserved prefix '{prefix}'"
    for suffix in RESERVED_BUCKET_SUFFIXES:
        if name.endswith(suffix):
            return f"must not end with the reserved suffix '{suffix}'"
    return None


def check_bucket_name(name: str) -> str:
    """``name`` if S3 accepts it, else ValueError naming the rule (for pydantic validators)."""
    problem = bucket_name_problem(name)
    if problem is not None:
        raise ValueError(f"{name!r} is not a valid S3 bucket name: it {problem}")
    return name


@cache
def _partitions() -> tuple[tuple[str, re.Pattern[str], frozenset[str]], ...]:
    """(partition id, region regex, known regions) from botocore's bundled data (no network)."""
    from botocore.loaders import create_loader

    loader = create_loader()
    known: dict[str, set[str]] = {}
    patterns: dict[str, re.Pattern[str]] = {}
    for p in loader.load_data("partitions")["partitions"]:
        patterns[p["id"]] = re.compile(p["regionRegex"])
        known.setdefault(p["id"], set()).update(p.get("regions", {}))
    for p in loader.load_data("endpoints")["partitions"]:
        patterns.setdefault(p["partition"], re.compile(p["regionRegex"]))
        known.setdefault(p["partition"], set()).update(p.get("regions", {}))
    return tuple((pid, patterns[pid], frozenset(r for r in known.get(pid, ())
                                                if not r.startswith("aws-")))
                 for pid in patterns)


def known_regions() -> frozenset[str]:
    """Every region of every partition this botocore knows."""
    return frozenset().union(*(regions for _, _, regions in _partitions()))


def region_problem(region: str, *, allow_unlisted: bool = False) -> str | None:
    """Why ``region`` cannot be used, or None.

    A region botocore lists is fine. One it does not list but that has a partition's region
    form (``xx-name-N``) may be a region newer than this botocore: refused unless
    ``allow_unlisted``. Anything else is malformed and always refused.
    """
    if region in known_regions():
        return None
    import botocore

    close = difflib.get_close_matches(region, sorted(known_regions()), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if any(pattern.match(region) for _, pattern, _ in _partitions()):
        if allow_unlisted:
            return None
        return (f"'{region}' is not a region botocore {botocore.__version__} knows{hint}; if it "
                f"is a new region, upgrade boto3/botocore or set allow_unlisted_region: true")
    return f"'{region}' is not an AWS region name (like us-east-1){hint}"
