"""Which way a cloud spec's data reaches the ranks, decided when it is loaded.

On parallelcluster, either clusterflow runs where the storage is mounted (``scratch_dir`` is
``remote_root``, the run directory is shared with the ranks), or it runs anywhere and stages
through the cluster's FSx for Lustre (``flows.fsx_staging``; a ``steps:`` graph through
``flows.steps.fsx``, checked by :func:`steps_problems` once the graph is known); a spec
fitting neither is refused with what to change. On Batch the job stages its own data
(``flows.batch_staging``). No ``flows.spec`` import (the spec's validator calls this) and
nothing heavy: the pipeline imports it on every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flows.run_inputs import input_key
from infra.staging.fsx_layout import fsx_layout, staging_problem

MOUNTED_ONLY = ("{spec_dir} and a relative executable name a folder on the machine "
                "clusterflow runs on, which the cluster does not see when the run stages "
                "through FSx: name the script as an input instead (a local path is uploaded "
                "and imported: `inputs: {script: run.py}`, then `{inputs.script}`)")


def run_backends(spec: Any) -> set[str]:
    """The backends a run opens: each step's own (or the spec's), or the spec's for a
    single-kernel spec. Every check of where data goes looks at these, not only at the
    spec's ``backend`` (one step of a local spec may run on parallelcluster)."""
    if spec.steps:
        return {s.backend or spec.backend for s in spec.step_list()}
    return {spec.backend}


def section_problem(spec: Any) -> str | None:
    """A cloud backend some job runs on, without the spec section that says where."""
    for backend in ("parallelcluster", "batch"):
        if backend in run_backends(spec) and getattr(spec, backend) is None:
            steps = [s.name for s in (spec.steps or []) if s.backend == backend]
            who = f"steps.{steps[0]}.backend" if steps and spec.backend != backend else "backend"
            return (f"{who} '{backend}' needs a '{backend}:' section "
                    "(see cluster_configs/ and the README)")
    return None


def on_parallelcluster(spec: Any) -> bool:
    """Some job of the run goes to the cluster (the spec's backend or one step's)."""
    return "parallelcluster" in run_backends(spec)


def shared_mount(spec: Any) -> bool:
    """clusterflow runs where the cluster's storage is mounted (scratch_dir is remote_root)."""
    return spec.scratch_dir.resolve() == Path(spec.parallelcluster.remote_root)


def uses_fsx(spec: Any) -> bool:
    """The parallelcluster backend run from elsewhere: stage through FSx (validated at load),
    the single-kernel pipeline (``flows.fsx_staging``) or a ``steps:`` one
    (``flows.steps.fsx``)."""
    return on_parallelcluster(spec) and not shared_mount(spec)


def uses_batch_stager(spec: Any) -> bool:
    """A Batch run whose job stages its own data (``flows.batch_staging``)."""
    return spec.backend == "batch" and not spec.steps and not spec.reuse_result


def raw_config(spec: Any) -> dict[str, Any]:
    return yaml.safe_load(Path(spec.parallelcluster.config).read_text()) or {}


def fsx_refusal(spec: Any) -> str | None:
    """Why a parallelcluster spec can run neither on a shared mount nor through FSx."""
    if shared_mount(spec):
        return None
    root = spec.parallelcluster.remote_root
    where = (f"scratch_dir ({spec.scratch_dir}) is not the cluster's shared storage "
             f"parallelcluster.remote_root ({root})")
    if spec.backend != "parallelcluster":  # only some steps go to the cluster: name them
        names = ", ".join(f"steps.{s.name}" for s in spec.step_list()
                          if s.backend == "parallelcluster")
        where = f"{names} run(s) on parallelcluster, but {where}"
    s = spec.storage
    # A steps: run's inputs are known from its graph, checked by steps_problems at load.
    keys = [] if spec.steps else [input_key(spec)]
    raw = raw_config(spec)
    problem = staging_problem(raw, input_bucket=s.input_bucket,
                              input_keys=keys, results_bucket=s.results_bucket,
                              results_prefix=s.results_prefix, remote_root=root)
    if problem is None and spec.steps and spec.reuse_result:
        layout = fsx_layout(raw)
        if layout is not None and layout.results_dir(s.results_bucket, s.results_prefix
                                                     + "run/", root)[1]:
            problem = ("reuse_result needs the results prefix imported back onto the file "
                       "system, and only a SCRATCH ExportPath leads there: add a "
                       f"DataRepositoryAssociation for s3://{s.results_bucket}/"
                       f"{s.results_prefix} or drop reuse_result")
    if problem is None:
        return None
    return (f"{where}, and it cannot stage through FSx: {problem} in "
            f"{spec.parallelcluster.config}; fix that, or run clusterflow where the storage "
            "is mounted with scratch_dir equal to remote_root")


def steps_problems(spec: Any, plan: Any) -> list[str]:
    """What stops a ``steps:`` graph from staging through the cluster's FSx, one line per
    problem naming the field (checked when the spec is loaded, before anything exists)."""
    if not uses_fsx(spec):
        return []
    from flows.steps.placeholders import names_in

    layout = fsx_layout(raw_config(spec))
    if layout is None:  # fsx_refusal has said why
        return []
    problems = []
    s = spec.storage
    local_key = f"{s.input_prefix}clusterflow-local/x"
    for name, step in plan.steps.items():
        backend = step.backend or spec.backend
        if backend != "parallelcluster":
            field = f"steps.{name}.backend: {backend}" if step.backend else \
                f"steps.{name} (backend: {backend} at the top of the spec)"
            problems.append(f"{field}: a run staged through the cluster's FSx runs every step "
                            "on parallelcluster (its outputs stay on the cluster's file "
                            "system for the next step): set backend: parallelcluster for "
                            "this step, or run clusterflow where the storage is mounted "
                            "with scratch_dir equal to parallelcluster.remote_root")
        args = list(step.command or []) + list(step.env.values())
        if step.command and "/" in step.command[0] and not step.command[0].startswith(("/",
                                                                                        "{")):
            problems.append(f"steps.{name}.command: {step.command[0]!r}: {MOUNTED_ONLY}")
        elif any("spec_dir" in names_in(a) for a in args):
            problems.append(f"steps.{name}.command: {MOUNTED_ONLY}")
        wants = []
        for ref in plan.inputs[name]:
            if ref.kind == "s3":
                bucket, _, key = ref.value[len("s3://"):].partition("/")
                wants.append((f"steps.{name}.inputs.{ref.name}", bucket, key))
            elif ref.kind == "local":
                wants.append((f"steps.{name}.inputs.{ref.name} (uploaded for the cluster)",
                              s.input_bucket, local_key))
        if step.uses and not plan.inputs[name]:
            wants.append((f"steps.{name} (the {step.uses} sample input)", s.input_bucket,
                          f"{s.input_prefix}x"))
        for field, bucket, key in wants:
            if layout.input_link(bucket, key) is None:
                repos = ", ".join(ln.repository for ln in layout.links if not ln.export_only)
                problems.append(f"{field}: s3://{bucket}/{key.removesuffix('x')} is under "
                                f"none of the FSx links of {spec.parallelcluster.config} "
                                f"({repos}): add a DataRepositoryAssociation for it, or run "
                                "clusterflow where the storage is mounted")
    return problems
