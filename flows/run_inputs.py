"""The kernel's input as every way of running it sees it: its S3 key, and the grid an
uploaded heat field decides.

Kept apart from ``flows.pipeline`` (and free of ``flows.spec``) so the FSx path and the spec's
own checks can use it without an import cycle.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from flows.errors import SpecError
from flows.resource_checks import check_resources


def input_key(spec: Any) -> str:
    """The S3 key of the kernel's input: the spec's own, or the generated sample's."""
    if spec.kernel.input_key:
        return spec.kernel.input_key
    return spec.storage.input_prefix + spec.kernel_info.input_key(spec.kernel.parameters)


def grid_for_shape(spec: Any, shape: tuple[int, ...], name: str) -> Any:
    """A heat spec with its grid set to an uploaded field's ``shape`` (re-validated: ranks
    fit, and the ranks' memory is checked for the uploaded grid, not the spec's)."""
    if len(shape) not in (2, 3):
        raise SpecError(f"the heat input must be 2D (ny, nx) or 3D (nz, ny, nx), got shape "
                        f"{shape}")
    raw = spec.model_dump()
    grid = dict(zip(("ny", "nx") if len(shape) == 2 else ("nz", "ny", "nx"),
                    (int(n) for n in shape), strict=True))
    if len(shape) == 2:
        grid["nz"] = None
    raw["kernel"]["parameters"].update(grid)
    try:
        sized = type(spec).model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"the input {name} does not fit the spec: {e}") from None
    check_resources("heat", sized.kernel.parameters, sized.ranks, sized.backend,
                    local=sized.local, where=f"the input {name}")
    return sized
