"""Block absmax quantization: ``int8``, ``int4``, ``int2`` and the 1-bit ``sign``.

The flat tensor is cut into blocks of ``block`` elements (the last block may
be shorter; it is treated as if padded with zeros, which never changes its
absmax or its sum). Each block gets one ``float32`` scale.

Integer codecs (``int8``, ``int4``, ``int2``)
---------------------------------------------
With ``L = 2**(bits-1) - 1`` (127, 7, 1) and ``absmax`` the largest finite
``|x|`` of the block, floored at ``2**-100`` so its inverse is finite::

    scale = max(absmax, 2**-100) / L
    code  = floor(x / scale + 1/2)      # in -L..L (exact ties round up);
                                        # floor(x / scale + U[0,1)) if stochastic

The most negative code (-128, -8, -2) is reserved: it marks an element that
was NaN or +-Inf, and decodes to NaN at the same position. A block holding
such codes has its scale stored negated, so decoding NaN-free data (the
common case) skips the search for reserved codes. Codes travel in
offset binary (``code + L + 1``, so the reserved code is 0), ``8 // bits``
codes per byte, element ``i`` in bits ``bits * (i % per)`` and up of byte
``i // per``.

Payload: ``(codes uint8[ceil(numel * bits / 8)], scales float32[nblocks])``.

Error bound, elementwise for finite ``x`` (``q`` is the output dtype's
rounding, below)::

    |err| <= scale / 2 + 2**-20 * absmax           (round to nearest)
    |err| <  scale     + 2**-20 * absmax           (stochastic)

The ``2**-20 * absmax`` term covers float32 arithmetic. Casting the float32
result back to a narrower input dtype adds half an ulp of the result:
``2**-11 |y| + 2**-25`` for float16, ``2**-8 |y| + 2**-134`` for bfloat16
(``|y| <= |x| + err``). float64 inputs are quantized from their float32
rounding (``2**-24 |x| + 2**-149`` more), and magnitudes beyond float32's
range count as Inf.

Stochastic rounding draws from torch's default generator of the tensor's
device (``torch.rand_like``); seed it with ``torch.manual_seed`` to repeat a
run. Ranks need not agree: a receiver only decodes, it never redraws.

``sign``
--------
One bit per element (set for ``x < 0``) and ``scale = mean |x|`` over the
block. ``x >= 0`` decodes to ``+scale``, ``x < 0`` to ``-scale``, so
``|err| <= max(|x|, scale)`` (plus float32 rounding and the output dtype's
rounding as above). Payload: ``(bits uint8[ceil(numel / 8)], scales
float32[nblocks])``. Use it with error feedback (`commpress.ErrorFeedback`).

NaN and Inf
-----------
- integer codecs: NaN and +-Inf decode to NaN at their position; the rest of
  their block is quantized as if they were absent (its scale comes from the
  finite values).
- ``sign``: a block containing NaN decodes to all NaN (its scale is NaN); a
  block containing +-Inf but no NaN decodes to +-Inf everywhere (its scale
  is Inf). The error bound is Inf for every element of such a block.
"""

from __future__ import annotations

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
    pack_bits,
    per_element,
    unpack_bits,
)

__all__ = ["Int8", "Int4", "Int2", "Sign"]


# ------------------------------------------------------------- integer codecs


@dataclass(frozen=True, repr=False)
class _IntQuant(BlockCodec):
    bits: ClassVar[int] = 8
    block: int = 256
    stochastic: bool = False

    def __post_init__(self) -> None:
        check_range(self.codec_id, "block", self.block, 1, 2**20, integer=True)
        check_bool(self.codec_id, "stochastic", self.stochastic)

    @property
    def levels(self) -> int:
        """``L``: codes run from ``-L`` to ``L``."""
        return 2 ** (self.bits - 1) - 1

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return -(-numel * self.bits // 8) + 4 * nblocks(numel, self.block)

    def _scales(self, x2d: torch.Tensor) -> torch.Tensor:
        return finite_absmax(x2d).clamp_min_(ABSMAX_FLOOR)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)
        xc = as_compute(flat)
        absmax = per_element(xc, self.block, self._scales)
        step = absmax / self.levels
        base = (step if self.stochastic else step / 2) + ARITH_SLACK * absmax
        return finish_bound(flat, base, flat.dtype).view(x.shape)

    def _fast(self, *tensors: torch.Tensor | None) -> bool:
        # The kernels pack whole blocks into whole bytes; stochastic rounding stays on
        # the reference path (it draws from torch's generator).
        return (
            not self.stochastic and self.block % (8 // self.bits) == 0 and kernels.usable(*tensors)
        )

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self._fast(x):
            return self._encode_reference(x)
        n = x.numel()
        codes = torch.empty(-(-n * self.bits // 8), dtype=torch.uint8)
        scales = torch.empty(nblocks(n, self.block), dtype=torch.float32)
        kernels.quant_encode(x, self.bits, self.block, codes, scales)
        return codes, scales

    def _encode_into(
        self, x: torch.Tensor, payload: tuple[torch.Tensor, ...], roundtrip: bool = False
    ) -> None:
        if not self._fast(x, *payload) or (roundtrip and x.dtype != torch.float32):
            super()._encode_into(x, payload, roundtrip)
            return
        codes, scales = payload
        kernels.quant_encode(x, self.bits, self.block, codes, scales, roundtrip)

    def _encode_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The definition (plain torch ops, any device); the kernels match it bit for bit."""
        x = as_compute(x)
        n = x.numel()
        lv = self.levels
        codes = torch.empty(n, dtype=torch.uint8, device=x.device)
        scales = torch.empty(nblocks(n, self.block), dtype=torch.float32, device=x.device)
        # Offset binary: x / scale + L + 1 lies in [1, 2L + 1] for finite x. The float ->
        # uint8 copy truncates, so adding 0.5 first rounds to nearest (ties away from zero
        # in code space). Two float32 roundings (product, then sum), never a fused one.
        offset = lv + 1.5
        for start, x2d in block_parts(x, self.block):
            absmax, all_finite = block_absmax(x2d)
            absmax.clamp_min_(ABSMAX_FLOOR)
            inv = torch.full_like(absmax, lv).div_(absmax).unsqueeze(1)
            q = x2d * inv
            if self.stochastic:
                # floor(x / scale + U[0, 1)) before the offset is added: near zero the sum
                # stays exact (a large offset would round U up to 1 now and then), and the
                # clamp catches L + U rounding up to L + 1 in float32.
                q.add_(torch.rand_like(q)).floor_().clamp_(-lv, lv).add_(lv + 1)
            else:
                q.add_(offset)
            step = absmax / lv
            if not all_finite:
                # NaN and +-Inf take the reserved code 0; their block's scale is stored
                # negated so that decode knows which blocks hold reserved codes.
                bad = ~torch.isfinite(x2d)
                q.masked_fill_(bad, 0.0)
                step = torch.where(bad.any(dim=1), -step, step)
            row = start // self.block
            scales[row : row + x2d.shape[0]] = step
            codes[start : start + x2d.numel()].view_as(x2d).copy_(q)
        return pack_bits(codes, self.bits), scales

    def sections(self, numel: int, dtype: torch.dtype) -> list[tuple[torch.dtype, int]]:
        return [
            (torch.uint8, -(-numel * self.bits // 8)),
            (torch.float32, nblocks(numel, self.block)),
        ]

    def _kernel_ready(self, payload: tuple[torch.Tensor, ...], out: torch.Tensor | None) -> bool:
        return self._fast(*payload, out)

    def _kernel_decode(
        self,
        payload: tuple[torch.Tensor, ...],
        out: torch.Tensor,
        dtype: torch.dtype,
        accumulate: bool,
    ) -> None:
        codes, scales = payload
        kernels.quant_decode(codes, scales, self.bits, self.block, out, dtype, accumulate)

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        expect_sections(self.spec, payload, self.sections(numel, dtype))
        packed, scales = payload
        codes = unpack_bits(packed, self.bits, numel)
        flagged = scales.device.type != "cpu" or bool((scales < 0).any())
        if flagged:
            scales = scales.abs()
        # Decode in float32: (code - L - 1) * scale, one rounding (L + 1 is exact), then
        # saturated: a block whose absmax is near float32's max may round past it.
        work = torch.empty(numel, dtype=torch.float32, device=packed.device)
        work.copy_(codes)
        work.sub_(self.levels + 1)
        for start, w2d in block_parts(work, self.block):
            row = start // self.block
            w2d.mul_(scales[row : row + w2d.shape[0]].unsqueeze(1))
        work.clamp_(-FLOAT32_MAX, FLOAT32_MAX)
        if flagged:
            work.masked_fill_(codes == 0, float("nan"))
        return work if dtype == torch.float32 else saturating_cast(work, dtype)


@register_codec
@dataclass(frozen=True, repr=False)
class Int8(_IntQuant):
    """Symmetric block absmax quantization to 8-bit codes (-127..127), one float32 scale per block.

    Payload per element: 1 byte, plus 4 bytes per block. Error bound and NaN/Inf
    behaviour: see `commpress.codecs.quant`.

    Args:
        block: elements per scale, ``1 <= block <= 2**20``.
        stochastic: unbiased stochastic rounding (``E[decoded] == x``; error below one
            step instead of half a step); draws from torch's default generator.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("int8:block=128")
        >>> x = torch.randn(1000)
        >>> c.encode(x).nbytes == 1000 + 4 * 8
        True
        >>> bool(((c.roundtrip(x) - x).abs() <= c.error_bound(x)).all())
        True
    """

    codec_id: ClassVar[str] = "int8"
    typical_rel_err: ClassVar[float | None] = 8e-3
    bits: ClassVar[int] = 8


@register_codec
@dataclass(frozen=True, repr=False)
class Int4(_IntQuant):
    """Symmetric block absmax quantization to 4-bit codes (-7..7), two per byte.

    Payload per element: 0.5 byte, plus 4 bytes per block. Error bound and NaN/Inf
    behaviour: see `commpress.codecs.quant`.

    Args:
        block: elements per scale, ``1 <= block <= 2**20``.
        stochastic: unbiased stochastic rounding; draws from torch's default generator.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("int4:stochastic=1")
        >>> c.encode(torch.randn(1000)).nbytes == 500 + 4 * 4
        True
    """

    codec_id: ClassVar[str] = "int4"
    typical_rel_err: ClassVar[float | None] = 0.15
    bits: ClassVar[int] = 4


@register_codec
@dataclass(frozen=True, repr=False)
class Int2(_IntQuant):
    """Ternary block absmax quantization (-1, 0, +1 times the scale), four codes per byte.

    Payload per element: 0.25 byte, plus 4 bytes per block. Error bound and NaN/Inf
    behaviour: see `commpress.codecs.quant`. Coarse: pair it with error feedback or
    ``stochastic=1``.

    Args:
        block: elements per scale, ``1 <= block <= 2**20``.
        stochastic: unbiased stochastic rounding; draws from torch's default generator.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("int2")
        >>> c.roundtrip(torch.tensor([4.0, -1.0, 3.0, float("nan")]))
        tensor([4., 0., 4., nan])
    """

    codec_id: ClassVar[str] = "int2"
    typical_rel_err: ClassVar[float | None] = 0.9
    bits: ClassVar[int] = 2


# ---------------------------------------------------------------------- sign


@register_codec
@dataclass(frozen=True, repr=False)
class Sign(BlockCodec):
    """1 bit per element (the sign) and one float32 scale (mean ``|x|``) per block.

    ``x >= 0`` decodes to ``+scale``, ``x < 0`` to ``-scale``: ``|err| <= max(|x|, scale)``
    plus rounding. Biased; meant for error feedback (signSGD / EF-SGD). A block with a
    NaN decodes to all NaN, a block with +-Inf (and no NaN) to +-Inf; see
    `commpress.codecs.quant`.

    Args:
        block: elements per scale, ``1 <= block <= 2**20``.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("sign")
        >>> c.roundtrip(torch.tensor([1.0, -3.0, 0.0, 2.0]))
        tensor([ 1.5000, -1.5000,  1.5000,  1.5000])
    """

    codec_id: ClassVar[str] = "sign"
    wants_error_feedback: ClassVar[bool] = True
    block: int = 256

    def __post_init__(self) -> None:
        check_range(self.codec_id, "block", self.block, 1, 2**20, integer=True)

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return -(-numel // 8) + 4 * nblocks(numel, self.block)

    @staticmethod
    def _mean_abs(x2d: torch.Tensor) -> torch.Tensor:
        # Summed in float64: no overflow for values near float32's max, and the fast
        # kernel (another summation order) lands within one float32 ulp of it.
        return (x2d.abs().sum(dim=1, dtype=torch.float64) / x2d.shape[1]).float()

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)
        xc = as_compute(flat)
        scale = per_element(xc, self.block, self._mean_abs)
        ax = xc.abs().float()
        base = torch.maximum(ax, scale) + ARITH_SLACK * (ax + scale)
        bound = finish_bound(flat, base, flat.dtype)
        # Every element of a block with a non-finite value may be off by Inf.
        return bound.masked_fill_(~torch.isfinite(scale), float("inf")).view(x.shape)

    def sections(self, numel: int, dtype: torch.dtype) -> list[tuple[torch.dtype, int]]:
        return [(torch.uint8, -(-numel // 8)), (torch.float32, nblocks(numel, self.block))]

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not kernels.usable(x):
            return self._encode_reference(x)
        n = x.numel()
        bits = torch.empty(-(-n // 8), dtype=torch.uint8)
        scales = torch.empty(nblocks(n, self.block), dtype=torch.float32)
        kernels.sign_encode(x, self.block, bits, scales)
        return bits, scales

    def _encode_into(
        self, x: torch.Tensor, payload: tuple[torch.Tensor, ...], roundtrip: bool = False
    ) -> None:
        if not kernels.usable(x, *payload):
            super()._encode_into(x, payload, roundtrip)
            return
        bits, scales = payload
        kernels.sign_encode(x, self.block, bits, scales)
        if roundtrip:
            kernels.sign_decode(bits, scales, self.block, x, x.dtype, False)

    def _encode_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The definition (plain torch ops, any device); the kernel matches it (scales
        within one float32 ulp, bits exactly)."""
        x = as_compute(x)
        n = x.numel()
        scales = torch.empty(nblocks(n, self.block), dtype=torch.float32, device=x.device)
        for start, x2d in block_parts(x, self.block):
            row = start // self.block
            scales[row : row + x2d.shape[0]] = self._mean_abs(x2d)
        return pack_bits(x.lt(0).view(torch.uint8), 1), scales

    def _kernel_decode(
        self,
        payload: tuple[torch.Tensor, ...],
        out: torch.Tensor,
        dtype: torch.dtype,
        accumulate: bool,
    ) -> None:
        bits, scales = payload
        kernels.sign_decode(bits, scales, self.block, out, dtype, accumulate)

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        expect_sections(self.spec, payload, self.sections(numel, dtype))
        packed, scales = payload
        negative = unpack_bits(packed, 1, numel).view(torch.bool)
        out = torch.empty(numel, dtype=torch.float32, device=packed.device)
        for start, b2d in block_parts(negative, self.block):
            row = start // self.block
            s = scales[row : row + b2d.shape[0]].unsqueeze(1)
            # A select, not (1 - 2b) * s: an Inf scale must give +-Inf, never 0 * Inf = NaN.
            torch.where(b2d, -s, s, out=out[start : start + b2d.numel()].view_as(b2d))
        return out if dtype == torch.float32 else saturating_cast(out, dtype)
