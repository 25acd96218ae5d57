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

Arrays are numpy views of torch tensors (shared memory, no copies): float32
inputs, ``uint8`` codes, ``float32`` scales, all 1-D and contiguous. The
kernels release the GIL (``nogil``), so the engine's worker threads run them
concurrently with Python.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"nogil": True, "cache": True, "boundscheck": False, "error_model": "numpy"}
#: Helpers called once per block are inlined into the kernel at numba IR level.
_INLINE = {**_JIT, "inline": "always"}

ABS = np.uint32(0x7FFFFFFF)
INF_BITS = np.uint32(0x7F800000)
FLOOR = np.float32(2.0**-100)
FMAX = np.float32(3.4028234663852886e38)
NAN = np.float32(np.nan)
MAGIC = np.float32(2.0**23)


# ------------------------------------------------------------------ helpers
@njit(**_INLINE)
def _absmax_bits(xb):
    # Integer max of |x|'s bit pattern: ordered like the floats for finite values, and
    # >= INF_BITS exactly when the block holds a NaN or an Inf.
    m = np.uint32(0)
    for i in range(xb.shape[0]):
        v = xb[i] & ABS
        m = v if v > m else m
    return m


@njit(**_INLINE)
def _finite_absmax_bits(xb):
    m = np.uint32(0)
    for i in range(xb.shape[0]):
        v = xb[i] & ABS
        if v < INF_BITS and v > m:
            m = v
    return m


@njit(**_INLINE)
def _block_absmax(xb, bits1, f1):
    """(finite absmax as float32, whether the block is all finite)."""
    m = _absmax_bits(xb)
    finite = m < INF_BITS
    if not finite:
        m = _finite_absmax_bits(xb)
    bits1[0] = m
    return f1[0], finite


# ------------------------------------------------------- integer quantization
# The full blocks are walked as rows of 2-D views (made once per call): LLVM
# vectorizes row loops of known length, and per-block slicing would cost more
# than the work in a 128-element block. The short last block takes the
# generic path.


@njit(**_INLINE)
def _quant_row(xs, xbs, cs, q, inv, off, bits, finite):
    """Codes of one block: ``xs`` float32 values, ``xbs`` their bits, into bytes ``cs``."""
    ln = xs.shape[0]
    per = 8 // bits
    if finite and ln % per == 0:
        if bits == 8:
            for i in range(ln):
                v = xs[i] * inv
                cs[i] = np.uint8(np.int32(v + off))
        elif bits == 4:
            for j in range(ln // 2):
                v0 = xs[2 * j] * inv
                v1 = xs[2 * j + 1] * inv
                cs[j] = np.uint8(np.int32(v0 + off) | (np.int32(v1 + off) << 4))
        else:
            for j in range(ln // 4):
                v0 = xs[4 * j] * inv
                v1 = xs[4 * j + 1] * inv
                v2 = xs[4 * j + 2] * inv
                v3 = xs[4 * j + 3] * inv
                cs[j] = np.uint8(
                    np.int32(v0 + off)
                    | (np.int32(v1 + off) << 2)
                    | (np.int32(v2 + off) << 4)
                    | (np.int32(v3 + off) << 6)
                )
        return
    # NaN/Inf take the reserved code 0; also a short block that ends inside a byte.
    for i in range(ln):
        if xbs[i] & ABS >= INF_BITS:
            q[i] = 0
        else:
            v = xs[i] * inv
            q[i] = np.uint8(np.int32(v + off))
    for j in range((ln + per - 1) // per):
        word = 0
        for k in range(per):
            i = j * per + k
            if i < ln:
                word |= np.int32(q[i]) << (bits * k)
        cs[j] = np.uint8(word)


@njit(**_JIT)
def quant_encode(x, codes, scales, block, bits):
    """Block absmax quantization of float32 ``x`` into packed offset-binary codes.

    Requires ``block % (8 // bits) == 0`` (the caller checks), so every block starts
    on a byte boundary.
    """
    n = x.shape[0]
    per = 8 // bits
    lv = (1 << (bits - 1)) - 1
    flv = np.float32(lv)
    off = np.float32(lv) + np.float32(1.5)
    bits1 = np.empty(1, np.uint32)
    f1 = bits1.view(np.float32)
    q = np.empty(block, np.uint8)
    nfull = n // block
    x2 = x[: nfull * block].reshape(nfull, block)
    xb2 = x2.view(np.uint32)
    c2 = codes[: nfull * (block // per)].reshape(nfull, block // per)
    bpb = block // per
    for b in range(nfull):
        # The common case is written out on 2-D indices (no per-block views).
        m = np.uint32(0)
        for i in range(block):
            v = xb2[b, i] & ABS
            m = v if v > m else m
        finite = m < INF_BITS
        if not finite:
            m = _finite_absmax_bits(xb2[b])
        bits1[0] = m
        amax = max(f1[0], FLOOR)
        inv = flv / amax
        if not finite:
            _quant_row(x2[b], xb2[b], c2[b], q, inv, off, bits, False)
        elif bits == 8:
            for i in range(block):
                v = x2[b, i] * inv
                c2[b, i] = np.uint8(np.int32(v + off))
        elif bits == 4:
            for j in range(bpb):
                v0 = x2[b, 2 * j] * inv
                v1 = x2[b, 2 * j + 1] * inv
                c2[b, j] = np.uint8(np.int32(v0 + off) | (np.int32(v1 + off) << 4))
        else:
            for j in range(bpb):
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
        step = amax / flv
        scales[b] = step if finite else -step
    if n > nfull * block:
        s = nfull * block
        xs = x[s:]
        xbs = xs.view(np.uint32)
        amax, finite = _block_absmax(xbs, bits1, f1)
        amax = max(amax, FLOOR)
        _quant_row(xs, xbs, codes[s // per :], q, flv / amax, off, bits, finite)
        step = amax / flv
        scales[nfull] = step if finite else -step


@njit(**_INLINE)
def _sat(v):
    # Saturate a finite product that rounded past float32's range (a block whose absmax
    # is near float32's max); comparisons are false for NaN, which passes through.
    if v > FMAX:
        return FMAX
    if v < -FMAX:
        return -FMAX
    return v


@njit(**_INLINE)
def _dequant(c, base, sc):
    return _sat((np.float32(c) - base) * sc)


@njit(**_INLINE)
def _dequant_row(cs, os, sc, base, bits, accumulate):
    """Decode one block's codes ``cs`` into ``os``; one loop per (bits, accumulate) so
    that LLVM vectorizes each."""
    ln = os.shape[0]
    per = 8 // bits
    full = ln // per
    if bits == 8:
        if accumulate:
            for i in range(ln):
                os[i] += _dequant(cs[i], base, sc)
        else:
            for i in range(ln):
                os[i] = _dequant(cs[i], base, sc)
    elif bits == 4:
        if accumulate:
            for j in range(full):
                w = np.int32(cs[j])
                os[2 * j] += _dequant(w & 15, base, sc)
                os[2 * j + 1] += _dequant(w >> 4, base, sc)
        else:
            for j in range(full):
                w = np.int32(cs[j])
                os[2 * j] = _dequant(w & 15, base, sc)
                os[2 * j + 1] = _dequant(w >> 4, base, sc)
    else:
        if accumulate:
            for j in range(full):
                w = np.int32(cs[j])
                os[4 * j] += _dequant(w & 3, base, sc)
                os[4 * j + 1] += _dequant((w >> 2) & 3, base, sc)
                os[4 * j + 2] += _dequant((w >> 4) & 3, base, sc)
                os[4 * j + 3] += _dequant(w >> 6, base, sc)
        else:
            for j in range(full):
                w = np.int32(cs[j])
                os[4 * j] = _dequant(w & 3, base, sc)
                os[4 * j + 1] = _dequant((w >> 2) & 3, base, sc)
                os[4 * j + 2] = _dequant((w >> 4) & 3, base, sc)
                os[4 * j + 3] = _dequant(w >> 6, base, sc)
    if bits != 8:
        mask = (1 << bits) - 1
        for i in range(full * per, ln):  # a short last block
            v = _dequant((np.int32(cs[i // per]) >> (bits * (i % per))) & mask, base, sc)
            if accumulate:
                os[i] += v
            else:
                os[i] = v


@njit(**_INLINE)
def _mark_nan(cs, os, bits):
    # The reserved code 0 of a flagged block decodes to NaN.
    per = 8 // bits
    mask = (1 << bits) - 1
    for i in range(os.shape[0]):
        if (np.int32(cs[i // per]) >> (bits * (i % per))) & mask == 0:
            os[i] = NAN


@njit(**_JIT)
def quant_decode(codes, scales, out, block, bits, accumulate):
    """Inverse of `quant_encode` into float32 ``out`` (``out += decoded`` if accumulate)."""
    n = out.shape[0]
    per = 8 // bits
    base = np.float32(1 << (bits - 1))
    nfull = n // block
    o2 = out[: nfull * block].reshape(nfull, block)
    c2 = codes[: nfull * (block // per)].reshape(nfull, block // per)
    bpb = block // per
    for b in range(nfull):
        sc = scales[b]
        if sc < 0:
            _dequant_row(c2[b], o2[b], -sc, base, bits, accumulate)
            _mark_nan(c2[b], o2[b], bits)
            continue
        # The common cases are written out on 2-D indices (no per-block views).
        if bits == 8:
            if accumulate:
                for i in range(block):
                    o2[b, i] += _dequant(c2[b, i], base, sc)
            else:
                for i in range(block):
                    o2[b, i] = _dequant(c2[b, i], base, sc)
        elif bits == 4:
            if accumulate:
                for j in range(bpb):
                    w = np.int32(c2[b, j])
                    o2[b, 2 * j] += _dequant(w & 15, base, sc)
                    o2[b, 2 * j + 1] += _dequant(w >> 4, base, sc)
            else:
                for j in range(bpb):
                    w = np.int32(c2[b, j])
                    o2[b, 2 * j] = _dequant(w & 15, base, sc)
                    o2[b, 2 * j + 1] = _dequant(w >> 4, base, sc)
        else:
            _dequant_row(c2[b], o2[b], sc, base, bits, accumulate)
    if n > nfull * block:
        s = nfull * block
        sc = scales[nfull]
        _dequant_row(codes[s // per :], out[s:], abs(sc), base, bits, accumulate)
        if sc < 0:
            _mark_nan(codes[s // per :], out[s:], bits)


# ---------------------------------------------------------------------- fp8
@njit(**_INLINE)
def _pow2_ceil_bits(s_bits):
    # Smallest power of two >= a positive normal float32, on its bit pattern.
    if s_bits & np.uint32(0x007FFFFF):
        return (s_bits & np.uint32(0x7F800000)) + np.uint32(0x00800000)
    return s_bits


@njit(**_INLINE)
def _fp8_row(xs, xbs, cs, qf, tf, sc, mbits, ebias, denorm, finite):
    """Round one block ``xs / sc`` to fp8 codes ``cs`` (nearest even, like torch's cast)."""
    ln = xs.shape[0]
    qb = qf.view(np.uint32)
    tb = tf.view(np.uint32)
    shift = 23 - mbits
    half = np.uint32((1 << (shift - 1)) - 1)
    rebias = np.uint32((127 - ebias) << 23)
    min_normal_bits = np.uint32((128 - ebias) << 23)  # 2**(1 - ebias)
    denorm_bits = np.uint32((127 + 23 + 1 - ebias - mbits) << 23)
    has_inf = mbits == 2
    max_code = np.uint32(0x7B if has_inf else 0x7E)
    inv = np.float32(1.0) / sc
    for i in range(ln):
        q = xs[i] * inv
        qf[i] = q
        tf[i] = abs(q) + denorm
    # Every candidate is computed and one selected, so that the loop vectorizes.
    for i in range(ln):
        w = qb[i]
        a = w & ABS
        sign = (w >> np.uint32(24)) & np.uint32(0x80)
        sub = tb[i] - denorm_bits
        r = (a - rebias + half + ((a >> np.uint32(shift)) & np.uint32(1))) >> np.uint32(shift)
        r = r if r < max_code else max_code
        cs[i] = np.uint8((sub if a < min_normal_bits else r) | sign)
    if not finite:
        for i in range(ln):
            a = xbs[i] & ABS
            if a >= INF_BITS:
                if has_inf:
                    sign = (xbs[i] >> np.uint32(24)) & np.uint32(0x80)
                    cs[i] = np.uint8((0x7C if a == INF_BITS else 0x7F) | sign)
                else:
                    cs[i] = np.uint8(0x7F)  # e4m3fn: NaN and +-Inf, one positive NaN


@njit(**_INLINE)
def _fp8_scale(xbs, bits1, f1, fp8_max, pow2):
    amax, finite = _block_absmax(xbs, bits1, f1)
    sc = max(amax, FLOOR) / np.float32(fp8_max)
    if pow2:
        f1[0] = sc
        bits1[0] = _pow2_ceil_bits(bits1[0])
        sc = f1[0]
    return sc, finite


@njit(**_JIT)
def fp8_encode(x, codes, scales, block, fp8_max, mbits, ebias, pow2):
    """Scale each block so its absmax maps to ``fp8_max`` and round to fp8 (nearest even).

    ``mbits``/``ebias``: 3/7 for e4m3fn (no Inf: NaN and Inf become the NaN code 0x7F),
    2/15 for e5m2 (Inf kept as 0x7C, NaN as 0x7F). Bit-compatible with torch's cast.
    """
    n = x.shape[0]
    bits1 = np.empty(1, np.uint32)
    f1 = bits1.view(np.float32)
    qf = np.empty(block, np.float32)
    tf = np.empty(block, np.float32)
    # A float32 whose ulp is fp8's smallest subnormal: |q| + it rounds |q| (nearest
    # even) to a whole number of subnormal steps, read off its low bits.
    bits1[0] = np.uint32((127 + 23 + 1 - ebias - mbits) << 23)
    denorm = f1[0]
    nfull = n // block
    x2 = x[: nfull * block].reshape(nfull, block)
    xb2 = x2.view(np.uint32)
    c2 = codes[: nfull * block].reshape(nfull, block)
    qb = qf.view(np.uint32)
    tb = tf.view(np.uint32)
    shift = 23 - mbits
    half = np.uint32((1 << (shift - 1)) - 1)
    rebias = np.uint32((127 - ebias) << 23)
    min_normal_bits = np.uint32((128 - ebias) << 23)
    denorm_bits = np.uint32((127 + 23 + 1 - ebias - mbits) << 23)
    max_code = np.uint32(0x7B if mbits == 2 else 0x7E)
    for b in range(nfull):
        sc, finite = _fp8_scale(xb2[b], bits1, f1, fp8_max, pow2)
        scales[b] = sc
        if not finite:
            _fp8_row(x2[b], xb2[b], c2[b], qf, tf, sc, mbits, ebias, denorm, False)
            continue
        # The common case is written out on 2-D indices (no per-block views).
        inv = np.float32(1.0) / sc
        for i in range(block):
            q = x2[b, i] * inv
            qf[i] = q
            tf[i] = abs(q) + denorm
        for i in range(block):
            w = qb[i]
            a = w & ABS
            sign = (w >> np.uint32(24)) & np.uint32(0x80)
            sub = tb[i] - denorm_bits
            r = (a - rebias + half + ((a >> np.uint32(shift)) & np.uint32(1))) >> np.uint32(shift)
            r = r if r < max_code else max_code
            c2[b, i] = np.uint8((sub if a < min_normal_bits else r) | sign)
    if n > nfull * block:
        s = nfull * block
        xs = x[s:]
        xbs = xs.view(np.uint32)
        sc, finite = _fp8_scale(xbs, bits1, f1, fp8_max, pow2)
        scales[nfull] = sc
        _fp8_row(xs, xbs, codes[s:], qf, tf, sc, mbits, ebias, denorm, finite)


@njit(**_INLINE)
def _fp8_decode_row(cs, os, table, limit, sc, accumulate):
    if accumulate:
        for i in range(os.shape[0]):
            c = cs[i]
            v = table[c] * sc
            os[i] += v if abs(v) <= FMAX else limit[c]
    else:
        for i in range(os.shape[0]):
            c = cs[i]
            v = table[c] * sc
            os[i] = v if abs(v) <= FMAX else limit[c]


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
        sc = scales[b]
        # Written out on 2-D indices (no per-block views).
        if accumulate:
            for i in range(block):
                c = c2[b, i]
                v = table[c] * sc
                o2[b, i] += v if abs(v) <= FMAX else limit[c]
        else:
            for i in range(block):
                c = c2[b, i]
                v = table[c] * sc
                o2[b, i] = v if abs(v) <= FMAX else limit[c]
    if n > nfull * block:
        s = nfull * block
        _fp8_decode_row(codes[s:], out[s:], table, limit, scales[nfull], accumulate)


# --------------------------------------------------------------------- sign
@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"})
def _abs_sum64(xs):
    # float64 accumulation (reassociated so that it vectorizes; within a float32 ulp of
    # torch's float64 sum after the final rounding).
    acc = 0.0
    for i in range(xs.shape[0]):
        acc += abs(np.float64(xs[i]))
    return acc


@njit(**_JIT)
def sign_encode(x, bits_out, scales, block):
    """One bit per element (set for ``x < 0``) and the float64-summed mean ``|x|`` per block."""
    n = x.shape[0]
    nb = (n + block - 1) // block
    for b in range(nb):
        s = b * block
        e = min(s + block, n)
        scales[b] = np.float32(_abs_sum64(x[s:e]) / (e - s))
    full = n // 8
    for j in range(full):
        xs = x[8 * j : 8 * j + 8]
        word = (
            np.int32(xs[0] < 0)
            | (np.int32(xs[1] < 0) << 1)
            | (np.int32(xs[2] < 0) << 2)
            | (np.int32(xs[3] < 0) << 3)
            | (np.int32(xs[4] < 0) << 4)
            | (np.int32(xs[5] < 0) << 5)
            | (np.int32(xs[6] < 0) << 6)
            | (np.int32(xs[7] < 0) << 7)
        )
        bits_out[j] = np.uint8(word)
    if n % 8:
        word = 0
        for i in range(full * 8, n):
            if x[i] < 0:
                word |= 1 << (i - full * 8)
        bits_out[full] = np.uint8(word)


@njit(**_JIT)
def sign_decode(bits_in, scales, out, block, accumulate):
    """``-scale`` where the bit is set, ``+scale`` elsewhere, into float32 ``out``."""
    n = out.shape[0]
    nb = (n + block - 1) // block
    for b in range(nb):
        s = b * block
        e = min(s + block, n)
        sc = scales[b]
        if s % 8 == 0 and (e - s) % 8 == 0:
            os = out[s:e]
            bs = bits_in[s // 8 : e // 8]
            for j in range(bs.shape[0]):
                w = np.int32(bs[j])
                for k in range(8):
                    v = -sc if (w >> k) & 1 else sc
                    if accumulate:
                        os[8 * j + k] += v
                    else:
                        os[8 * j + k] = v
        else:
            for i in range(s, e):
                v = -sc if (bits_in[i >> 3] >> (i & 7)) & 1 else sc
                if accumulate:
                    out[i] += v
                else:
                    out[i] = v


# --------------------------------------------------------------------- bf16
@njit(**_JIT)
def bf16_encode(x, out16):
    """float32 -> bfloat16 bit patterns, round to nearest even, saturating finite values.

    NaN becomes the quiet NaN ``0xFFFF`` that torch's cast produces.
    """
    xb = x.view(np.uint32)
    n = x.shape[0]
    for s in range(0, n, 1024):
        xs = xb[s : s + 1024]
        os = out16[s : s + 1024]
        for i in range(xs.shape[0]):
            w = xs[i]
            a = w & ABS
            r = (w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            # A finite value that rounded up to Inf becomes the largest finite bfloat16.
            over = ((r & np.uint32(0x7FFF)) == np.uint32(0x7F80)) & (a < INF_BITS)
            r = r - (np.uint32(1) if over else np.uint32(0))
            r = np.uint32(0xFFFF) if a > INF_BITS else r
            os[i] = np.uint16(r)


@njit(**_JIT)
def bf16_decode(in16, out, accumulate):
    """bfloat16 bit patterns -> float32 ``out`` (exact), or added to it."""
    n = out.shape[0]
    if not accumulate:
        ob = out.view(np.uint32)
        for i in range(n):
            ob[i] = np.uint32(in16[i]) << np.uint32(16)
        return
    chunk = 1024
    tmp = np.empty(chunk, np.uint32)
    tf = tmp.view(np.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        src = in16[s:e]
        dst = out[s:e]
        for i in range(src.shape[0]):
            tmp[i] = np.uint32(src[i]) << np.uint32(16)
        for i in range(dst.shape[0]):
            dst[i] += tf[i]
