"""The step graph: checked as a whole, ordered, and expanded into points, before anything runs.

Everything a user can get wrong about the graph is found here, each as one line naming the
field (``steps.analyse.inputs.fields: ...``): unknown steps in ``needs`` or inputs,
duplicate names, cycles (named step by step), placeholders that name nothing, outputs no
step declares, sweeps whose points the kernel refuses, and executables that do not exist on a
backend where that can be checked.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from flows.steps.model import StepSpec, SweepValue
from flows.steps.placeholders import PlaceholderError, names_in
from mpi_jobs.catalog import KERNELS

_STEP_REF = re.compile(r"^steps\.([a-z][a-z0-9_-]*)\.outputs(?:[./](.+))?$")
_WILDCARD = re.compile(r"[*?\[]")
# Backends whose ranks run on this machine's filesystem: executables can be checked here.
CHECKABLE = ("local", "slurm")


class GraphError(ValueError):
    """The step graph cannot run; one line per problem, each naming its field."""


@dataclass(frozen=True)
class InputRef:
    name: str
    kind: Literal["s3", "local", "step"]
    value: str  # an s3:// URI, an absolute local path, or an upstream step's name
    glob: str | None = None  # which of an upstream step's outputs (None: all of them)
    is_file: bool = False  # {inputs.name} is a file path (else a directory)


@dataclass(frozen=True)
class Point:
    """One job of a step: the step itself, or one point of its sweep."""

    step: str
    index: int
    label: str  # "alpha=0.1,nx=64"; "" for a step without a sweep
    params: dict[str, Any]
    upstream: tuple[tuple[str, str], ...] = ()  # (step, label) this point waits for

    @property
    def task_name(self) -> str:
        return f"{self.step}[{self.label}]" if self.label else self.step

    @property
    def key(self) -> tuple[str, str]:
        return (self.step, self.label)


@dataclass
class Plan:
    steps: dict[str, StepSpec]  # in a topological order
    inputs: dict[str, list[InputRef]]
    upstream_steps: dict[str, list[str]]
    points: dict[str, list[Point]]
    per_point_of: dict[str, str] = field(default_factory=dict)
    spec_dir: Path = Path(".")

    def ranks(self, step: StepSpec, default: int) -> int:
        if step.ranks is not None:
            return step.ranks
        return 1 if step.launcher == "none" else default

    def all_points(self) -> list[Point]:
        return [p for name in self.steps for p in self.points[name]]


def _label(values: dict[str, SweepValue]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def parse_input(name: str, raw: str, spec_dir: Path) -> InputRef:
    if raw.startswith("s3://"):
        bucket, _, key = raw[5:].partition("/")
        if not bucket:
            raise GraphError(f"{raw!r} names no bucket")
        return InputRef(name, "s3", raw, is_file=bool(key) and not key.endswith("/"))
    m = _STEP_REF.match(raw)
    if m:
        glob = m[2]
        if glob is not None and (glob.startswith("/") or ".." in glob.split("/")):
            raise GraphError(f"{raw!r}: the output glob must stay inside the step's outputs")
        return InputRef(name, "step", m[1], glob=glob,
                        is_file=glob is not None and not _WILDCARD.search(glob))
    if raw.startswith("steps."):
        raise GraphError(f"{raw!r} is not steps.<name>.outputs[/<glob>]")
    path = (spec_dir / raw).resolve()
    if not path.exists():
        raise GraphError(f"local path {raw!r} does not exist (relative paths are relative to "
                         f"the spec's folder {spec_dir})")
    return InputRef(name, "local", str(path), is_file=path.is_file())


def _declared_outputs(step: StepSpec) -> list[str] | None:
    """The globs a step promises to write; None: anything (a command without outputs:)."""
    if step.outputs:
        return list(step.outputs)
    if step.uses is not None:
        return list(KERNELS[step.uses].outputs)
    return None


def _could_match(ref_glob: str, declared: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(ref_glob, d) or fnmatch.fnmatchcase(d, ref_glob)
               or ref_glob == d for d in declared)


def _find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in deps.get(n, []):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in deps:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _topological(names: list[str], deps: dict[str, list[str]]) -> list[str]:
    done: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        for m in deps[n]:
            visit(m)
        done.append(n)

    for n in names:
        visit(n)
    return done


def executable_problem(argv0: str, spec_dir: Path, extra_path: str | None = None) -> str | None:
    """Why ``argv0`` cannot be started on this machine, or None if it can."""
    if "/" in argv0:
        path = Path(argv0) if argv0.startswith("/") else spec_dir / argv0
        if not path.is_file():
            return f"{argv0!r} does not exist ({path})"
        if not os.access(path, os.X_OK):
            return f"{argv0!r} is not executable ({path}); chmod +x it or run it via its " \
                   "interpreter"
        return None
    search = os.pathsep.join(p for p in (str(Path(sys.executable).parent), extra_path,
                                         os.environ.get("PATH", "")) if p)
    if shutil.which(argv0, path=search) is None:
        return f"{argv0!r} is not on PATH (nor in {Path(sys.executable).parent})"
    return None


def build_plan(steps: list[StepSpec], *, spec_dir: Path, default_backend: str,
               default_ranks: int) -> Plan:
    """Check the whole graph and expand it; raises GraphError listing every problem."""
    problems: list[str] = []
    by_name: dict[str, StepSpec] = {}
    for s in steps:
        if s.name in by_name:
            problems.append(f"steps.{s.name}.name: duplicate step name {s.name!r}")
        by_name[s.name] = s
    inputs: dict[str, list[InputRef]] = {}
    deps: dict[str, list[str]] = {}
    for s in by_name.values():
        refs: list[InputRef] = []
        for name, raw in s.inputs.items():
            try:
                ref = parse_input(name, raw, spec_dir)
            except GraphError as e:
                problems.append(f"steps.{s.name}.inputs.{name}: {e}")
                continue
            if ref.kind == "step":
                if ref.value not in by_name:
                    problems.append(f"steps.{s.name}.inputs.{name}: no step named "
                                    f"{ref.value!r} (steps: {', '.join(by_name)})")
                    continue
                declared = _declared_outputs(by_name[ref.value])
                if ref.glob and declared is not None and not _could_match(ref.glob, declared):
                    problems.append(f"steps.{s.name}.inputs.{name}: step {ref.value!r} "
                                    f"declares no output matching {ref.glob!r} (it writes "
                                    f"{', '.join(declared)})")
            refs.append(ref)
        inputs[s.name] = refs
        upstream = [r.value for r in refs if r.kind == "step"]
        for n in s.needs:
            if n not in by_name:
                problems.append(f"steps.{s.name}.needs: no step named {n!r} "
                                f"(steps: {', '.join(by_name)})")
            else:
                upstream.append(n)
        if s.name in upstream:
            problems.append(f"steps.{s.name}.needs: a step cannot depend on itself")
        deps[s.name] = list(dict.fromkeys(u for u in upstream if u != s.name))
        problems += _placeholder_problems(s, refs)
        problems += _launcher_problems(s, default_backend)
    if problems:
        raise GraphError("\n".join(problems))
    cycle = _find_cycle(deps)
    if cycle:
        raise GraphError(f"steps: dependency cycle {' -> '.join(cycle)}")
    order = _topological(list(by_name), deps)
    plan = Plan(steps={n: by_name[n] for n in order}, inputs=inputs, upstream_steps=deps,
                points={}, spec_dir=spec_dir)
    for name in order:
        problems += _expand(plan, by_name[name])
    for name in order:
        problems += _executable_problems(plan, by_name[name], default_backend)
    if problems:
        raise GraphError("\n".join(problems))
    return plan


def _placeholder_problems(s: StepSpec, refs: list[InputRef]) -> list[str]:
    known = {"out", "ranks", "spec_dir", "run_id", "point"}
    known |= {f"inputs.{r.name}" for r in refs}
    known |= {f"params.{k}" for k in s.parameters}
    known |= {f"params.{k}" for k in (s.sweep.axes() if s.sweep else [])}
    out = []
    fields = [(f"command[{i}]", a) for i, a in enumerate(s.command or [])]
    fields += [(f"env.{k}", v) for k, v in s.env.items()]
    for where, text in fields:
        try:
            used = names_in(text)
        except PlaceholderError as e:
            out.append(f"steps.{s.name}.{where}: {e}")
            continue
        for n in used:
            if n not in known:
                out.append(f"steps.{s.name}.{where}: placeholder {{{n}}} names nothing "
                           f"(known: {', '.join('{' + k + '}' for k in sorted(known))})")
    return out


def _launcher_problems(s: StepSpec, default_backend: str) -> list[str]:
    backend = s.backend or default_backend
    if s.launcher == "srun" and backend not in ("slurm", "parallelcluster"):
        return [f"steps.{s.name}.launcher: srun needs a Slurm backend, not {backend!r}"]
    return []


def _expand(plan: Plan, s: StepSpec) -> list[str]:
    problems: list[str] = []
    own = s.sweep.expand() if s.sweep else [{}]
    multi = [u for u in plan.upstream_steps[s.name]
             if len(plan.points[u]) > 1 or any(p.label for p in plan.points[u])]
    base: list[tuple[str, tuple[tuple[str, str], ...]]] = [("", ())]
    if s.per_point:
        linked = list(dict.fromkeys(r.value for r in plan.inputs[s.name]
                                    if r.kind == "step" and r.value in multi))
        if len(linked) != 1:
            return [f"steps.{s.name}.per_point: needs an input from exactly one swept step "
                    f"(found {', '.join(linked) or 'none'})"]
        plan.per_point_of[s.name] = linked[0]
        base = [(up.label, (up.key,)) for up in plan.points[linked[0]]]
    per_up = plan.per_point_of.get(s.name)
    fan_in = tuple(p.key for u in plan.upstream_steps[s.name] if u != per_up
                   for p in plan.points[u])
    points: list[Point] = []
    for up_label, up_keys in base:
        for values in own:
            label = ",".join(x for x in (up_label, _label(values)) if x)
            params = {**s.parameters, **values}
            if s.uses is not None:
                try:
                    s.kernel_parameters(params)
                except ValidationError as e:
                    msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                    for x in e.errors())
                    problems.append(f"steps.{s.name}.sweep[{label}]: {msg}")
                    continue
            points.append(Point(step=s.name, index=len(points), label=label, params=params,
                                upstream=tuple(dict.fromkeys((*up_keys, *fan_in)))))
    plan.points[s.name] = points
    return problems


def _executable_problems(plan: Plan, s: StepSpec, default_backend: str) -> list[str]:
    if (s.backend or default_backend) not in CHECKABLE:
        return []
    out = []
    if s.command and not names_in(s.command[0]):
        why = executable_problem(s.command[0], plan.spec_dir, s.env.get("PATH"))
        if why:
            out.append(f"steps.{s.name}.command[0]: {why}")
    if s.launcher is not None and not isinstance(s.launcher, str):
        why = executable_problem(s.launcher.mpiexec, plan.spec_dir)
        if why:
            out.append(f"steps.{s.name}.launcher.mpiexec: {why}")
    return out
