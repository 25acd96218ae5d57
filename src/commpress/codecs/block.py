"""What the block codecs share (``int8``/``int4``/``int2``/``sign`` in `codecs.quant`,
``fp8``/``fp8_e5m2`` in `codecs.fp8`; `codecs.sparse` uses the checks): blocks of a
flat tensor, their absmax, the error-bound arithmetic, the sub-byte code packing, the
payload check, and `BlockCodec`, the base with the fused decode.

The formats themselves are documented in those modules.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import kernels
from ..codec import Codec, fresh_output
from ..errors import ConfigError, WireError

__all__ = [
    "ABSMAX_FLOOR",
    "ARITH_SLACK",
    "FLOAT32_MAX",
    "OUT_ROUNDING",
    "BlockCodec",
    "as_compute",
    "block_absmax",
    "block_parts",
    "check_bool",
    "expect_sections",
    "finish_bound",
    "finite_absmax",
    "nblocks",
    "pack_bits",
    "per_element",
    "unpack_bits",
]

#: Smallest absmax used to build a scale: keeps ``L / absmax`` finite and the scale normal.
ABSMAX_FLOOR = 2.0**-100
#: Largest finite float32: decoded products saturate here instead of rounding to Inf.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Relative float32 arithmetic slack in the bounds (a few roundings of 2**-24 each).
ARITH_SLACK = 2.0**-20
#: (relative, absolute) rounding when the float32 result is cast to the input dtype;
#: for float64, the rounding of the input to float32 before quantization.
OUT_ROUNDING: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (0.0, 0.0),
    torch.float16: (2.0**-11, 2.0**-25),
    torch.bfloat16: (2.0**-8, 2.0**-134),
    torch.float64: (2.0**-24, 2.0**-149),
}


def check_bool(codec_id: str, name: str, value: object) -> None:
    """Raise ConfigError unless ``value`` is a bool (``1``/``0`` only come in through specs)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{codec_id}: {name}={value!r} is not allowed; expected True or False")


def nblocks(numel: int, block: int) -> int:
    return -(-numel // block)


def block_parts(x: torch.Tensor, block: int) -> list[tuple[int, torch.Tensor]]:
    """Split flat ``x`` into at most two 2-D views (never a copy).

    Returns ``[(first element, view)]``: the full blocks as ``(n // block, block)``,
    then the partial last block as ``(1, n % block)``.
    """
    n = x.numel()
    m = n - n % block
    parts = []
    if m:
        parts.append((0, x[:m].view(-1, block)))
    if m < n:
        parts.append((m, x[m:].view(1, -1)))
    return parts


def as_compute(x: torch.Tensor) -> torch.Tensor:
    """float64 is quantized from float32 (the scales are float32); narrower dtypes as they are."""
    return x.float() if x.dtype == torch.float64 else x


def finite_absmax(x2d: torch.Tensor) -> torch.Tensor:
    """Per-row max of ``|x|`` over finite values (0 where none), as float32 ``(rows,)``."""
    a = x2d.abs().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return a.amax(dim=1).float()


def block_absmax(x2d: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Per-row finite absmax as float32 ``(rows,)``, and whether every element is finite.

    On CPU the common all-finite case costs one ``aminmax`` pass and no temporary
    tensor; a part holding NaN/Inf falls back to `finite_absmax`. On other devices
    the answer is always the masked path (``False``): checking would cost a host sync.
    """
    if x2d.device.type == "cpu" and x2d.numel():
        lo, hi = torch.aminmax(x2d, dim=1)
        absmax = torch.maximum(lo.neg_(), hi).float()
        if bool(torch.isfinite(absmax).all()):
            return absmax, True
    return finite_absmax(x2d), False


def per_element(
    x: torch.Tensor, block: int, row_stat: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Broadcast ``row_stat(x2d) -> (rows,)`` of every block back to flat float32 elements."""
    out = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
    for start, x2d in block_parts(x, block):
        stat = row_stat(x2d).float()
        out[start : start + x2d.numel()].view_as(x2d).copy_(stat.unsqueeze(1).expand_as(x2d))
    return out


def finish_bound(x: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Add the output dtype's rounding of ``|y| <= |x| + base`` to ``base``.

    ``x`` is the flat input, ``base`` a flat float32 bound before the cast to
    ``dtype``. Elements where ``x`` is NaN or Inf get an Inf bound.
    """
    rel, absolute = OUT_ROUNDING[dtype]
    bound = base + absolute
    if rel:  # (0 * Inf would be NaN where |x| + base overflows float32)
        bound = bound + rel * (x.abs().float() + base)
    return bound.masked_fill_(~torch.isfinite(x), float("inf"))


@dataclass(frozen=True, repr=False)
class BlockCodec(Codec):
    """Base of the block codecs (int*, sign, fp8*): a fixed payload layout and a fused
    decode kernel behind one `_decode_into`."""

    fixed_size: ClassVar[bool] = True

    def _kernel_ready(self, payload: tuple[torch.Tensor, ...], out: torch.Tensor | None) -> bool:
        """Whether the fused decode kernel can run on these tensors."""
        return kernels.usable(*payload, out)

    @abc.abstractmethod
    def _kernel_decode(
        self,
        payload: tuple[torch.Tensor, ...],
        out: torch.Tensor,
        dtype: torch.dtype,
        accumulate: bool,
    ) -> None:
        """Decode the validated ``payload`` (of a ``dtype`` tensor) into flat ``out``, or add
        it to ``out`` (rounded to ``dtype`` first), with the kernel (each block codec's own)."""

    def _decode_into(
        self,
        payload: tuple[torch.Tensor, ...],
        numel: int,
        dtype: torch.dtype,
        out: torch.Tensor | None,
        accumulate: bool,
    ) -> torch.Tensor | None:
        # Validate before making the output: a hostile header must not allocate.
        if not self._kernel_ready(payload, out):
            return None
        expect_sections(self.spec, payload, self.sections(numel, dtype))
        out = fresh_output(payload, numel, dtype, out)
        self._kernel_decode(payload, out, dtype, accumulate)
        return out


def expect_sections(
    spec: str, payload: tuple[torch.Tensor, ...], expected: list[tuple[torch.dtype, int]]
) -> None:
    """Raise WireError unless the payload has exactly the expected (dtype, numel) sections."""
    got = [(t.dtype, t.numel()) for t in payload]
    if got != expected or any(t.dim() != 1 for t in payload):
        show = ", ".join(f"{str(d).replace('torch.', '')}[{n}]" for d, n in expected)
        have = ", ".join(f"{str(d).replace('torch.', '')}[{n}]" for d, n in got) or "nothing"
        raise WireError(
            f"{spec}: malformed packet: expected sections {show}, got {have}; the sender used "
            "another codec config or the buffer is corrupted"
        )


#: Integer dtype holding one byte per code of a packed byte (``8 // bits`` codes).
_GROUP_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack flat ``uint8`` codes below ``2**bits`` into ``ceil(n * bits / 8)`` bytes.

    Code ``i`` lands in bits ``bits * (i % per)`` and up of byte ``i // per``
    (``per = 8 // bits``); the unused high bits of the last byte are zero.
    """
    per = 8 // bits
    if per == 1:
        return codes
    if codes.storage_offset() % per:
        codes = codes.clone()  # the word views below need aligned storage
    n = codes.numel()
    m = n - n % per
    out = torch.empty(-(-n // per), dtype=torch.uint8, device=codes.device)
    if m:
        out[: m // per] = _gather_bits(codes[:m].view(_GROUP_DTYPES[per]), bits)
    if m < n:
        tail = torch.zeros(per, dtype=torch.uint8, device=codes.device)
        tail[: n - m] = codes[m:]
        out[-1:] = _gather_bits(tail.view(_GROUP_DTYPES[per]), bits)
    return out


def _gather_bits(v: torch.Tensor, bits: int) -> torch.Tensor:
    # Each word holds ``per`` codes one per byte (little-endian, as on every platform
    # torch runs on); fold them into the low byte in log2(per) shift-or steps.
    step = 8 - bits
    while step < 8 * v.element_size() - 8:
        v = v | (v >> step)
        step *= 2
    return (v & 0xFF).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: ``n`` flat ``uint8`` codes."""
    per = 8 // bits
    if per == 1:
        return packed
    dtype = _GROUP_DTYPES[per]
    w = packed.to(dtype)
    # The pack steps backwards: spread the codes out to one per byte of a word.
    step = (8 - bits) * (per // 2)
    while step >= 8 - bits:
        w = w | (w << step)
        step //= 2
    mask = int.from_bytes(bytes([(1 << bits) - 1]) * per, "little")
    return (w & mask).view(torch.uint8)[:n]
