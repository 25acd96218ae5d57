"""Shared checks every codec's tests call (round trip, config, golden bytes, bad input).

A new codec gets its tests in a few lines::

    @pytest.mark.parametrize("spec", ["int8", "int8:block=64"])
    def test_int8(spec):
        codec = commpress.get_codec(spec)
        check_config(codec)
        check_roundtrip(codec, gaussian(1000))
        check_bad_input(codec)
        check_nonfinite(codec)
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..codec import Codec
from ..errors import CommpressError, UnsupportedDtypeError
from ..registry import get_codec
from ..wire import pack, unpack

__all__ = [
    "check_roundtrip",
    "check_config",
    "check_golden",
    "golden_digest",
    "check_bad_input",
    "check_nonfinite",
    "gaussian",
    "heavy_tailed",
    "zeros",
    "structured",
    "random_bits",
    "SHAPES",
]

#: Shapes every codec should survive: 0-d, empty, odd, not a multiple of any block, 2-D, 3-D.
SHAPES: tuple[tuple[int, ...], ...] = (
    (),
    (0,),
    (1,),
    (7,),
    (257,),
    (1000,),
    (33, 31),
    (2, 0, 3),
    (3, 5, 129),
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(
    shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    """Standard normal data, deterministic for a seed."""
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.randn(shape, generator=_generator(seed), dtype=torch.float64).to(dtype)


def heavy_tailed(
    shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    """Student-t (2 degrees of freedom) data: rare huge values, like real gradients."""
    shape = (shape,) if isinstance(shape, int) else shape
    g = _generator(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    chi2 = (
        torch.randn(shape, generator=g, dtype=torch.float64) ** 2
        + torch.randn(shape, generator=g, dtype=torch.float64) ** 2
    )
    t = z / torch.sqrt(chi2 / 2 + 1e-12)
    if dtype == torch.float16:
        t = t.clamp(-6e4, 6e4)
    return t.to(dtype)


def zeros(shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.zeros(shape, dtype=dtype)


def structured(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Small repeating values: compressible, exact in every dtype."""
    base = torch.arange(math.prod(shape)) % 13
    if dtype == torch.bool:
        return (base % 3 == 0).reshape(shape)
    if dtype.is_signed or dtype.is_floating_point or dtype.is_complex:
        base = base - 6
    return base.to(dtype).reshape(shape)


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Every bit pattern (NaN payloads, subnormals, -0.0): incompressible."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = math.prod(shape) * dtype.itemsize
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dtype).reshape(shape)


def check_roundtrip(codec: Codec, tensor: torch.Tensor, via_wire: bool = True) -> torch.Tensor:
    """Encode, (pack, unpack,) decode; assert shape, dtype, device and the error bound.

    Lossless codecs must be bit-exact. Lossy ones must satisfy
    ``|decoded - x| <= codec.error_bound(x)`` elementwise on finite elements,
    and ``encoded_nbytes`` (when not None) must equal the payload bytes.
    Also checks ``decode(..., out=...)`` writes in place. Returns the decoded tensor.
    """
    packet = codec.encode(tensor)
    expected = codec.encoded_nbytes(tensor.numel(), tensor.dtype)
    if expected is not None:
        assert packet.nbytes == expected, (
            f"{codec.spec}: encoded_nbytes says {expected}, payload has {packet.nbytes}"
        )
    if via_wire:
        packet = unpack(pack(packet), codec)
    decoded = codec.decode(packet)
    assert decoded.shape == tensor.shape, f"{codec.spec}: shape {decoded.shape} != {tensor.shape}"
    assert decoded.dtype == tensor.dtype, f"{codec.spec}: dtype {decoded.dtype} != {tensor.dtype}"
    assert decoded.device == tensor.device, (
        f"{codec.spec}: device {decoded.device} != {tensor.device}"
    )
    if codec.lossless:
        a = decoded.contiguous().view(-1)
        b = tensor.contiguous().view(-1)
        if a.dtype.is_floating_point or a.dtype.is_complex:
            a, b = a.view(torch.uint8), b.view(torch.uint8)  # bit-exact, NaN payloads included
        assert torch.equal(a, b), f"{codec.spec}: lossless round trip is not exact"
    else:
        x = tensor.detach().double()
        finite = torch.isfinite(x)
        err = (decoded.double() - x).abs()
        bound = codec.error_bound(tensor).double()
        assert bound.shape == tensor.shape, f"{codec.spec}: error_bound has shape {bound.shape}"
        # An Inf bound promises nothing (e.g. every element of a sign block holding NaN).
        bad = finite & ~(err <= bound * (1 + 1e-6) + 1e-30) & ~bound.isinf()
        if bad.any():
            i = int(bad.reshape(-1).nonzero()[0])
            raise AssertionError(
                f"{codec.spec} on {tensor.dtype}{tuple(tensor.shape)}: {int(bad.sum())} element(s) "
                f"exceed the bound; first at flat index {i}: x={x.reshape(-1)[i].item()!r} "
                f"decoded={decoded.double().reshape(-1)[i].item()!r} "
                f"bound={bound.reshape(-1)[i].item()!r}"
            )
    out = torch.empty_like(tensor)
    returned = codec.decode(codec.encode(tensor), out=out)
    assert returned is out, f"{codec.spec}: decode(out=...) must return out"
    return decoded


def check_config(codec: Codec) -> None:
    """Config and spec round trip through the registry; equality and hashing follow the config."""
    again = get_codec(codec.config())
    assert again == codec, f"config round trip changed {codec.spec}: {again.spec}"
    assert get_codec(codec.spec) == codec, f"spec round trip changed {codec.spec}"
    assert hash(again) == hash(codec)
    assert again.config_hash == codec.config_hash
    assert repr(codec) == f"Codec({codec.spec!r})"
    assert codec.config()["id"] == codec.config().get("id") and isinstance(codec.config(), dict)


def golden_digest(codec: Codec, tensor: torch.Tensor) -> str:
    """SHA-256 of ``pack(codec.encode(tensor))``: what golden files store."""
    buf = pack(codec.encode(tensor))
    return hashlib.sha256(buf.cpu().numpy().tobytes()).hexdigest()


def check_golden(codec: Codec, tensor: torch.Tensor, expected: str) -> None:
    """The wire bytes of ``tensor`` must hash to ``expected`` (so the format cannot drift).

    ``expected`` is a SHA-256 hex digest, or the full hex of the buffer for small ones.
    """
    buf = pack(codec.encode(tensor)).cpu().numpy().tobytes()
    got = buf.hex() if len(expected) != 64 else hashlib.sha256(buf).hexdigest()
    assert got == expected, (
        f"{codec.spec}: encoded bytes drifted from the golden value; if the change is "
        "intended, bump the wire/codec version and regenerate the golden file"
    )


def check_bad_input(codec: Codec) -> None:
    """Non-tensors raise TypeError; unsupported dtypes raise UnsupportedDtypeError."""
    try:
        codec.encode([1.0, 2.0])  # type: ignore[arg-type]
    except TypeError as exc:
        assert "Tensor" in str(exc)
    else:
        raise AssertionError(f"{codec.spec}: encoding a list did not raise TypeError")
    for dtype in (torch.int32, torch.int64, torch.uint8, torch.bool):
        t = torch.ones(10, dtype=dtype)
        if codec.supports(dtype):
            continue
        try:
            codec.encode(t)
        except UnsupportedDtypeError as exc:
            assert str(dtype).replace("torch.", "") in str(exc), str(exc)
            assert isinstance(exc, CommpressError)
        else:
            raise AssertionError(f"{codec.spec}: encoding {dtype} did not raise")


def check_nonfinite(
    codec: Codec, dtype: torch.dtype = torch.float32, may_drop: bool = False
) -> torch.Tensor:
    """NaN must decode to NaN and Inf to a non-finite value -- never silently finite.

    Args:
        may_drop: for sparsifiers that send only some elements (``randomk``): a
            non-finite element that was not sent may decode to exactly 0, never to a
            nonzero finite value.

    Returns the decoded tensor so a test can pin the codec's documented behaviour further.
    """
    x = gaussian(600, dtype, seed=3)
    x[5] = float("nan")
    x[300] = float("inf")
    x[301] = float("-inf")
    decoded = codec.decode(unpack(pack(codec.encode(x)), codec))
    for i in (5, 300, 301):
        value = decoded[i]
        if may_drop and value.item() == 0:
            continue
        assert not torch.isfinite(value), (
            f"{codec.spec}: non-finite input at index {i} ({x[i].item()}) decoded to "
            f"finite {value.item()}"
        )
    return decoded


def edge_values(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Hostile data for lossy codecs: the dtype's extremes, subnormals, signed zeros,
    NaN and +-Inf, each inside otherwise ordinary blocks, and blocks made only of them.

    1-D, a length that is a multiple of no common block size.
    """
    info = torch.finfo(dtype)
    g = _generator(seed)
    base = torch.randn(4099, generator=g, dtype=torch.float64)
    special = [
        info.max,
        -info.max,
        info.max * 0.999,
        info.tiny,
        -info.tiny,
        info.tiny / 8,
        info.smallest_normal * 2**-3,
        0.0,
        -0.0,
        65504.0,
        -65504.0,
        65519.0,
        1e-40,
        float("nan"),
        float("inf"),
        -float("inf"),
        1.0,
        -1.0,
    ]
    # Keep every value representable in ``dtype`` (float16 has no 1e-40, nor 2**127).
    special_t = torch.tensor(special, dtype=torch.float64).to(dtype).to(torch.float64)
    x = base.clone()
    x[5 : 5 + len(special)] = special_t  # one of each, inside a block of normal values
    x[600:856] = info.max  # a block (of the usual sizes) at the top of the range
    x[1024:1100] = 0.0
    x[1100:1110] = -0.0
    x[2048:2304] = info.tiny / 4  # a block of subnormals (0 in formats without them)
    x[3000:3050] = torch.linspace(-3.0, 3.0, 50, dtype=torch.float64) * info.tiny
    x[3500] = float("nan")
    x[3501:3600] = base[3501:3600] * 1e30
    return x.to(dtype)


def check_fast_matches_reference(codec: Codec, tensor: torch.Tensor) -> None:
    """The fast kernels (``commpress.kernels``) must agree with the reference path.

    Encodes ``tensor`` with each path and compares the payloads bit for bit (the
    ``sign`` codec's float32 scales may differ by one ulp: another summation order);
    decodes the reference packet with each path, written and accumulated into a
    float32 buffer, and compares bit for bit (NaN positions included). A codec or
    device without a fast path passes trivially (both sides run the reference).
    """
    from .. import kernels

    fast = codec.encode(tensor)
    with kernels.reference_only():
        ref = codec.encode(tensor)
        ref_decoded = codec.decode(ref)
        acc_ref = None
        if tensor.dtype != torch.float64:
            acc_ref = _acc_start(tensor)
            codec.decode(ref, out=acc_ref, accumulate=True)
    ulps = 1 if codec.codec_id == "sign" else 0
    for i, (a, b) in enumerate(zip(fast.payload, ref.payload, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{codec.spec}: payload section {i} is {a.dtype}{tuple(a.shape)} on the fast path, "
            f"{b.dtype}{tuple(b.shape)} on the reference path"
        )
        if a.dtype == torch.float32 and ulps:
            diff = (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()
            worst = int(diff.max()) if diff.numel() else 0
            assert worst <= ulps, (
                f"{codec.spec}: section {i} differs by {worst} ulps (allowed {ulps})"
            )
        else:
            same = torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
            assert same, (
                f"{codec.spec} on {tensor.dtype}: payload section {i} differs between the fast "
                f"and the reference path at {int((a != b).sum())} element(s)"
            )
    decoded = codec.decode(ref)
    _assert_same_bits(codec, "decode", decoded, ref_decoded)
    into = torch.full_like(ref_decoded, 7.0)
    codec.decode(ref, out=into)
    _assert_same_bits(codec, "decode(out=)", into, ref_decoded)
    if acc_ref is not None:
        acc = _acc_start(tensor)
        codec.decode(ref, out=acc, accumulate=True)
        _assert_same_bits(codec, "decode(accumulate=True)", acc, acc_ref)


def _acc_start(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, max(tensor.numel(), 1))[: tensor.numel()].view(tensor.shape)


def _assert_same_bits(codec: Codec, what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{codec.spec}: {what} shape/dtype differ"
    a, b = a.reshape(-1), b.reshape(-1)
    same = (a == b) | (a.isnan() & b.isnan())
    if not bool(same.all()):
        i = int((~same).nonzero()[0])
        raise AssertionError(
            f"{codec.spec}: {what} differs between the fast and the reference path at "
            f"{int((~same).sum())} element(s); first at {i}: {a[i].item()!r} vs {b[i].item()!r}"
        )
