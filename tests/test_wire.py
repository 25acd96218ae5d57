"""The wire format: pack/unpack round trips, and hostile buffers that must raise WireError."""

from __future__ import annotations

import resource
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import commpress
from commpress.codec import CODE_DTYPES
from commpress.errors import CodecMismatchError, CommpressError, WireError
from commpress.testing import gaussian
from commpress.wire import HEADER_FIXED, MAGIC, VERSION, pack, packed_nbytes, read_spec, unpack

# Offsets of the fixed header fields (see the wire.py docstring).
OFF_MAGIC, OFF_VERSION, OFF_FLAGS, OFF_DTYPE, OFF_NDIM = 0, 4, 5, 6, 7
OFF_NSEC, OFF_SPECLEN, OFF_HEADERLEN, OFF_HASH, OFF_SHAPE = 8, 10, 12, 16, 24

EXPECTED = (WireError, CodecMismatchError)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sample(codec: commpress.Codec) -> torch.Tensor:
    if codec.supports(torch.float32):
        return gaussian((33, 31), torch.float32, seed=2)
    return (torch.arange(33 * 31) % 7).to(torch.int32).reshape(33, 31)


def _encode_or_skip(codec: commpress.Codec, x: torch.Tensor) -> commpress.Packet:
    try:
        return codec.encode(x)
    except CommpressError as exc:
        if codec.algorithm is None:
            raise
        pytest.skip(f"{codec.spec} is used through its algorithm ({codec.algorithm}): {exc}")


def _specs() -> list[str]:
    chains = [s for s in ("bf16+zstd", "int8+zstd", "fp8+lz4") if
              all(part in commpress.list_codecs() for part in s.split("+"))]
    return [*commpress.list_codecs(), *chains]


def _buffer(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def _bytes(buffer: torch.Tensor) -> bytearray:
    return bytearray(buffer.numpy().tobytes())


def _patch(buffer: torch.Tensor, offset: int, fmt: str, value) -> torch.Tensor:
    raw = _bytes(buffer)
    struct.pack_into(fmt, raw, offset, value)
    return _buffer(bytes(raw))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def _section_table(buffer: torch.Tensor) -> tuple[int, int]:
    """(offset of the first section-table entry, number of sections)."""
    raw = _bytes(buffer)
    ndim, nsec, spec_len = raw[OFF_NDIM], *struct.unpack_from("<HH", raw, OFF_NSEC)
    return OFF_SHAPE + 8 * ndim + spec_len, nsec


def _zstd_buffer(checksum: bool = False) -> torch.Tensor:
    return pack(commpress.get_codec("zstd").encode(gaussian((5, 20), seed=4)), checksum=checksum)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("spec", _specs())
@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "crc"])
def test_pack_unpack_round_trip_every_codec(spec, checksum):
    codec = commpress.get_codec(spec)
    x = _sample(codec)
    packet = _encode_or_skip(codec, x)
    buffer = pack(packet, checksum=checksum)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert buffer.numel() == packed_nbytes(packet, checksum=checksum)
    assert buffer.numel() % 8 == 0
    assert read_spec(buffer) == codec.spec
    for receiver in (codec, None):
        got = unpack(buffer, receiver)
        assert got.meta == packet.meta
        assert len(got.payload) == len(packet.payload)
        for a, b in zip(got.payload, packet.payload, strict=True):
            assert _same_bytes(a, b)
        assert _same_bytes(codec.decode(got), codec.decode(packet))


def test_sections_are_aligned_views_into_the_buffer():
    packet = commpress.get_codec("bf16+zstd").encode(gaussian(1000))
    buffer = pack(packet)
    got = unpack(buffer)
    for section in got.payload:
        assert section.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert (section.data_ptr() - buffer.data_ptr()) % 8 == 0


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float64, torch.int64, torch.bool])
def test_wide_dtypes_and_misaligned_buffers(dtype):
    codec = commpress.get_codec("none")
    x = torch.arange(10).to(dtype)
    buffer = pack(codec.encode(x))
    for shift in (0, 1, 3, 8):
        host = torch.zeros(buffer.numel() + shift, dtype=torch.uint8)
        host[shift:] = buffer
        assert _same_bytes(codec.decode(unpack(host[shift:], codec)), x)


def test_empty_and_zero_dim_packets():
    codec = commpress.get_codec("none")
    for x in (torch.zeros(0), torch.tensor(3.5), torch.zeros(2, 0, 3)):
        got = codec.decode(unpack(pack(codec.encode(x)), codec))
        assert got.shape == x.shape and torch.equal(got, x)


# ------------------------------------------------------------------ truncation
@pytest.mark.parametrize("spec", ["none", "zstd", "bf16+lz4"])
@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "crc"])
def test_every_truncation_raises(spec, checksum):
    codec = commpress.get_codec(spec)
    buffer = pack(codec.encode(gaussian(40, seed=5)), checksum=checksum)
    for n in range(buffer.numel()):
        with pytest.raises(WireError):
            unpack(buffer[:n].clone())
    for extra in (1, 8, 1000):
        longer = torch.cat([buffer, torch.zeros(extra, dtype=torch.uint8)])
        with pytest.raises(WireError, match="describes"):
            unpack(longer)


def test_not_a_uint8_vector():
    for bad in (b"CMPR", torch.zeros(64, dtype=torch.int32), torch.zeros(8, 8, dtype=torch.uint8)):
        with pytest.raises(WireError):
            unpack(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ corrupted header fields
def _hostile_variants() -> list[tuple[str, torch.Tensor]]:
    buf = _zstd_buffer(checksum=True)
    raw = _bytes(buf)
    ndim, nsec = raw[OFF_NDIM], struct.unpack_from("<H", raw, OFF_NSEC)[0]
    spec_len, header_len = struct.unpack_from("<HI", raw, OFF_SPECLEN)
    table, _ = _section_table(buf)
    first_nbytes = struct.unpack_from("<Q", raw, table + 1)[0]
    unknown_code = max(CODE_DTYPES) + 1
    out = [
        ("magic", _patch(buf, OFF_MAGIC, "4s", b"XMPR")),
        ("magic zero", _patch(buf, OFF_MAGIC, "4s", bytes(4))),
        *[(f"version {v}", _patch(buf, OFF_VERSION, "B", v)) for v in (0, VERSION + 1, 255)],
        *[(f"flags {f:#x}", _patch(buf, OFF_FLAGS, "B", f)) for f in (2, 0x80, 0xFF)],
        *[(f"dtype {c}", _patch(buf, OFF_DTYPE, "B", c)) for c in (0, unknown_code, 255)],
        *[(f"ndim {n}", _patch(buf, OFF_NDIM, "B", n)) for n in (ndim + 1, 33, 255)],
        *[(f"nsec {n}", _patch(buf, OFF_NSEC, "<H", n)) for n in (0, nsec + 1, 1025, 0xFFFF)],
        *[(f"spec_len {n}", _patch(buf, OFF_SPECLEN, "<H", n))
          for n in (0, spec_len + 1, 4097, 0xFFFF)],
        *[(f"header_len {n}", _patch(buf, OFF_HEADERLEN, "<I", n))
          for n in (0, header_len + 8, header_len - 8, 2**32 - 1)],
        ("shape negative", _patch(buf, OFF_SHAPE, "<q", -1)),
        ("shape huge", _patch(buf, OFF_SHAPE, "<q", 2**62)),
        ("shape int64 min", _patch(buf, OFF_SHAPE, "<q", -(2**63))),
        ("shape product overflow", _patch(_patch(buf, OFF_SHAPE, "<q", 2**40),
                                          OFF_SHAPE + 8, "<q", 2**40)),
        ("spec not utf-8", _patch(buf, OFF_SHAPE + 8 * ndim, "B", 0xFF)),
        ("section dtype 0", _patch(buf, table, "B", 0)),
        ("section dtype unknown", _patch(buf, table, "B", unknown_code)),
        *[(f"section bytes {n}", _patch(buf, table + 1, "<Q", n))
          for n in (first_nbytes + 8, first_nbytes - 8 if first_nbytes >= 8 else 2**40,
                    2**40, 2**63, 2**64 - 1)],
        ("section not whole elements", _patch(buf, table, "B", 8)),  # uint8 bytes as float32
        ("crc", _patch(buf, table + 9 * nsec, "<I", (struct.unpack_from(
            "<I", raw, table + 9 * nsec)[0] + 1) % 2**32)),
    ]
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    "name, buffer", _hostile_variants(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_corrupted_header_fields_raise_without_big_allocations(name, buffer):
    before = _peak_rss_mib()
    with pytest.raises(WireError):
        packet = unpack(buffer)
        # A corrupted shape that is still plausible must fail at the latest when decoding.
        commpress.get_codec(packet.meta.spec).decode(packet)
    assert _peak_rss_mib() - before < 256, f"{name}: unpack allocated a lot of memory"


def test_spec_naming_an_unknown_codec():
    buf = _zstd_buffer()
    offset = OFF_SHAPE + 8 * _bytes(buf)[OFF_NDIM]
    forged = _patch(buf, offset, "4s", b"zstq")
    with pytest.raises(WireError, match="cannot build"):
        unpack(forged)
    with pytest.raises(CodecMismatchError):
        unpack(forged, commpress.get_codec("zstd"))


def test_config_hash_mismatch():
    buf = _zstd_buffer()
    forged = _patch(buf, OFF_HASH, "<Q", 12345)
    with pytest.raises(WireError, match="config hash"):
        unpack(forged)
    with pytest.raises(CodecMismatchError, match="config hash"):
        unpack(forged, commpress.get_codec("zstd"))


# ------------------------------------------------------------------ checksum
def _payload_positions(buffer: torch.Tensor) -> list[int]:
    raw = _bytes(buffer)
    header_len = struct.unpack_from("<I", raw, OFF_HEADERLEN)[0]
    table, nsec = _section_table(buffer)
    positions, pos = [], header_len
    for i in range(nsec):
        nbytes = struct.unpack_from("<Q", raw, table + 9 * i + 1)[0]
        positions += range(pos, pos + nbytes)
        pos += (nbytes + 7) & ~7
    return positions


@pytest.mark.parametrize("spec", ["none", "zstd", "bf16+lz4"])
def test_crc_detects_every_flipped_payload_byte(spec):
    buffer = pack(commpress.get_codec(spec).encode(gaussian(30, seed=6)), checksum=True)
    positions = _payload_positions(buffer)
    assert positions
    for pos in positions:
        for bit in (0x01, 0x80):
            bad = buffer.clone()
            bad[pos] ^= bit
            with pytest.raises(WireError, match="checksum"):
                unpack(bad)


def test_without_crc_flipped_payload_is_not_detected():
    codec = commpress.get_codec("none")
    buffer = pack(codec.encode(torch.zeros(4)))
    buffer[_payload_positions(buffer)[0]] ^= 0xFF
    assert codec.decode(unpack(buffer, codec))[0] != 0


# ------------------------------------------------------------------ codec mismatch
def test_codec_mismatch_names_both_specs():
    buffer = pack(commpress.get_codec("zstd:level=5").encode(torch.zeros(8)))
    with pytest.raises(CodecMismatchError) as info:
        unpack(buffer, commpress.get_codec("lz4:acceleration=2"))
    assert "'zstd:level=5'" in str(info.value) and "'lz4:acceleration=2'" in str(info.value)
    with pytest.raises(CodecMismatchError, match="zstd:level=5"):
        unpack(buffer, commpress.get_codec("zstd"))


def test_packing_a_dtype_without_a_wire_code():
    packet = commpress.get_codec("none").encode(torch.zeros(4, dtype=torch.float8_e4m3fnuz))
    with pytest.raises(WireError, match="wire code"):
        pack(packet)


# ------------------------------------------------------------------ property-based fuzzing
def _unpack_and_maybe_decode(buffer: torch.Tensor, decode: bool) -> None:
    try:
        packet = unpack(buffer)
        if decode:
            commpress.get_codec(packet.meta.spec).decode(packet)
    except EXPECTED:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(data):
    _unpack_and_maybe_decode(_buffer(data), decode=False)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 255), st.integers(0, 255))
def test_fuzz_bytes_behind_a_valid_magic(tail, flags, dtype_code):
    head = MAGIC + bytes([VERSION, flags & 1, dtype_code])
    _unpack_and_maybe_decode(_buffer(head + tail), decode=True)
    assert len(head) < HEADER_FIXED


def _valid_buffers() -> list[torch.Tensor]:
    # Codecs whose decoders this suite vouches for; other codecs are fuzzed in their own tests.
    specs = ["none", "bf16", "fp16", "lz4", "zstd", "bf16+zstd", "zstd+lz4"]
    out = []
    for i, spec in enumerate(specs):
        x = gaussian((3, 7), seed=i) if i % 2 else (torch.arange(21) % 5).float()
        out.append(pack(commpress.get_codec(spec).encode(x), checksum=bool(i % 3 == 0)))
    return out


VALID = _valid_buffers()


@FUZZ
@given(
    st.sampled_from(range(len(VALID))),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(-16, 16),
)
def test_fuzz_mutated_valid_buffers(which, edits, resize):
    raw = _bytes(VALID[which])
    for pos, value in edits:
        raw[pos % len(raw)] = value
    if resize < 0:
        raw = raw[:resize]
    elif resize > 0:
        raw += bytes(resize)
    _unpack_and_maybe_decode(_buffer(bytes(raw)), decode=True)


@FUZZ
@given(st.sampled_from(range(len(VALID))), st.integers(0, 2**64 - 1), st.sampled_from(
    [(OFF_SHAPE, "<Q"), (OFF_NSEC, "<H"), (OFF_SPECLEN, "<H"), (OFF_HEADERLEN, "<I"),
     (OFF_NDIM, "B"), (OFF_DTYPE, "B"), (OFF_FLAGS, "B")]))
def test_fuzz_header_fields(which, value, field):
    offset, fmt = field
    value %= 2 ** (8 * struct.calcsize(fmt))
    _unpack_and_maybe_decode(_patch(VALID[which], offset, fmt, value), decode=True)
