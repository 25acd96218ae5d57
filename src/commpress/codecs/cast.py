"""Identity and plain casts: ``none``, ``fp16``, ``bf16``.

``fp16`` and ``bf16`` are *summable*: ranks' payloads can be added by the
backend directly, so all-reduce runs as one backend all-reduce on the cast
tensor (see ``algorithms.direct``).

Error bounds (round-to-nearest): ``|err| <= |x| * 2**-11`` for fp16 inside
its normal range (plus ``2**-25`` absolute for subnormals), ``|err| <= |x| *
2**-8`` for bf16. fp16 overflows to Inf above 65504, which is why the
all-reduce pre-scales.

NaN stays NaN, +-Inf stays +-Inf (the casts are IEEE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..codec import Codec
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

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * torch.empty((), dtype=dtype).element_size()

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,)

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        return payload[0]


@dataclass(frozen=True, repr=False)
class _Cast(Codec):
    wire_dtype: ClassVar[torch.dtype]
    rel_bound: ClassVar[float]
    abs_bound: ClassVar[float]
    summable: ClassVar[bool] = True

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * 2

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.detach().float().abs()
        return xf * self.rel_bound + self.abs_bound

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x.to(self.wire_dtype),)

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        return payload[0].to(dtype)


@register_codec
@dataclass(frozen=True, repr=False)
class FP16(_Cast):
    """Cast to IEEE half precision (2 bytes per element); summable.

    Values beyond +-65504 become +-Inf: scale first (the all-reduce does).
    """

    codec_id: ClassVar[str] = "fp16"
    wire_dtype: ClassVar[torch.dtype] = torch.float16
    #: The all-reduce divides by the world size before the cast (fp16 overflows at 65504).
    prescale: ClassVar[bool] = True
    rel_bound: ClassVar[float] = 2.0**-11
    abs_bound: ClassVar[float] = 2.0**-25


@register_codec
@dataclass(frozen=True, repr=False)
class BF16(_Cast):
    """Cast to bfloat16 (2 bytes per element, fp32's range); summable."""

    codec_id: ClassVar[str] = "bf16"
    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16
    #: bf16 has float32's range: no division before the cast, no multiplication after.
    prescale: ClassVar[bool] = False
    rel_bound: ClassVar[float] = 2.0**-8
    abs_bound: ClassVar[float] = 0.0
