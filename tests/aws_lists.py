"""Whole listings from the session's shared endpoint, every page.

The moto server lives for the whole test session, so names pile up: ListTopics returns 100 a
page and ListRules 50 here, and a check against the first page alone either misses what it
looks for or, worse, passes "nothing was created" without looking at the rest.
"""

from __future__ import annotations

from typing import Any


def topic_arns(aws: Any) -> list[str]:
    pages = aws.client("sns").get_paginator("list_topics").paginate()
    return [t["TopicArn"] for page in pages for t in page["Topics"]]


def rule_names(aws: Any, prefix: str | None = None) -> list[str]:
    kwargs = {"NamePrefix": prefix} if prefix else {}
    pages = aws.client("events").get_paginator("list_rules").paginate(**kwargs)
    return [r["Name"] for page in pages for r in page["Rules"]]
