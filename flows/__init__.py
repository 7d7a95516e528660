"""Prefect flows and deployments: the pipeline, its spec, the CLI and the local stack.

Flows orchestrate; the work itself lives in ``mpi_jobs`` (kernels), ``infra`` (AWS, staging,
backends, clusters) and ``event_bridge`` (fan-out). Nothing below imports from here.
"""
