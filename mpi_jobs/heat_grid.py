"""The heat kernel's domain decomposition: one rank's block, its halo exchange and gather.

Split out of `mpi_jobs.heat` so the driver reads as a time loop. Everything here is about
moving field data between ranks and files (block extents, face datatypes, persistent halo
requests, reading a block from the input or a checkpoint, gathering to rank 0); it never
computes the stencil or the diagnostics and never parses flags.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mpi_jobs.decomposition import block_range

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpi_jobs.checkpoint import Checkpoint

__all__ = ["Block", "Box", "max_fitting_ranks"]

Box = tuple[tuple[int, int], ...]


def max_fitting_ranks(shape: tuple[int, ...], size: int) -> int:
    from mpi4py import MPI

    for n in range(size, 0, -1):
        dims = MPI.Compute_dims(n, len(shape))
        if all(d <= s for d, s in zip(dims, shape, strict=True)):
            return n
    return 1


class Block:
    """This rank's share of the grid, its neighbours, and the face datatypes of the exchange.

    Arrays are padded with one ghost layer per side. Datatypes and buffers are created once:
    the step loop only moves data, it never allocates.
    """

    def __init__(self, cart: MPI.Cartcomm, shape: tuple[int, ...]) -> None:
        self.cart = cart
        self.shape = shape
        self.ndim = len(shape)
        self.dims: list[int] = list(cart.Get_topo()[0])
        self.coords: list[int] = list(cart.Get_coords(cart.Get_rank()))
        self.lo: list[int] = []
        self.hi: list[int] = []
        for n, parts, c in zip(shape, self.dims, self.coords, strict=True):
            lo, hi = block_range(n, parts, c)
            self.lo.append(lo)
            self.hi.append(hi)
        self.local = tuple(h - lo for lo, h in zip(self.lo, self.hi, strict=True))
        self.padded = tuple(n + 2 for n in self.local)
        self.neighbours = [cart.Shift(axis, 1) for axis in range(self.ndim)]  # (minus, plus)
        self._types: list[MPI.Datatype] = []
        self._requests: list[MPI.Prequest] = []
        # Per axis: (send to minus, recv from plus, send to plus, recv from minus).
        self.faces = [self._face_types(axis) for axis in range(self.ndim)]

    def _face(self, axis: int, index: int) -> MPI.Datatype:
        from mpi4py import MPI

        subsizes = [n for n in self.local]
        starts = [1] * self.ndim
        subsizes[axis] = 1
        starts[axis] = index
        dtype = MPI.DOUBLE.Create_subarray(list(self.padded), subsizes, starts).Commit()
        self._types.append(dtype)
        return dtype

    def _face_types(self, axis: int) -> tuple[MPI.Datatype, ...]:
        n = self.local[axis]
        return (self._face(axis, 1), self._face(axis, n + 1), self._face(axis, n),
                self._face(axis, 0))

    def free(self) -> None:
        for request in self._requests:
            request.Free()
        self._requests.clear()
        for dtype in self._types:
            dtype.Free()
        self._types.clear()

    # ------------------------------------------------------------------ boxes

    def interior_box(self) -> Box:
        """Cells whose neighbours are all owned: computable before the halo arrives."""
        return tuple((2, n) for n in self.local)

    def shell_boxes(self) -> list[Box]:
        """The one-cell shell around `interior_box`, as disjoint boxes (cover = block)."""
        boxes: list[Box] = []
        for axis, n in enumerate(self.local):
            for index in sorted({1, n}):
                box = []
                for other, m in enumerate(self.local):
                    if other == axis:
                        box.append((index, index + 1))
                    elif other < axis:
                        box.append((2, m))
                    else:
                        box.append((1, m + 1))
                boxes.append(tuple(box))
        return boxes

    # ------------------------------------------------------------------ data movement

    def load(self, path: Path) -> np.ndarray:
        """Read only this rank's block (mmap + slice), into an array with a zero ghost layer."""
        src = np.load(path, mmap_mode="r", allow_pickle=False)
        u = np.zeros(self.padded)
        u[(slice(1, -1),) * self.ndim] = src[
            tuple(slice(lo, hi) for lo, hi in zip(self.lo, self.hi, strict=True))
        ]
        del src
        return u

    def load_checkpoint(self, ckpt: Checkpoint, u: np.ndarray) -> None:
        """Fill this block from the saved blocks that overlap it, whatever their layout."""
        covered = 0
        for name, piece in sorted(ckpt.meta["pieces"].items()):
            lo = [max(a, b) for a, b in zip(self.lo, piece["lo"], strict=True)]
            hi = [min(a, b) for a, b in zip(self.hi, piece["hi"], strict=True)]
            if any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            data = ckpt.load(name)
            src = tuple(slice(a - p, b - p) for a, b, p in zip(lo, hi, piece["lo"], strict=True))
            dst = tuple(
                slice(a - m + 1, b - m + 1) for a, b, m in zip(lo, hi, self.lo, strict=True)
            )
            u[dst] = data[src]
            covered += math.prod(b - a for a, b in zip(lo, hi, strict=True))
        if covered != math.prod(self.local):
            raise ValueError(
                f"checkpoint {ckpt.directory} does not cover this rank's block "
                f"({covered} of {math.prod(self.local)} cells)"
            )

    def exchange_requests(self, u: np.ndarray) -> list[MPI.Prequest]:
        """Persistent requests for the halo exchange of `u`, straight from/to the padded array.

        Set up once per array (the step loop alternates between two), then each step is one
        ``Startall`` and one ``Waitall``: no per-step request construction in Python.
        Tags are per axis and direction of travel, so a message can never land in the wrong
        ghost layer even when both neighbours along an axis are the same rank (or this rank,
        on a periodic axis with one process). Sides facing a Dirichlet boundary have
        PROC_NULL neighbours: no-ops, so those ghosts keep their zero.
        """
        cart = self.cart
        requests = []
        for axis, ((minus, plus), faces) in enumerate(
            zip(self.neighbours, self.faces, strict=True)
        ):
            send_minus, recv_plus, send_plus, recv_minus = faces
            down, up = 2 * axis, 2 * axis + 1
            requests.append(cart.Recv_init([u, 1, recv_plus], source=plus, tag=down))
            requests.append(cart.Recv_init([u, 1, recv_minus], source=minus, tag=up))
            requests.append(cart.Send_init([u, 1, send_minus], dest=minus, tag=down))
            requests.append(cart.Send_init([u, 1, send_plus], dest=plus, tag=up))
        self._requests.extend(requests)
        return requests

    def gather(self, u: np.ndarray) -> np.ndarray | None:
        """Assemble the global field on rank 0 (None elsewhere).

        Blocks arrive as flat runs in rank order; each is placed by its rank's Cartesian
        coordinates, which is what keeps the layout right for any process grid.
        """
        from mpi4py import MPI

        cart = self.cart
        local = np.ascontiguousarray(u[(slice(1, -1),) * self.ndim]).ravel()
        if cart.Get_rank() != 0:
            cart.Gatherv([local, MPI.DOUBLE], None, root=0)
            return None
        extents = []
        for r in range(cart.Get_size()):
            coords = cart.Get_coords(r)
            extents.append([
                block_range(n, p, c)
                for n, p, c in zip(self.shape, self.dims, coords, strict=True)
            ])
        counts = [math.prod(hi - lo for lo, hi in ext) for ext in extents]
        displs = [sum(counts[:r]) for r in range(len(counts))]
        flat = np.empty(math.prod(self.shape))
        cart.Gatherv([local, MPI.DOUBLE], [flat, counts, displs, MPI.DOUBLE], root=0)
        field = np.empty(self.shape)
        for ext, start, count in zip(extents, displs, counts, strict=True):
            index = tuple(slice(lo, hi) for lo, hi in ext)
            field[index] = flat[start : start + count].reshape([hi - lo for lo, hi in ext])
        return field
