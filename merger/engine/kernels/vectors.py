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


def loop(builder, name: str):
    """Open a counted loop at the builder's position: (the entry block, the index phi j = 0, step,
    2·step, …, close). Emit the body, then ``close(step, count)``: j advances by ``step`` and the
    body runs again while j < ``count`` (at least once: count > 0); the builder is left after the
    loop and the block the body ended in is returned, for the body's other phis."""
    i64 = ir.IntType(64)
    entry = builder.block
    body = builder.append_basic_block(name)
    done = builder.append_basic_block(name + "_done")
    builder.branch(body)
    builder.position_at_end(body)
    j = builder.phi(i64)
    j.add_incoming(ir.Constant(i64, 0), entry)

    def close(step: int, count):
        j_next = builder.add(j, ir.Constant(i64, step))
        end = builder.block
        j.add_incoming(j_next, end)
        builder.cbranch(builder.icmp_signed("<", j_next, count), body, done)
        builder.position_at_end(done)
        return end
    return entry, j, close
