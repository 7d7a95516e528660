"""A spec's ``steps:``: what each step runs, on what, with which inputs, and how it sweeps.

A step either ``uses:`` a bundled kernel (its ``parameters`` validated exactly as the
single-``kernel:`` spec validates them) or runs a ``command:``, an argv list for any
executable. Field-level rules live here; rules that need the whole graph (names that must
exist, cycles, placeholders, outputs somebody produces) live in ``flows.steps.graph``.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from flows.kernel_defaults import KERNEL_DEFAULTS
from infra.backends.shell_safety import NoControlChars

STEP_NAME = r"^[a-z][a-z0-9_-]{0,40}$"
Backend = Literal["local", "slurm", "parallelcluster", "batch"]
# A sweep value ends up in a directory name, an S3 key and a task run name.
SweepValue = StrictInt | StrictFloat | StrictStr | StrictBool
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
RESERVED = ("max_parallel", "fail_fast", "points", "matrix")


class _Strict(NoControlChars):
    """Unknown keys are errors; no string may hold a control character (it could end up in a
    generated batch script), except where a model names an argv field."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SystemMpiexec(_Strict):
    """An MPI launcher of the application's own (the OS's or a module's ``mpirun``)."""

    mpiexec: str = Field(description="path to the launcher, e.g. /usr/bin/mpirun")
    args: list[str] = Field(default_factory=list, description="extra launcher arguments")

    @field_validator("mpiexec")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} must be an absolute path to the launcher")
        return v


LauncherChoice = Literal["mpiexec", "srun", "none"] | SystemMpiexec


class Range(_Strict):
    range: list[StrictInt] = Field(min_length=2, max_length=3)

    def values(self) -> list[int]:
        return list(range(*self.range))


class Sweep(_Strict):
    """A matrix (every combination of the axes) and/or explicit ``points`` (zipped values).

    Axes may be written directly under ``sweep:`` (``alpha: [0.1, 0.2]``) or under
    ``matrix:``; an axis is a list or ``{range: [start, stop(, step)]}`` (stop excluded).
    With both, every explicit point is combined with every matrix combination.
    """

    matrix: dict[str, list[SweepValue] | Range] = Field(default_factory=dict)
    points: list[dict[str, SweepValue]] = Field(default_factory=list)
    max_parallel: StrictInt = Field(4, ge=1, le=4096)
    fail_fast: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _axes_at_top(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        axes = {k: v for k, v in raw.items() if k not in RESERVED}
        rest = {k: v for k, v in raw.items() if k in RESERVED}
        if axes:
            rest["matrix"] = {**(rest.get("matrix") or {}), **axes}
        return rest

    @model_validator(mode="after")
    def _values(self) -> Sweep:
        if not self.matrix and not self.points:
            raise ValueError("a sweep needs at least one axis or one point")
        for axis, values in self.matrix.items():
            vals = values.values() if isinstance(values, Range) else values
            if not vals:
                raise ValueError(f"axis {axis!r} has no values")
        for value in self.values():
            if not _SAFE_VALUE.match(str(value)):
                raise ValueError(f"sweep value {value!r} must be 1-64 characters of "
                                 "A-Z a-z 0-9 . _ + - (it names directories and S3 keys)")
        if self.points and len({tuple(sorted(p)) for p in self.points}) > 1:
            raise ValueError("every entry of points must name the same parameters")
        clash = set(self.matrix) & set(self.points[0] if self.points else {})
        if clash:
            raise ValueError(f"{sorted(clash)} appear both as matrix axes and in points")
        return self

    def values(self) -> list[SweepValue]:
        out: list[SweepValue] = [v for p in self.points for v in p.values()]
        for values in self.matrix.values():
            out += values.values() if isinstance(values, Range) else values
        return out

    def expand(self) -> list[dict[str, SweepValue]]:
        """Every point, in a stable order (explicit points outermost, then matrix axes)."""
        axes = [(k, v.values() if isinstance(v, Range) else v) for k, v in self.matrix.items()]
        combos = [dict(zip([k for k, _ in axes], vals, strict=True))
                  for vals in itertools.product(*[v for _, v in axes])]
        return [{**p, **c} for p in (self.points or [{}]) for c in combos]

    def axes(self) -> list[str]:
        return [*(self.points[0] if self.points else {}), *self.matrix]


class StepSpec(_Strict):
    # A command is an argv list, never shell text: it may hold newlines (python -c "..."),
    # and every script that carries it renders it with shell_safety.render_command.
    argv_fields: ClassVar[frozenset[str]] = frozenset({"command"})

    name: str = Field(pattern=STEP_NAME)
    uses: Literal["heat", "var", "kmer"] | None = Field(
        None, description="a bundled kernel; its parameters are validated as in kernel:")
    command: list[StrictStr] | None = Field(
        None, min_length=1, description="argv of any executable, with {placeholders}")
    parameters: dict[str, Any] = Field(default_factory=dict)
    ranks: StrictInt | None = Field(None, ge=1, le=4096, description="default: the spec's")
    inputs: dict[str, StrictStr] = Field(default_factory=dict)
    outputs: list[StrictStr] = Field(default_factory=list,
                                     description="globs under {out}; default: everything")
    needs: list[StrictStr] = Field(default_factory=list)
    env: dict[str, StrictStr] = Field(default_factory=dict)
    timeout: StrictInt | None = Field(None, gt=0, description="seconds; the job is cancelled")
    retries: StrictInt = Field(0, ge=0, le=10)
    checkpoint_every: StrictInt | None = Field(None, gt=0)
    launcher: LauncherChoice | None = Field(
        None, description="mpiexec (the venv's), srun, none (ranks: 1), or "
        "{mpiexec: /path/to/mpirun, args: [...]}; default: the backend's")
    backend: Backend | None = None
    sweep: Sweep | None = None
    per_point: StrictBool = Field(
        False, description="run once per point of the swept step this step reads from")

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$", name):
                raise ValueError(f"input name {name!r} must be an identifier")
        return v

    @field_validator("outputs")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for g in v:
            if g.startswith("/") or ".." in g.split("/") or not g:
                raise ValueError(f"output {g!r} must be a relative glob under the step's "
                                 "output directory")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                raise ValueError(f"environment variable name {k!r} is not valid")
            if "\0" in val or "\n" in val:
                raise ValueError(f"env.{k} must not contain NUL or newline characters")
        return v

    @field_validator("command")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        for arg in v or ():
            if "\0" in arg:
                raise ValueError("command arguments must not contain NUL characters")
        if v is not None and not v[0].strip():
            raise ValueError("command[0] (the executable) is empty")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> StepSpec:
        if (self.uses is None) == (self.command is None):
            raise ValueError(f"step {self.name!r} needs exactly one of uses: (a bundled kernel) "
                             "or command: (an argv list)")
        if self.checkpoint_every is not None and self.uses is None:
            raise ValueError(f"step {self.name!r}: checkpoint_every applies to uses: steps "
                             "(a command checkpoints on its own terms)")
        if self.launcher == "none" and (self.ranks or 1) != 1:
            raise ValueError(f"step {self.name!r}: launcher none runs one plain process; "
                             f"ranks must be 1, got {self.ranks}")
        if self.uses is not None:
            self.kernel_parameters(self.parameters)  # the kernel's own limits, up front
        return self

    def kernel_parameters(self, values: dict[str, Any]) -> BaseModel:
        """``values`` validated by the bundled kernel's parameter model (with spec defaults)."""
        return KERNEL_DEFAULTS[self.uses].model_validate(values)
