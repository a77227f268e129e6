"""LLVM IR helpers for the kernels that write their vector loops themselves (numba intrinsics):
declaring an LLVM intrinsic, splatting a scalar, loading a vector of stored values at an index."""
from __future__ import annotations

from llvmlite import ir


def declare(builder, name: str, ret, params):
    """The module's declaration of the LLVM function ``name`` (made on first use)."""
    mod = builder.module
    return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, params), name=name)


def splat(builder, x, lanes: int):
    """A vector of ``lanes`` copies of the scalar ``x``."""
    vty = ir.VectorType(x.type, lanes)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def load(builder, ptr, at, lanes: int):
    """The ``lanes`` stored values at ``ptr[at:]`` (``ptr``: a typed element pointer), unaligned."""
    vty = ir.VectorType(ptr.type.pointee, lanes)
    return builder.load(builder.bitcast(builder.gep(ptr, [at]), vty.as_pointer()), align=1)


def store(builder, value, ptr, at):
    """Store the vector ``value`` at ``ptr[at:]`` (``ptr``: a typed element pointer), unaligned."""
    builder.store(value, builder.bitcast(builder.gep(ptr, [at]), value.type.as_pointer()), align=1)
