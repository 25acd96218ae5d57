"""FP8 with a scale per block: ``fp8`` (e4m3) and ``fp8_e5m2``.

DeepSeek-V3's tile scaling: the flat tensor is cut into blocks of ``block``
elements (default 128; the last block may be shorter) and each block gets a
float32 scale so that its largest finite magnitude maps to the format's
largest value (448 for e4m3, 57344 for e5m2)::

    scale = max(absmax, 2**-100) / FP8_MAX      # pow2=1: rounded up to a power of two
    code  = fp8(x / scale)                      # round to nearest even

``pow2=1`` rounds each scale up to a power of two, as DeepSeek-V3 does: the
division and the multiplication back become exact exponent shifts, at the
cost of up to one bit of range per block.

Payload: ``(codes uint8[numel], scales float32[nblocks])`` -- the codes are
the fp8 bit patterns, shipped as ``uint8`` so any backend and any lossless
stage can move them.

Error bound, elementwise for finite ``x``, with ``m`` the format's mantissa
bits (3 for e4m3, 2 for e5m2) and ``d`` half its smallest subnormal
(``2**-10`` for e4m3, ``2**-17`` for e5m2)::

    |err| <= 2**-(m+1) * |x| + d * scale + 2**-20 * (|x| + absmax)

plus the output dtype's rounding for float16/bfloat16 inputs and the float32
rounding of float64 inputs (see `commpress.codecs.quant`).

NaN and Inf: NaN decodes to NaN. ``fp8_e5m2`` keeps +-Inf (the format has
it; the scale comes from the finite values). ``fp8`` (e4m3fn has no Inf)
decodes +-Inf to NaN -- never to a finite number.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import kernels
from ..codec import check_range, saturating_cast
from ..registry import register_codec
from .block import (
    ABSMAX_FLOOR,
    ARITH_SLACK,
    FLOAT32_MAX,
    BlockCodec,
    as_compute,
    block_absmax,
    block_parts,
    check_bool,
    expect_sections,
    finish_bound,
    finite_absmax,
    nblocks,
    per_element,
)

__all__ = ["FP8", "FP8E5M2"]


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ``>= s`` for positive normal float32 ``s``."""
    p = torch.exp2(torch.ceil(torch.log2(s)))
    # log2 rounds; where it rounded down across a power of two, step up once.
    return torch.where(p < s, p * 2, p)


@functools.cache
def _fp8_table(fp8_dtype: torch.dtype) -> torch.Tensor:
    """float32 value of every fp8 bit pattern (index = the pattern as a uint8)."""
    return torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()


@dataclass(frozen=True, repr=False)
class _FP8(BlockCodec):
    fp8_dtype: ClassVar[torch.dtype]
    fp8_max: ClassVar[float]
    rel_error: ClassVar[float]
    subnormal_error: ClassVar[float]
    #: Whether the format has +-Inf (e5m2); if not (e4m3fn), +-Inf is stored as NaN.
    has_inf: ClassVar[bool]

    block: int = 128
    pow2: bool = False

    def __post_init__(self) -> None:
        check_range(self.codec_id, "block", self.block, 1, 2**20, integer=True)
        check_bool(self.codec_id, "pow2", self.pow2)

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel + 4 * nblocks(numel, self.block)

    def _scale(self, x2d: torch.Tensor, absmax: torch.Tensor | None = None) -> torch.Tensor:
        if absmax is None:
            absmax = finite_absmax(x2d)
        s = absmax.clamp_min_(ABSMAX_FLOOR) / self.fp8_max
        return _pow2_ceil(s) if self.pow2 else s

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)
        xc = as_compute(flat)
        scale = per_element(xc, self.block, self._scale)
        ax = xc.abs().float()
        absmax = per_element(xc, self.block, finite_absmax)
        base = self.rel_error * ax + self.subnormal_error * scale + ARITH_SLACK * (ax + absmax)
        return finish_bound(flat, base, flat.dtype).view(x.shape)

    def sections(self, numel: int, dtype: torch.dtype) -> list[tuple[torch.dtype, int]]:
        return [(torch.uint8, numel), (torch.float32, nblocks(numel, self.block))]

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not kernels.usable(x):
            return self._encode_reference(x)
        n = x.numel()
        codes = torch.empty(n, dtype=torch.uint8)
        scales = torch.empty(nblocks(n, self.block), dtype=torch.float32)
        self._run_kernel(x, codes, scales, roundtrip=False)
        return codes, scales

    def _run_kernel(
        self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, roundtrip: bool
    ) -> None:
        table = _fp8_table(self.fp8_dtype)
        kernels.fp8_encode(
            x, self.fp8_dtype, self.fp8_max, self.block, self.pow2, codes, scales, table, roundtrip
        )

    def _encode_into(
        self, x: torch.Tensor, payload: tuple[torch.Tensor, ...], roundtrip: bool = False
    ) -> None:
        if not kernels.usable(x, *payload) or (roundtrip and x.dtype != torch.float32):
            super()._encode_into(x, payload, roundtrip)
            return
        codes, scales = payload
        self._run_kernel(x, codes, scales, roundtrip)

    def _encode_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The definition (plain torch ops, any device); the kernel matches it bit for bit."""
        x = as_compute(x)
        n = x.numel()
        codes = torch.empty(n, dtype=self.fp8_dtype, device=x.device)
        scales = torch.empty(nblocks(n, self.block), dtype=torch.float32, device=x.device)
        for start, x2d in block_parts(x, self.block):
            absmax, all_finite = block_absmax(x2d)
            s = self._scale(x2d, absmax)
            row = start // self.block
            scales[row : row + x2d.shape[0]] = s
            # Multiply by the reciprocal (exact for pow2 scales); |x * inv| <= FP8_MAX up to
            # one float32 rounding, which the cast rounds back to FP8_MAX.
            q = x2d * s.reciprocal().unsqueeze(1)
            if not self.has_inf and not all_finite:
                # torch's e4m3fn cast saturates Inf to 448 on CPU; make it NaN everywhere.
                q.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)
            codes[start : start + x2d.numel()].view_as(x2d).copy_(q)
        return codes.view(torch.uint8), scales

    def _kernel_decode(
        self,
        payload: tuple[torch.Tensor, ...],
        out: torch.Tensor,
        dtype: torch.dtype,
        accumulate: bool,
    ) -> None:
        codes, scales = payload
        table = _fp8_table(self.fp8_dtype)
        kernels.fp8_decode(codes, scales, table, self.block, out, dtype, accumulate)

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        expect_sections(self.spec, payload, self.sections(numel, dtype))
        raw, scales = payload
        # float32 value of every code (a table: torch's float8 cast is slow on CPU), times
        # the scale: fp8 values are exact in float32, so the product is rounded once.
        out = _fp8_table(self.fp8_dtype).to(raw.device).index_select(0, raw.int())
        finite = out.isfinite()
        for start, o2d in block_parts(out, self.block):
            row = start // self.block
            o2d.mul_(scales[row : row + o2d.shape[0]].unsqueeze(1))
        # A finite code saturates instead of rounding past float32's max (absmax near it).
        out = torch.where(finite, out.clamp(-FLOAT32_MAX, FLOAT32_MAX), out)
        return out if dtype == torch.float32 else saturating_cast(out, dtype)


@register_codec
@dataclass(frozen=True, repr=False)
class FP8(_FP8):
    """FP8 e4m3 (``torch.float8_e4m3fn``) with one float32 scale per block.

    Payload per element: 1 byte, plus 4 bytes per block. Relative error
    ``<= 2**-4`` (plus a tiny absolute term near zero); see `commpress.codecs.fp8`.
    +-Inf decodes to NaN (e4m3fn has no Inf); NaN stays NaN.

    Args:
        block: elements per scale, ``1 <= block <= 2**20`` (DeepSeek-V3 uses 128).
        pow2: round each scale up to a power of two.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("fp8:pow2=1")
        >>> x = torch.randn(1000)
        >>> c.encode(x).nbytes == 1000 + 4 * 8
        True
        >>> bool(((c.roundtrip(x) - x).abs() <= c.error_bound(x)).all())
        True
    """

    codec_id: ClassVar[str] = "fp8"
    typical_rel_err: ClassVar[float | None] = 3e-2
    fp8_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn
    fp8_max: ClassVar[float] = 448.0
    rel_error: ClassVar[float] = 2.0**-4
    subnormal_error: ClassVar[float] = 2.0**-10
    has_inf: ClassVar[bool] = False


@register_codec
@dataclass(frozen=True, repr=False)
class FP8E5M2(_FP8):
    """FP8 e5m2 (``torch.float8_e5m2``) with one float32 scale per block.

    More range, less precision than ``fp8``: relative error ``<= 2**-3``. Keeps +-Inf
    and NaN. Payload per element: 1 byte, plus 4 bytes per block.

    Args:
        block: elements per scale, ``1 <= block <= 2**20``.
        pow2: round each scale up to a power of two.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("fp8_e5m2")
        >>> c.roundtrip(torch.tensor([1.0, -0.5, float("inf")]))
        tensor([ 1.0000, -0.5000,     inf])
    """

    codec_id: ClassVar[str] = "fp8_e5m2"
    typical_rel_err: ClassVar[float | None] = 6e-2
    fp8_dtype: ClassVar[torch.dtype] = torch.float8_e5m2
    fp8_max: ClassVar[float] = 57344.0
    rel_error: ClassVar[float] = 2.0**-3
    subnormal_error: ClassVar[float] = 2.0**-17
    has_inf: ClassVar[bool] = True
