"""The error every spec check raises, in a module of its own so checks can live beside the
spec (``flows.resource_checks``) without importing it; and the failed-job error that more than
one way of running a kernel raises (``flows.pipeline``, ``flows.fsx_staging``)."""

from __future__ import annotations


class SpecError(ValueError):
    """A pipeline spec that cannot be used; the message names every offending field."""


class MpiJobFailed(RuntimeError):
    """The MPI job exited non-zero; the message carries the failing rank's own error."""
