"""Sparsifiers: ``topk`` (largest magnitudes, indices sent) and ``randomk`` (indices never sent).

Both keep ``k = max(1, ceil(ratio * numel))`` elements of a non-empty tensor
(``ratio`` is read as the decimal it is written as, so ``ratio=0.07`` of 100
elements is 7, not 8) and decode every other element to 0. Both are biased
unless noted, and are meant for error feedback (`commpress.ErrorFeedback`).

``topk``
--------
Payload: ``(values[k] in the input dtype, indices int32[k])``, indices
ascending. Sent values are exact; so the error is 0 where ``|x|`` is above the
k-th largest magnitude and at most ``|x|`` elsewhere. Tensors of ``2**31`` or
more elements must be chunked first (int32 indices).

``randomk``
-----------
Payload: ``(values[k] in the input dtype, state int64[2])``. The indices are
never sent: both sides compute them from ``(seed, numel, draw)``, where
``draw`` is the first word of ``state``. Each encode takes the next draw
number of its codec config in this process (so successive calls send
different subsets; `reset_draws` starts over), and the receiver reads it from
the packet, so it always rebuilds the sender's subset.

The subset for a draw is ``{(a * i + b) mod numel : i < k}``: ``a`` is a
multiplier coprime with ``numel`` derived from ``(seed, numel)`` by a hash,
``b`` an offset mixed from ``draw`` by integer arithmetic on the device. Every
element is sent with frequency ``k / numel`` over draws. This costs O(k), not
a permutation of all ``numel`` elements, needs no host sync to decode, and
gives the same indices on every device and torch version, which a
``torch.Generator`` does not promise.

``unbiased=1`` multiplies the sent values by ``numel / k`` on decode, so that
the average over draws is ``x`` (saturating at float16/bfloat16's largest
finite value instead of overflowing); the default (0) decodes them as they
are, which is what error feedback wants. Bounds: ``|err| <= |x|`` (default);
``|err| <= |x| * max(1, numel/k - 1)`` plus rounding with ``unbiased=1``.

NaN and Inf
-----------
- ``topk`` ranks NaN and +-Inf above every finite magnitude, so they are sent
  first and stay NaN/Inf. If all ``k`` sent values are non-finite (there may
  have been more), every element not sent decodes to NaN instead of 0.
- ``randomk``: sent elements keep their value. If the tensor held any NaN or
  Inf, every element not sent decodes to NaN instead of 0 (the second word of
  ``state`` carries that flag), so a non-finite input is never hidden.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import ClassVar

import torch

from ..codec import Codec, check_range
from ..errors import ConfigError, WireError
from ..registry import register_codec
from .block import OUT_ROUNDING, check_bool, expect_sections

__all__ = ["TopK", "RandomK", "reset_draws"]

#: int32 indices address at most this many elements.
MAX_TOPK_NUMEL = 2**31 - 1
_MERSENNE31 = 2**31 - 1
# Odd multipliers below 2**31 for the offset mix; products with values below 2**31 fit int64.
_MIX = (1540483477, 668265263, 374761393)


def _check_ratio(codec_id: str, ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError(
            f"{codec_id}: ratio={ratio!r} is not allowed; expected a number with 0 < ratio <= 1 "
            "(the fraction of elements sent)"
        )
    return float(ratio)


def _keep(ratio: float, numel: int) -> int:
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(Fraction(repr(ratio)) * numel)))


def _nonfinite_fill(flag: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0-d tensor: NaN where the 0-d bool ``flag`` is set, else 0 (no host sync)."""
    return torch.where(flag, float("nan"), 0.0).to(dtype)


def _abs_upper(x: torch.Tensor) -> torch.Tensor:
    """float32 ``>= |x|`` (rounded up where float64 does not fit float32 exactly)."""
    a = x.abs()
    if a.dtype != torch.float64:
        return a.float()
    a32 = a.float()
    return torch.where(a32.double() < a, torch.nextafter(a32, torch.full_like(a32, math.inf)), a32)


# ---------------------------------------------------------------------- topk


@register_codec
@dataclass(frozen=True, repr=False)
class TopK(Codec):
    """The ``k`` largest magnitudes, as values plus int32 indices.

    Payload per element: ``ratio * (itemsize + 4)`` bytes. Sent values are exact;
    every other element decodes to 0. NaN and Inf are sent first; see
    `commpress.codecs.sparse`.

    Args:
        ratio: fraction of elements sent, ``0 < ratio <= 1``; ``k = max(1, ceil(ratio * numel))``.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("topk:ratio=0.5")
        >>> c.roundtrip(torch.tensor([0.1, -5.0, 2.0, 0.3]))
        tensor([ 0., -5.,  2.,  0.])
    """

    codec_id: ClassVar[str] = "topk"
    fixed_size: ClassVar[bool] = True
    wants_error_feedback: ClassVar[bool] = True
    ratio: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", _check_ratio(self.codec_id, self.ratio))

    def k(self, numel: int) -> int:
        """Elements sent for a tensor of ``numel`` elements."""
        return _keep(self.ratio, numel)

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return self.k(numel) * (dtype.itemsize + 4)

    @staticmethod
    def _key(x: torch.Tensor) -> torch.Tensor:
        # Non-finite values rank first; spelled out rather than left to topk's NaN order.
        return x.abs().nan_to_num_(nan=math.inf, posinf=math.inf)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)
        bound = _abs_upper(flat)
        k = self.k(flat.numel())
        if 0 < k < flat.numel():
            key = self._key(flat)
            kth = key.topk(k, sorted=False).values.min()
            # Strictly above the k-th magnitude is always sent, whatever the tie order.
            bound.masked_fill_(key > kth, 0.0)
        elif k:
            bound.zero_()
        nonfinite = ~torch.isfinite(flat)
        if k < flat.numel() and int(nonfinite.sum()) >= k:
            # Every sent value may be non-finite: then the others decode to NaN.
            bound.fill_(math.inf)
        return bound.masked_fill_(nonfinite, math.inf).view(x.shape)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.numel()
        if n > MAX_TOPK_NUMEL:
            raise ConfigError(
                f"{self.spec}: a tensor of {n} elements is too large for int32 indices "
                f"(at most {MAX_TOPK_NUMEL}); split it into chunks first"
            )
        k = self.k(n)
        if k == n:
            idx = torch.arange(n, device=x.device)
        else:
            idx = self._key(x).topk(k, sorted=False).indices.sort().values
        return x.index_select(0, idx), idx.to(torch.int32)

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        k = self.k(numel)
        expect_sections(self.spec, payload, [(dtype, k), (torch.int32, k)])
        values, idx32 = payload
        out = torch.empty(numel, dtype=dtype, device=values.device)
        if k == 0:
            return out
        if k < numel:
            out.copy_(_nonfinite_fill((~torch.isfinite(values)).all(), dtype))
        idx = idx32.long()
        if idx.device.type == "cpu":
            if int(idx.min()) < 0 or int(idx.max()) >= numel:
                raise WireError(
                    f"{self.spec}: packet has indices outside [0, {numel}); the buffer is corrupted"
                )
        else:
            # Checking on an accelerator would cost a host sync; a corrupted buffer must not
            # crash the device either, so out-of-range indices are clamped. Use checksums.
            idx = idx.clamp(0, numel - 1)
        return out.index_copy_(0, idx, values)


# ------------------------------------------------------------------- randomk

_draws: dict[str, itertools.count] = {}
_draws_lock = threading.Lock()


def _next_draw(spec: str) -> int:
    with _draws_lock:
        counter = _draws.setdefault(spec, itertools.count())
        return next(counter)


def reset_draws() -> None:
    """Start every ``randomk`` config's draw counter at 0 again (for reproducible runs)."""
    with _draws_lock:
        _draws.clear()


@lru_cache(maxsize=1024)
def _subset_params(seed: int, numel: int) -> tuple[int, tuple[int, ...]]:
    """Multiplier ``a`` coprime with ``numel``, and four mixing keys below 2**31 - 1."""
    digest = hashlib.blake2b(f"commpress.randomk:{seed}:{numel}".encode(), digest_size=40).digest()
    words = [int.from_bytes(digest[i : i + 8], "little") for i in range(0, 40, 8)]
    a = 1 + words[0] % max(numel - 1, 1)
    while math.gcd(a, numel) != 1:
        a = a % numel + 1
    return a, tuple(w % _MERSENNE31 for w in words[1:])


@register_codec
@dataclass(frozen=True, repr=False)
class RandomK(Codec):
    """``k`` elements chosen from a seed all ranks share; only their values are sent.

    Payload per element: ``ratio * itemsize`` bytes, plus 16 bytes per tensor (the
    draw number and a non-finite flag). See `commpress.codecs.sparse` for how the
    subset is drawn and what happens to NaN and Inf.

    Args:
        ratio: fraction of elements sent, ``0 < ratio <= 1``; ``k = max(1, ceil(ratio * numel))``.
        seed: shared by every rank, ``0 <= seed < 2**63``.
        unbiased: scale sent values by ``numel / k`` on decode (unbiased over draws, larger
            error per call); off by default, which suits error feedback.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("randomk:ratio=0.25")
        >>> packet = c.encode(torch.randn(1000))
        >>> [tuple(t.shape) for t in packet.payload]   # 250 values, 2 state words, no indices
        [(250,), (2,)]
    """

    codec_id: ClassVar[str] = "randomk"
    fixed_size: ClassVar[bool] = True
    wants_error_feedback: ClassVar[bool] = True
    ratio: float = 0.01
    seed: int = 0
    unbiased: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", _check_ratio(self.codec_id, self.ratio))
        check_range(self.codec_id, "seed", self.seed, 0, 2**63 - 1, integer=True)
        check_bool(self.codec_id, "unbiased", self.unbiased)

    def k(self, numel: int) -> int:
        """Elements sent for a tensor of ``numel`` elements."""
        return _keep(self.ratio, numel)

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return self.k(numel) * dtype.itemsize + 16

    def indices(self, draw: torch.Tensor, numel: int) -> torch.Tensor:
        """The int64 indices (ascending in ``i``, not sorted) of draw ``draw`` (int64 ``[1]``)."""
        a, keys = _subset_params(self.seed, numel)
        h = (draw.remainder(_MERSENNE31) + keys[0]).remainder_(_MERSENNE31)
        for mult, key in zip(_MIX, keys[1:], strict=True):
            h = (h * mult + key).remainder_(_MERSENNE31)
            h = h ^ (h >> 16)
        b = h.remainder_(numel)
        i = torch.arange(self.k(numel), dtype=torch.int64, device=draw.device)
        return (i * a + b).remainder_(numel)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)
        bound = _abs_upper(flat)
        n = flat.numel()
        if self.unbiased and n:
            c = n / self.k(n)
            rel, absolute = OUT_ROUNDING[flat.dtype]
            bound = bound * max(1.0, c - 1) + bound * c * (2.0**-22 + rel) + absolute
        nonfinite = ~torch.isfinite(flat)
        if self.k(n) < n and bool(nonfinite.any()):
            # A tensor holding NaN/Inf decodes every element not sent to NaN.
            bound.fill_(math.inf)
        return bound.masked_fill_(nonfinite, math.inf).view(x.shape)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.numel()
        state = torch.empty(2, dtype=torch.int64, device=x.device)
        state[0] = _next_draw(self.spec)
        if n == 0:
            state[1] = 0
            return x, state
        # One fused pass: min and max are finite exactly when every element is.
        lo, hi = torch.aminmax(x)
        state[1:] = ~(torch.isfinite(lo) & torch.isfinite(hi))
        return x.index_select(0, self.indices(state[:1], n)), state

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        k = self.k(numel)
        expect_sections(self.spec, payload, [(dtype, k), (torch.int64, 2)])
        values, state = payload
        out = torch.empty(numel, dtype=dtype, device=values.device)
        if numel == 0:
            return out
        if k < numel:
            out.copy_(_nonfinite_fill(state[1] != 0, dtype))
        if self.unbiased:
            wide = torch.float64 if dtype == torch.float64 else torch.float32
            scaled = values.to(wide) * (numel / k)
            if dtype != wide:
                # Saturate rather than overflow a narrow dtype; +-Inf and NaN pass through.
                top = torch.finfo(dtype).max
                scaled = torch.where(torch.isfinite(values), scaled.clamp(-top, top), scaled)
            values = scaled.to(dtype)
        return out.index_copy_(0, self.indices(state[:1], numel), values)
