"""The error every spec check raises, in a module of its own so checks can live beside the
spec (``flows.resource_checks``) without importing it."""

from __future__ import annotations


class SpecError(ValueError):
    """A pipeline spec that cannot be used; the message names every offending field."""
