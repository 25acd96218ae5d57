"""Identity and plain casts: ``none``, ``fp16``, ``bf16``.

``fp16`` and ``bf16`` are *summable*: ranks' payloads can be added by the
backend directly, so all-reduce runs as one backend all-reduce on the cast
tensor (see ``algorithms.direct``).

Error bounds (round to nearest even), elementwise for finite ``x``:

- ``fp16``: ``|err| <= 2**-11 |x| + 2**-25`` up to ``|x| <= 65504``; beyond it
  the cast overflows to +-Inf (IEEE, like torch's ``fp16_compress_hook``) and
  the bound is Inf -- which is why the all-reduce pre-scales by ``1/world``.
- ``bf16``: ``|err| <= 2**-8 |x| + 2**-134`` (the absolute term: magnitudes
  below half the smallest bfloat16 subnormal flush to zero). Finite values
  stay finite: the few float32 values within half an ulp of float32's max,
  which round to Inf in an IEEE cast, saturate to bfloat16's largest finite
  value (still within the bound), and so do bfloat16 values decoded into a
  float16 tensor. float64 beyond float32's range gets an Inf bound.
- float64 inputs add ``2**-24 |x|`` (the cast may round through float32),
  float16 outputs ``2**-25`` (their own subnormals).

NaN stays NaN, +-Inf stays +-Inf. Signed zeros are kept (the casts are
IEEE), unlike the block codecs, which decode ``-0.0`` as ``+0.0``.

Speed: float32 -> bfloat16 on CPU runs in a fused kernel
(``commpress.kernels``); every other cast is torch's own, which writes into
a preallocated buffer in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import kernels
from ..codec import Codec, fresh_output, saturating_cast
from ..errors import WireError
from ..registry import register_codec

__all__ = ["NoneCodec", "FP16", "BF16"]


@register_codec
@dataclass(frozen=True, repr=False)
class NoneCodec(Codec):
    """Identity: the payload is the tensor itself. Lossless, for baselines.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("none")
        >>> x = torch.arange(4)
        >>> torch.equal(c.decode(c.encode(x)), x)
        True
    """

    codec_id: ClassVar[str] = "none"
    lossless: ClassVar[bool] = True
    fixed_size: ClassVar[bool] = True

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * torch.empty((), dtype=dtype).element_size()

    def sections(self, numel: int, dtype: torch.dtype) -> list[tuple[torch.dtype, int]]:
        return [(dtype, numel)]

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,)

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        _check_payload(self.spec, payload, numel, dtype)
        return payload[0]


@dataclass(frozen=True, repr=False)
class _Cast(Codec):
    wire_dtype: ClassVar[torch.dtype]
    rel_bound: ClassVar[float]
    abs_bound: ClassVar[float]
    #: Largest ``|x|`` the cast keeps within ``rel_bound``; beyond it the bound is Inf.
    range_limit: ClassVar[float]
    #: Finite values past the wire dtype's range: saturate (bf16) or become +-Inf (fp16).
    saturate: ClassVar[bool]
    summable: ClassVar[bool] = True
    fixed_size: ClassVar[bool] = True

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * 2

    def sections(self, numel: int, dtype: torch.dtype) -> list[tuple[torch.dtype, int]]:
        return [(self.wire_dtype, numel)]

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        ax = x.detach().abs().float()
        rel = self.rel_bound
        absolute = self.abs_bound
        if x.dtype == torch.float64:
            rel += 2.0**-24  # the cast may round through float32 first
        if x.dtype == torch.float16:
            absolute += 2.0**-25  # the decode rounds to float16 again (its subnormals)
        bound = ax * rel + absolute
        return bound.masked_fill_(~(ax <= self.range_limit), float("inf"))  # NaN too

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.wire_dtype == torch.bfloat16 and x.dtype == torch.float32 and kernels.usable(x):
            y = torch.empty(x.numel(), dtype=torch.bfloat16)
            kernels.bf16_encode(x, y)
            return (y,)
        return self._encode_reference(x)

    def _encode_into(
        self, x: torch.Tensor, payload: tuple[torch.Tensor, ...], roundtrip: bool = False
    ) -> None:
        (y,) = payload
        if self.wire_dtype == torch.bfloat16 and x.dtype == torch.float32 and kernels.usable(x, y):
            kernels.bf16_encode(x, y, roundtrip)
            return
        if self.saturate:
            y.copy_(saturating_cast(x, self.wire_dtype))
        else:
            y.copy_(x)  # torch's cast, straight into the wire buffer
        if roundtrip:
            x.copy_(self._widen(y, x.dtype))

    def _encode_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The definition (torch's IEEE cast); the kernel matches it bit for bit."""
        if self.saturate:
            return (saturating_cast(x, self.wire_dtype),)
        return (x.to(self.wire_dtype),)

    def _decode_into(
        self,
        payload: tuple[torch.Tensor, ...],
        numel: int,
        dtype: torch.dtype,
        out: torch.Tensor | None,
        accumulate: bool,
    ) -> torch.Tensor | None:
        _check_payload(self.spec, payload, numel, self.wire_dtype)
        (y,) = payload
        out = fresh_output(payload, numel, dtype, out)
        if self.wire_dtype == torch.bfloat16 and dtype == out.dtype == torch.float32:
            if kernels.usable(y, out):
                kernels.bf16_decode(y, out, accumulate)
                return out
        if dtype == out.dtype or (accumulate and dtype == torch.float32):
            # torch's casts write into ``out`` (or add to it) in one pass.
            if accumulate:
                out.add_(self._widen(y, dtype))
            elif self.saturate:
                out.copy_(saturating_cast(y, dtype))
            else:
                out.copy_(y)
            return out
        return None

    def _widen(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return saturating_cast(y, dtype) if self.saturate else y.to(dtype)

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        _check_payload(self.spec, payload, numel, self.wire_dtype)
        return self._widen(payload[0], dtype)


def _check_payload(
    spec: str, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
) -> None:
    if len(payload) != 1 or payload[0].dtype != dtype or payload[0].numel() != numel:
        got = ", ".join(f"{str(t.dtype).replace('torch.', '')}[{t.numel()}]" for t in payload)
        raise WireError(
            f"{spec}: malformed packet: expected one section {str(dtype).replace('torch.', '')}"
            f"[{numel}], got {got or 'nothing'}; the sender used another codec or the buffer "
            "is corrupted"
        )


@register_codec
@dataclass(frozen=True, repr=False)
class FP16(_Cast):
    """Cast to IEEE half precision (2 bytes per element); summable.

    Values beyond +-65504 become +-Inf: scale first (the all-reduce does).
    """

    codec_id: ClassVar[str] = "fp16"
    typical_rel_err: ClassVar[float | None] = 3e-4
    wire_dtype: ClassVar[torch.dtype] = torch.float16
    #: The all-reduce divides by the world size before the cast (fp16 overflows at 65504).
    prescale: ClassVar[bool] = True
    rel_bound: ClassVar[float] = 2.0**-11
    abs_bound: ClassVar[float] = 2.0**-25
    #: From 65520 up the cast rounds to Inf (IEEE overflow, as torch's fp16 hook does).
    range_limit: ClassVar[float] = 65504.0
    saturate: ClassVar[bool] = False


@register_codec
@dataclass(frozen=True, repr=False)
class BF16(_Cast):
    """Cast to bfloat16 (2 bytes per element, fp32's range); summable."""

    codec_id: ClassVar[str] = "bf16"
    typical_rel_err: ClassVar[float | None] = 3e-3
    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16
    #: bf16 has float32's range: no division before the cast, no multiplication after.
    prescale: ClassVar[bool] = False
    rel_bound: ClassVar[float] = 2.0**-8
    #: Half the smallest bfloat16 subnormal: smaller magnitudes flush to zero.
    abs_bound: ClassVar[float] = 2.0**-134
    #: Finite float32 values all fit (the top ulp saturates); float64 beyond it does not.
    range_limit: ClassVar[float] = float(torch.finfo(torch.float32).max)
    saturate: ClassVar[bool] = True
