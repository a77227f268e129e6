"""LLVM IR helpers for the kernels that write their vector loops themselves (numba intrinsics):
declaring an LLVM intrinsic, splatting a scalar, loading and storing a vector at an index, a
counted loop, packing a vector's selected lanes to the front."""
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


def compress(builder, v, mask, table=None):
    """LLVM's ``vector.compress``: the lanes of ``v`` that ``mask`` selects, packed to the front
    (``vcompressps`` with AVX-512, an expansion elsewhere; ``table`` unused)."""
    vty = v.type
    fn = declare(builder, f"llvm.experimental.vector.compress.v{vty.count}f32", vty,
                 [vty, ir.VectorType(ir.IntType(1), vty.count), vty])
    return builder.call(fn, [v, mask, ir.Constant(vty, ir.Undefined)])


def table_permute(builder, v, mask, table):
    """:func:`compress` of 8 lanes as AVX2's ``vpermps`` by the row of ``table``
    (:data:`.ties_kth.LANE_TABLE`, a pointer to its int32s) that the mask picks. LLVM's own
    expansion of ``vector.compress`` there (a store per lane, each behind an extract) made the
    threshold pass 2.9x slower (88 against 30 ms per 16.8 M-element key and 4 models on a Zen 3)."""
    ity, i64 = ir.VectorType(ir.IntType(32), 8), ir.IntType(64)
    row = builder.mul(builder.zext(builder.bitcast(mask, ir.IntType(8)), i64), ir.Constant(i64, 8))
    perm = builder.load(builder.bitcast(builder.gep(table, [row]), ity.as_pointer()), align=4)
    return builder.call(declare(builder, "llvm.x86.avx2.permps", v.type, [v.type, ity]), [v, perm])


def count(builder, mask):
    """How many lanes of the i1 vector ``mask`` are set, as an i64 (a popcount of its bits)."""
    mask_t = ir.IntType(mask.type.count)
    pop = declare(builder, f"llvm.ctpop.i{mask_t.width}", mask_t, [mask_t])
    return builder.zext(builder.call(pop, [builder.bitcast(mask, mask_t)]), ir.IntType(64))
