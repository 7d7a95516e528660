"""A software prefetch for compiled loops: ``prefetch_row(table, row)`` inside an ``@jit``.

Counting k-mers is one random probe of a table far larger than the caches per k-mer, so a
plain loop waits for DRAM on every iteration, one miss at a time. Issuing the probe's load a
few k-mers ahead (its slot is known as soon as the code is hashed) keeps several misses in
flight and roughly halves the insert time measured here. numba has no prefetch of its own;
this emits LLVM's ``llvm.prefetch`` intrinsic, a hint that never faults and changes no value.

numba's on-disk cache keys a kernel by its own module, not this one: after editing this file,
delete ``mpi_jobs/__pycache__/*.nb[ic]`` so the kernels are compiled again.
"""

from __future__ import annotations

from typing import Any

import llvmlite.binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# LLVM names the intrinsic by its pointer type: "p0" for opaque pointers, the only kind from
# LLVM 17 on; the typed "p0i8" before (llvmlite kept typed pointers on LLVM 14-16).
_NAME = "llvm.prefetch.p0" if llvmlite.binding.llvm_version_info >= (17,) else "llvm.prefetch.p0i8"


@intrinsic
def prefetch_row(typingctx: Any, table: Any, row: Any) -> Any:
    """Prefetch ``table[row, 0]`` for a write (a 2-D C-contiguous array, an integer row)."""
    if not (isinstance(table, types.Array) and table.ndim == 2 and isinstance(row, types.Integer)):
        return None
    sig = types.void(table, row)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty, rowty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        index = [context.cast(builder, args[1], rowty, types.intp),
                 context.get_constant(types.intp, 0)]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, index)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), _NAME)
        # rw=1 (the probe writes the slot), locality=3 (keep in all cache levels), data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 1), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
