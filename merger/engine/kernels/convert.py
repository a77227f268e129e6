"""Exact conversions between the stored formats and float32, as numba intrinsics whose LLVM
vectorizes: the value's numpy view names its format (float16 as uint16, bfloat16 as int16,
float32 as itself; :func:`..as_numpy`)."""
from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import host_features


def _hardware_half() -> bool:
    """Whether the CPU numba compiles for converts float16 in hardware, in vectors: x86 with F16C
    (``vcvtph2ps``/``vcvtps2ph``, every x86 CPU since 2012), and ARM64. Then LLVM's own
    ``fpext``/``fptrunc`` are used: one instruction per 16 values instead of a dozen integer
    operations (TIES's combination: 1.5x faster here). Elsewhere, and where ``NUMBA_CPU_NAME``
    names another CPU, the integer versions below (LLVM would call a library routine per value)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return "f16c" in host_features()


HARDWARE_HALF = _hardware_half()
# numba's on-disk cache of a kernel is keyed on its own file and the CPU, not on this module:
# after changing a conversion here, touch the kernel modules (or delete their __pycache__).


def _const(ty, v):
    """The constant ``v`` of the integer or float type ``ty``, splat where ``ty`` is a vector."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [v] * ty.count)
    return ir.Constant(ty, v)


def _like(ty, element):
    """``element`` as a vector of ``ty``'s lanes where ``ty`` is a vector, else itself."""
    return ir.VectorType(element, ty.count) if isinstance(ty, ir.VectorType) else element


def to_float32(builder, x, kind):
    """float32 of a stored value, or of a vector of them (:func:`f32`'s conversion, for
    intrinsics that load a vector of values themselves): ``kind`` is the numba type of the
    value's numpy view (uint16 = float16 bits, int16 = bfloat16 bits, float32)."""
    i32, f32t = _like(x.type, ir.IntType(32)), _like(x.type, ir.FloatType())

    def const(v):
        return _const(i32, v)
    if kind == types.uint16 and HARDWARE_HALF:
        return builder.fpext(builder.bitcast(x, _like(x.type, ir.HalfType())), f32t)
    if kind == types.uint16:
        h = builder.zext(x, i32)
        em = builder.and_(h, const(0x7FFF))
        sh = builder.shl(em, const(13))
        normal = builder.add(sh, const((127 - 15) << 23))
        special = builder.or_(sh, const(0x7F800000))
        bits = builder.select(builder.icmp_unsigned(">=", em, const(0x7C00)), special, normal)
        sub = builder.fmul(builder.uitofp(em, f32t), _const(f32t, 2.0 ** -24))
        mag = builder.select(builder.icmp_unsigned("<", em, const(0x400)), builder.bitcast(sub, i32), bits)
        sign = builder.shl(builder.and_(h, const(0x8000)), const(16))
        return builder.bitcast(builder.or_(mag, sign), f32t)
    if kind == types.int16:
        return builder.bitcast(builder.shl(builder.zext(x, i32), const(16)), f32t)
    return x


@intrinsic
def f32(typingctx, x):
    """float32 of one stored value: uint16 = float16 bits, int16 = bfloat16 bits (the high
    half of a float32), float32 unchanged. Exact for every value (subnormals, inf, NaN).

    Float16 is LLVM's ``fpext half`` where :data:`HARDWARE_HALF` (``vcvtph2ps``, 16 values per
    instruction). Elsewhere it is widened with integer operations and selects, which LLVM
    vectorizes (there, ``fpext`` becomes a library call per value, 6x slower). Normal values move
    their exponent and mantissa into float32's fields, subnormals are m·2⁻²⁴ (an exact int
    to float conversion and scaling, no subnormal arithmetic, so immune to flush-to-zero),
    inf and NaN keep their payload under an all-ones exponent."""
    if x not in (types.uint16, types.int16, types.float32):
        return None

    def gen(context, builder, sig, args):
        return to_float32(builder, args[0], x)
    return types.float32(x), gen


def _f16_bits(builder, v):
    """float32 ``v`` (or a vector of them) → float16 bits (i16), round to nearest even as torch:
    F. Giesen's branch-free float_to_half_fast3_rtne (overflow → ±inf, NaN → 0x7E00, subnormal
    halves by one float addition of 0.5, which leaves the rounded mantissa in the low bits)."""
    i32, f32t = _like(v.type, ir.IntType(32)), v.type

    def const(x):
        return _const(i32, x)
    u0 = builder.bitcast(v, i32)
    sign = builder.and_(u0, const(0x80000000))
    u = builder.xor(u0, sign)
    big = builder.select(builder.icmp_unsigned(">", u, const(0x7F800000)), const(0x7E00), const(0x7C00))
    tiny = builder.sub(builder.bitcast(builder.fadd(builder.bitcast(u, f32t), _const(f32t, 0.5)), i32),
                       const(0x3F000000))
    odd = builder.and_(builder.lshr(u, const(13)), const(1))
    normal = builder.lshr(builder.add(builder.add(u, const(0xC8000FFF)), odd), const(13))
    o = builder.select(builder.icmp_unsigned("<", u, const(0x38800000)), tiny, normal)
    o = builder.select(builder.icmp_unsigned(">=", u, const(0x47800000)), big, o)
    return builder.trunc(builder.or_(o, builder.lshr(sign, const(16))), _like(v.type, ir.IntType(16)))


def _f16_hw(builder, v):
    """float32 ``v`` (or a vector) → float16 bits by LLVM's ``fptrunc`` (``vcvtps2ph``: round to
    nearest even, overflow → ±inf, NaN stays NaN), where :data:`HARDWARE_HALF`."""
    return builder.bitcast(builder.fptrunc(v, _like(v.type, ir.HalfType())), _like(v.type, ir.IntType(16)))


def _bf16_bits(builder, v):
    """float32 ``v`` (or a vector) → bfloat16 bits (i16), round to nearest even as torch; NaN → 0x7FC0."""
    i32 = _like(v.type, ir.IntType(32))
    u = builder.bitcast(v, i32)
    odd = builder.and_(builder.lshr(u, _const(i32, 16)), _const(i32, 1))
    r = builder.lshr(builder.add(builder.add(u, _const(i32, 0x7FFF)), odd), _const(i32, 16))
    r = builder.select(builder.fcmp_unordered("uno", v, v), _const(i32, 0x7FC0), r)
    return builder.trunc(r, _like(v.type, ir.IntType(16)))


def from_float32(builder, v, kind):
    """A float32 value or vector as ``kind``'s stored format (the numba type of the output view's
    dtype: uint16 = float16 bits, int16 = bfloat16 bits, float32), rounded as torch's
    ``.to(dtype)``: :func:`narrow`'s conversion, for intrinsics that store vectors themselves."""
    if kind == types.uint16:
        return (_f16_hw if HARDWARE_HALF else _f16_bits)(builder, v)
    if kind == types.int16:
        return _bf16_bits(builder, v)
    return v


@intrinsic
def narrow(typingctx, v, out):
    """float32 ``v`` as a value of the array ``out``'s format (its numpy view's dtype: uint16 =
    float16 bits, int16 = bfloat16 bits, float32), rounded as torch's ``.to(dtype)``."""
    if v != types.float32 or not isinstance(out, types.Array):
        return None
    kind = out.dtype
    if kind not in (types.uint16, types.int16, types.float32):
        return None

    def gen(context, builder, sig, args):
        return from_float32(builder, args[0], kind)
    return kind(v, out), gen


@intrinsic
def bits(typingctx, x):
    """The bit pattern of a float32 as a uint32 (a non-negative float orders as its pattern)."""
    if x != types.float32:
        return None

    def gen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(x), gen



@njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
def widen(x, out):
    """out[j] = float32 of the stored x[j] (a block of BASE, converted once for every model)."""
    for j in range(x.size):
        out[j] = f32(x[j])
