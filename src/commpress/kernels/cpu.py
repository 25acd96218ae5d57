"""CPU codec kernels, compiled with numba (LLVM) on first use and cached on disk.

Each kernel is one pass over its input: a block of ``block`` elements is read
once into L1 (its absmax is an integer max over the bit patterns, which also
tells whether the block holds NaN/Inf), then scaled, rounded and packed, and
the next block follows. Decoders write into the caller's float32 buffer,
optionally adding to it (decode-and-accumulate for reductions).

Every kernel computes exactly what the reference implementation in
``commpress.codecs`` computes, in the same float32 operations and order, so
the outputs agree bit for bit; the one exception is the ``sign`` scale (a
float64 sum whose order differs), which agrees within one float32 ulp. The
tests hold both to that (``tests/test_kernels.py``).

How the loops are written, and why (each measured; see the package docstring):

- full blocks are rows of 2-D views made once per call, indexed ``x2[b, i]``:
  LLVM vectorizes a row loop whose index is provably non-negative, and a view
  per block would cost more than the work in a 128-element block. The short
  last block goes through the same inlined block function on a ``(1, n)``
  view.
- float32 <-> uint32 reinterpretation is an LLVM ``bitcast`` (`f2u`, `u2f`),
  which vectorizes; numpy's ``.view`` of a scratch array does not.
- branches are written as selects (``a if c else b``) over values computed
  unconditionally, so that the loops stay vectorizable.

Arrays are numpy views of torch tensors (shared memory, no copies): float32
inputs, ``uint8`` codes, ``float32`` scales, all 1-D and contiguous. The
kernels release the GIL (``nogil``), so the engine's worker threads run them
concurrently with Python.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_JIT = {"nogil": True, "cache": True, "boundscheck": False, "error_model": "numpy"}
#: Per-block helpers are inlined into the kernels at numba IR level.
_INLINE = {**_JIT, "inline": "always"}

ABS = np.uint32(0x7FFFFFFF)
INF_BITS = np.uint32(0x7F800000)
FLOOR = np.float32(2.0**-100)
FMAX = np.float32(3.4028234663852886e38)
NAN = np.float32(np.nan)


@intrinsic
def f2u(typingctx, x):  # noqa: ARG001 - numba's intrinsic signature
    """The bit pattern of a float32, as uint32 (an LLVM bitcast)."""

    def codegen(context, builder, sig, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def u2f(typingctx, x):  # noqa: ARG001
    """The float32 with a given bit pattern (an LLVM bitcast)."""

    def codegen(context, builder, sig, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(**_INLINE)
def _absmax(x2, b, ln):
    """(finite absmax of row ``b`` as float32, whether the row is all finite)."""
    m = np.uint32(0)
    for i in range(ln):
        v = f2u(x2[b, i]) & ABS
        m = v if v > m else m
    finite = m < INF_BITS
    if not finite:
        # Integer max of |x|'s bits is ordered like the floats for finite values and
        # >= INF_BITS exactly when the row holds a NaN or an Inf: recount without them.
        m = np.uint32(0)
        for i in range(ln):
            v = f2u(x2[b, i]) & ABS
            m = v if (v > m) & (v < INF_BITS) else m
    return u2f(m), finite


@njit(**_INLINE)
def _sat(v):
    # Saturate a finite product that rounded past float32's range (a block whose absmax
    # is near float32's max); comparisons are false for NaN, which passes through.
    v = FMAX if v > FMAX else v
    return -FMAX if v < -FMAX else v


# ------------------------------------------------------- integer quantization
@njit(**_INLINE)
def _quant_block(x2, c2, b, ln, bits, q):
    """Quantize row ``b`` (``ln`` elements) into the bytes of row ``b`` of ``c2``;
    returns the stored scale (negated when the row held NaN/Inf)."""
    per = 8 // bits
    lv = (1 << (bits - 1)) - 1
    flv = np.float32(lv)
    off = flv + np.float32(1.5)
    amax, finite = _absmax(x2, b, ln)
    amax = max(amax, FLOOR)
    inv = flv / amax
    step = amax / flv
    if finite and ln % per == 0:
        if bits == 8:
            for i in range(ln):
                v = x2[b, i] * inv
                c2[b, i] = np.uint8(np.int32(v + off))
        elif bits == 4:
            for j in range(ln // 2):
                v0 = x2[b, 2 * j] * inv
                v1 = x2[b, 2 * j + 1] * inv
                c2[b, j] = np.uint8(np.int32(v0 + off) | (np.int32(v1 + off) << 4))
        else:
            for j in range(ln // 4):
                v0 = x2[b, 4 * j] * inv
                v1 = x2[b, 4 * j + 1] * inv
                v2 = x2[b, 4 * j + 2] * inv
                v3 = x2[b, 4 * j + 3] * inv
                c2[b, j] = np.uint8(
                    np.int32(v0 + off)
                    | (np.int32(v1 + off) << 2)
                    | (np.int32(v2 + off) << 4)
                    | (np.int32(v3 + off) << 6)
                )
        return step
    # NaN/Inf take the reserved code 0; also a short block that ends inside a byte
    # (the unused high bits of its last byte are zero).
    for i in range(ln):
        v = x2[b, i] * inv
        code = np.uint8(np.int32(v + off))
        q[i] = code if (f2u(x2[b, i]) & ABS) < INF_BITS else np.uint8(0)
    for j in range((ln + per - 1) // per):
        word = 0
        for k in range(per):
            i = j * per + k
            if i < ln:
                word |= np.int32(q[i]) << (bits * k)
        c2[b, j] = np.uint8(word)
    return step if finite else -step


@njit(**_INLINE)
def _quant_row_roundtrip(x2, c2, b, ln, bits, q, roundtrip):
    sc = _quant_block(x2, c2, b, ln, bits, q)
    if roundtrip:
        # Overwrite the row (still in L1) with what a receiver decodes from its codes.
        _dequant_block(c2, x2, b, ln, abs(sc), bits, False)
        if sc < 0:
            _mark_nan(c2, x2, b, ln, bits)
    return sc


@njit(**_JIT)
def quant_encode(x, codes, scales, block, bits, roundtrip):
    """Block absmax quantization of float32 ``x`` into packed offset-binary codes.

    Requires ``block % (8 // bits) == 0`` (the caller checks), so every block starts
    on a byte boundary. ``roundtrip``: also overwrite ``x`` with its decoded value
    (``decode(encode(x))``) in the same pass.
    """
    n = x.shape[0]
    per = 8 // bits
    q = np.empty(block, np.uint8)
    nfull = n // block
    x2 = x[: nfull * block].reshape(nfull, block)
    c2 = codes[: nfull * (block // per)].reshape(nfull, block // per)
    for b in range(nfull):
        scales[b] = _quant_row_roundtrip(x2, c2, b, block, bits, q, roundtrip)
    tail = n - nfull * block
    if tail:
        xt = x[nfull * block :].reshape(1, tail)
        ct = codes[nfull * (block // per) :].reshape(1, -1)
        scales[nfull] = _quant_row_roundtrip(xt, ct, 0, tail, bits, q, roundtrip)


@njit(**_INLINE)
def _dequant(c, base, sc):
    return _sat((np.float32(c) - base) * sc)


@njit(**_INLINE)
def _dequant_block(c2, o2, b, ln, sc, bits, accumulate):
    """Decode row ``b`` of ``c2`` into row ``b`` of ``o2``; one loop per (bits,
    accumulate) so that each vectorizes."""
    per = 8 // bits
    base = np.float32(1 << (bits - 1))
    full = ln // per
    if bits == 8:
        if accumulate:
            for i in range(ln):
                o2[b, i] += _dequant(c2[b, i], base, sc)
        else:
            for i in range(ln):
                o2[b, i] = _dequant(c2[b, i], base, sc)
    elif bits == 4:
        if accumulate:
            for j in range(full):
                w = np.int32(c2[b, j])
                o2[b, 2 * j] += _dequant(w & 15, base, sc)
                o2[b, 2 * j + 1] += _dequant(w >> 4, base, sc)
        else:
            for j in range(full):
                w = np.int32(c2[b, j])
                o2[b, 2 * j] = _dequant(w & 15, base, sc)
                o2[b, 2 * j + 1] = _dequant(w >> 4, base, sc)
    else:
        if accumulate:
            for j in range(full):
                w = np.int32(c2[b, j])
                o2[b, 4 * j] += _dequant(w & 3, base, sc)
                o2[b, 4 * j + 1] += _dequant((w >> 2) & 3, base, sc)
                o2[b, 4 * j + 2] += _dequant((w >> 4) & 3, base, sc)
                o2[b, 4 * j + 3] += _dequant(w >> 6, base, sc)
        else:
            for j in range(full):
                w = np.int32(c2[b, j])
                o2[b, 4 * j] = _dequant(w & 3, base, sc)
                o2[b, 4 * j + 1] = _dequant((w >> 2) & 3, base, sc)
                o2[b, 4 * j + 2] = _dequant((w >> 4) & 3, base, sc)
                o2[b, 4 * j + 3] = _dequant(w >> 6, base, sc)
    mask = (1 << bits) - 1
    for i in range(full * per, ln):  # a short last block
        v = _dequant((np.int32(c2[b, i // per]) >> (bits * (i % per))) & mask, base, sc)
        if accumulate:
            o2[b, i] += v
        else:
            o2[b, i] = v


@njit(**_INLINE)
def _mark_nan(c2, o2, b, ln, bits):
    # The reserved code 0 of a flagged block decodes to NaN.
    per = 8 // bits
    mask = (1 << bits) - 1
    for i in range(ln):
        if (np.int32(c2[b, i // per]) >> (bits * (i % per))) & mask == 0:
            o2[b, i] = NAN


@njit(**_JIT)
def quant_decode(codes, scales, out, block, bits, accumulate):
    """Inverse of `quant_encode` into float32 ``out`` (``out += decoded`` if accumulate)."""
    n = out.shape[0]
    per = 8 // bits
    nfull = n // block
    o2 = out[: nfull * block].reshape(nfull, block)
    c2 = codes[: nfull * (block // per)].reshape(nfull, block // per)
    for b in range(nfull):
        sc = scales[b]
        _dequant_block(c2, o2, b, block, abs(sc), bits, accumulate)
        if sc < 0:
            _mark_nan(c2, o2, b, block, bits)
    tail = n - nfull * block
    if tail:
        ot = out[nfull * block :].reshape(1, tail)
        ct = codes[nfull * (block // per) :].reshape(1, -1)
        sc = scales[nfull]
        _dequant_block(ct, ot, 0, tail, abs(sc), bits, accumulate)
        if sc < 0:
            _mark_nan(ct, ot, 0, tail, bits)


# ---------------------------------------------------------------------- fp8
@njit(**_INLINE)
def _fp8_block(x2, c2, b, ln, fp8_max, mbits, ebias, pow2):
    """Round row ``b`` scaled by its absmax to fp8 codes (nearest even, like torch's
    cast); returns the scale."""
    amax, finite = _absmax(x2, b, ln)
    sc = max(amax, FLOOR) / np.float32(fp8_max)
    if pow2:
        # The smallest power of two >= sc (a positive normal float32), on its bits.
        w = f2u(sc)
        if w & np.uint32(0x007FFFFF):
            sc = u2f((w & INF_BITS) + np.uint32(0x00800000))
    inv = np.float32(1.0) / sc
    shift = np.uint32(23 - mbits)
    half = np.uint32((1 << (22 - mbits)) - 1)
    rebias = np.uint32((127 - ebias) << 23)
    min_normal = np.uint32((128 - ebias) << 23)  # 2**(1 - ebias)
    # A float32 whose ulp is fp8's smallest subnormal: |q| + it rounds |q| (nearest
    # even) to a whole number of subnormal steps, read off its low bits.
    denorm_bits = np.uint32((127 + 23 + 1 - ebias - mbits) << 23)
    denorm = u2f(denorm_bits)
    has_inf = mbits == 2
    max_code = np.uint32(0x7B if has_inf else 0x7E)
    for i in range(ln):
        q = x2[b, i] * inv
        w = f2u(q)
        a = w & ABS
        sign = (w >> np.uint32(24)) & np.uint32(0x80)
        sub = f2u(abs(q) + denorm) - denorm_bits
        r = (a - rebias + half + ((a >> shift) & np.uint32(1))) >> shift
        r = r if r < max_code else max_code
        c2[b, i] = np.uint8((sub if a < min_normal else r) | sign)
    if not finite:
        for i in range(ln):
            w = f2u(x2[b, i])
            a = w & ABS
            if a >= INF_BITS:
                if has_inf:
                    sign = (w >> np.uint32(24)) & np.uint32(0x80)
                    c2[b, i] = np.uint8((0x7C if a == INF_BITS else 0x7F) | sign)
                else:
                    c2[b, i] = np.uint8(0x7F)  # e4m3fn: NaN and +-Inf, one positive NaN
    return sc


@njit(**_JIT)
def fp8_encode(x, codes, scales, block, fp8_max, mbits, ebias, pow2, table, limit, roundtrip):
    """Scale each block so its absmax maps to ``fp8_max`` and round to fp8 (nearest even).

    ``mbits``/``ebias``: 3/7 for e4m3fn (no Inf: NaN and Inf become the NaN code 0x7F),
    2/15 for e5m2 (Inf kept as 0x7C, NaN as 0x7F). Bit-compatible with torch's cast.
    ``roundtrip``: also overwrite ``x`` with ``decode(encode(x))`` (``table``/``limit``
    as in `fp8_decode`) in the same pass.
    """
    n = x.shape[0]
    nfull = n // block
    x2 = x[: nfull * block].reshape(nfull, block)
    c2 = codes[: nfull * block].reshape(nfull, block)
    for b in range(nfull):
        sc = _fp8_block(x2, c2, b, block, fp8_max, mbits, ebias, pow2)
        scales[b] = sc
        if roundtrip:
            _fp8_decode_block(c2, x2, b, block, table, limit, sc, False)
    tail = n - nfull * block
    if tail:
        xt = x[nfull * block :].reshape(1, tail)
        ct = codes[nfull * block :].reshape(1, tail)
        sc = _fp8_block(xt, ct, 0, tail, fp8_max, mbits, ebias, pow2)
        scales[nfull] = sc
        if roundtrip:
            _fp8_decode_block(ct, xt, 0, tail, table, limit, sc, False)


@njit(**_INLINE)
def _fp8_decode_block(c2, o2, b, ln, table, limit, sc, accumulate):
    if accumulate:
        for i in range(ln):
            c = c2[b, i]
            v = table[c] * sc
            o2[b, i] += v if abs(v) <= FMAX else limit[c]
    else:
        for i in range(ln):
            c = c2[b, i]
            v = table[c] * sc
            o2[b, i] = v if abs(v) <= FMAX else limit[c]


@njit(**_JIT)
def fp8_decode(codes, scales, table, limit, out, block, accumulate):
    """``table[code] * scale`` into float32 ``out``; a finite code never decodes to Inf.

    ``limit[code]`` is what a product past float32's range becomes: +-float32 max for
    finite codes, the code's own value for +-Inf and NaN.
    """
    n = out.shape[0]
    nfull = n // block
    o2 = out[: nfull * block].reshape(nfull, block)
    c2 = codes[: nfull * block].reshape(nfull, block)
    for b in range(nfull):
        _fp8_decode_block(c2, o2, b, block, table, limit, scales[b], accumulate)
    tail = n - nfull * block
    if tail:
        ot = out[nfull * block :].reshape(1, tail)
        ct = codes[nfull * block :].reshape(1, tail)
        _fp8_decode_block(ct, ot, 0, tail, table, limit, scales[nfull], accumulate)


# --------------------------------------------------------------------- sign
@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"})
def _abs_sum64(x2, b, ln):
    # float64 accumulation (reassociated so that it vectorizes; within a float32 ulp of
    # torch's float64 sum after the final rounding).
    acc = 0.0
    for i in range(ln):
        acc += abs(np.float64(x2[b, i]))
    return acc


@njit(**_JIT)
def sign_encode(x, bits_out, scales, block):
    """One bit per element (set for ``x < 0``) and the float64-summed mean ``|x|`` per block."""
    n = x.shape[0]
    nfull = n // block
    x2 = x[: nfull * block].reshape(nfull, block)
    for b in range(nfull):
        scales[b] = np.float32(_abs_sum64(x2, b, block) / block)
    tail = n - nfull * block
    if tail:
        xt = x[nfull * block :].reshape(1, tail)
        scales[nfull] = np.float32(_abs_sum64(xt, 0, tail) / tail)
    full = n // 8
    x8 = x[: full * 8].reshape(full, 8)
    for j in range(full):
        word = np.uint32(0)
        for k in range(8):
            word |= np.uint32(x8[j, k] < 0) << np.uint32(k)
        bits_out[j] = np.uint8(word)
    if n % 8:
        word = 0
        for i in range(full * 8, n):
            if x[i] < 0:
                word |= 1 << (i - full * 8)
        bits_out[full] = np.uint8(word)


@njit(**_INLINE)
def _sign_block(b8, o2, b, ln, sc, accumulate):
    # Row ``b``: ``ln`` elements (a multiple of 8) from the bytes of row ``b`` of ``b8``.
    for j in range(ln // 8):
        w = np.int32(b8[b, j])
        for k in range(8):
            v = -sc if (w >> k) & 1 else sc
            if accumulate:
                o2[b, 8 * j + k] += v
            else:
                o2[b, 8 * j + k] = v


@njit(**_JIT)
def sign_decode(bits_in, scales, out, block, accumulate):
    """``-scale`` where the bit is set, ``+scale`` elsewhere, into float32 ``out``."""
    n = out.shape[0]
    start = 0
    if block % 8 == 0:
        nfull = n // block
        o2 = out[: nfull * block].reshape(nfull, block)
        b8 = bits_in[: nfull * (block // 8)].reshape(nfull, block // 8)
        for b in range(nfull):
            _sign_block(b8, o2, b, block, scales[b], accumulate)
        start = nfull * block
    for i in range(start, n):  # the last block, or every block when block % 8 != 0
        sc = scales[i // block]
        v = -sc if (bits_in[i >> 3] >> (i & 7)) & 1 else sc
        if accumulate:
            out[i] += v
        else:
            out[i] = v


# --------------------------------------------------------------------- bf16
@njit(**_JIT)
def bf16_encode(x, out16, roundtrip):
    """float32 -> bfloat16 bit patterns, round to nearest even, saturating finite values.

    NaN becomes the quiet NaN ``0xFFFF`` that torch's cast produces. ``roundtrip``: also
    overwrite ``x`` with the bfloat16 value (exact in float32).
    """
    for i in range(x.shape[0]):
        w = f2u(x[i])
        a = w & ABS
        r = (w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        # A finite value that rounded up to Inf becomes the largest finite bfloat16.
        over = ((r & np.uint32(0x7FFF)) == np.uint32(0x7F80)) & (a < INF_BITS)
        r = r - (np.uint32(1) if over else np.uint32(0))
        r = np.uint32(0xFFFF) if a > INF_BITS else r
        out16[i] = np.uint16(r)
        if roundtrip:
            x[i] = u2f(r << np.uint32(16))


@njit(**_JIT)
def bf16_decode(in16, out, accumulate):
    """bfloat16 bit patterns -> float32 ``out`` (exact), or added to it."""
    if accumulate:
        for i in range(out.shape[0]):
            out[i] += u2f(np.uint32(in16[i]) << np.uint32(16))
    else:
        for i in range(out.shape[0]):
            out[i] = u2f(np.uint32(in16[i]) << np.uint32(16))
