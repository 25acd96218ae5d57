"""The wire formats: packet pack/unpack round trips and hostile buffers that must raise
WireError; the collective and point-to-point descriptors, and their checks."""

from __future__ import annotations

import resource
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import commpress
import commpress.distributed as cdist
from commpress.codec import CODE_DTYPES, Packet, PacketMeta
from commpress.errors import CodecMismatchError, CollectiveError, CommpressError, WireError
from commpress.policy import Policy, using
from commpress.testing import gaussian
from commpress.wire import (
    HEADER_FIXED,
    MAGIC,
    VERSION,
    Descriptor,
    DescriptorTable,
    P2PDescriptor,
    pack,
    packed_nbytes,
    read_spec,
    unpack,
)
from commpress.wire import packet as packet_module
from commpress.wire.descriptor import DESCRIPTOR_MAGIC, FIXED_WORDS, OP_CODES, spec_row
from commpress.wire.p2p import P2P_WORDS

# Offsets of the fixed header fields (see the wire/packet.py docstring).
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
    return [*commpress.list_codecs(), "bf16+zstd", "int8+zstd", "fp8+lz4"]


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
        *[
            (f"spec_len {n}", _patch(buf, OFF_SPECLEN, "<H", n))
            for n in (0, spec_len + 1, 4097, 0xFFFF)
        ],
        *[
            (f"header_len {n}", _patch(buf, OFF_HEADERLEN, "<I", n))
            for n in (0, header_len + 8, header_len - 8, 2**32 - 1)
        ],
        ("shape negative", _patch(buf, OFF_SHAPE, "<q", -1)),
        ("shape huge", _patch(buf, OFF_SHAPE, "<q", 2**62)),
        ("shape int64 min", _patch(buf, OFF_SHAPE, "<q", -(2**63))),
        (
            "shape product overflow",
            _patch(_patch(buf, OFF_SHAPE, "<q", 2**40), OFF_SHAPE + 8, "<q", 2**40),
        ),
        ("spec not utf-8", _patch(buf, OFF_SHAPE + 8 * ndim, "B", 0xFF)),
        ("section dtype 0", _patch(buf, table, "B", 0)),
        ("section dtype unknown", _patch(buf, table, "B", unknown_code)),
        *[
            (f"section bytes {n}", _patch(buf, table + 1, "<Q", n))
            for n in (
                first_nbytes + 8,
                first_nbytes - 8 if first_nbytes >= 8 else 2**40,
                2**40,
                2**63,
                2**64 - 1,
            )
        ],
        ("section not whole elements", _patch(buf, table, "B", 8)),  # uint8 bytes as float32
        (
            "crc",
            _patch(
                buf,
                table + 9 * nsec,
                "<I",
                (struct.unpack_from("<I", raw, table + 9 * nsec)[0] + 1) % 2**32,
            ),
        ),
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
@given(
    st.sampled_from(range(len(VALID))),
    st.integers(0, 2**64 - 1),
    st.sampled_from(
        [
            (OFF_SHAPE, "<Q"),
            (OFF_NSEC, "<H"),
            (OFF_SPECLEN, "<H"),
            (OFF_HEADERLEN, "<I"),
            (OFF_NDIM, "B"),
            (OFF_DTYPE, "B"),
            (OFF_FLAGS, "B"),
        ]
    ),
)
def test_fuzz_header_fields(which, value, field):
    offset, fmt = field
    value %= 2 ** (8 * struct.calcsize(fmt))
    _unpack_and_maybe_decode(_patch(VALID[which], offset, fmt, value), decode=True)


# ------------------------------------------------------------------ config hash in the meta
def test_packets_carry_the_config_hash_and_pack_never_rebuilds_the_codec(monkeypatch):
    codec = commpress.get_codec("int8:block=64")
    packet = codec.encode(gaussian(300))
    assert packet.meta.config_hash == codec.config_hash
    monkeypatch.setattr(packet_module, "get_codec", lambda spec: pytest.fail("registry used"))
    buffer = pack(packet)
    assert packet_module.encode_pack(codec, gaussian(300)).numel() == buffer.numel()
    assert unpack(buffer, codec).meta == packet.meta


def test_a_packet_built_by_hand_without_a_hash_still_packs():
    codec = commpress.get_codec("none")
    x = torch.arange(6.0)
    made = Packet(codec.encode(x).payload, PacketMeta(torch.Size([6]), torch.float32, "none"))
    assert made.meta.config_hash is None
    assert torch.equal(codec.decode(unpack(pack(made), codec)), x)


# ------------------------------------------------------------------ collective descriptor
def _desc(**kw) -> Descriptor:
    fields = dict(
        op=OP_CODES["all_reduce"],
        algorithm=2,
        config_hash=commpress.get_codec("int8").config_hash,
        spec_nbytes=4,
        dtype=torch.float32,
        numel=1000,
        redop=0,
        root=-1,
        sizes=(96, 104),
    )
    fields.update(kw)
    return Descriptor(**fields)


def _table(*descs: Descriptor, op: str = "all_reduce") -> DescriptorTable:
    rows = torch.cat([d.to_tensor(len(descs), torch.device("cpu")) for d in descs])
    return DescriptorTable.from_tensor(rows, len(descs), op)


def test_descriptor_round_trip():
    big_hash = (1 << 64) - 5  # stored as a negative int64
    a, b = _desc(config_hash=big_hash), _desc(config_hash=big_hash, sizes=(7, 0), numel=9)
    row = a.to_tensor(2, torch.device("cpu"))
    assert row.dtype == torch.int64 and row.numel() == FIXED_WORDS + 2
    assert int(row[0]) == DESCRIPTOR_MAGIC
    table = _table(a, b)
    assert table.rows == (a, b)
    assert table.sizes_from(1) == [7, 0] and table.sizes_to(0) == [96, 7]
    assert table.numel(1) == 9 and table.same_codec()
    table.check_status()
    table.check_call(same_numel=False)
    with pytest.raises(CollectiveError, match="number of elements: rank 0: 1000, rank 1: 9"):
        table.check_call(same_numel=True)


def test_descriptor_checks_raise_in_order():
    rejected = _desc(algorithm=0, dtype=None, numel=0, redop=-1, status=1, sizes=())
    with pytest.raises(CollectiveError, match=r"all_reduce: rank\(s\) \[1\].*rejected"):
        _table(_desc(), rejected).check_status()
    with pytest.raises(CollectiveError, match="rank 0: all_reduce, rank 1: broadcast"):
        _table(_desc(), _desc(op=OP_CODES["broadcast"])).check_status()
    names = {2: "two_phase", 1: "direct"}.get
    cases = [
        (_desc(algorithm=1), "algorithm.*rank 1: direct", names),
        (_desc(dtype=torch.float16), "dtype: rank 0: torch.float32, rank 1: torch.float16", str),
        (_desc(redop=4), "reduce op: rank 0: SUM, rank 1: MAX", str),
        (_desc(root=1), "root rank", str),
    ]
    for other, message, show in cases:
        with pytest.raises(CollectiveError, match=message):
            _table(_desc(), other).check_call(same_numel=True, algorithm_name=show)


def test_descriptor_codec_mismatch_names_every_spec():
    specs = ["int8", "int4:block=128", "int8"]
    descs = [
        _desc(config_hash=commpress.get_codec(s).config_hash, spec_nbytes=len(s), sizes=(0,) * 3)
        for s in specs
    ]
    table = _table(*descs)
    assert not table.same_codec() and table.longest_spec == len(specs[1])
    gathered = torch.cat([spec_row(s, table.longest_spec, torch.device("cpu")) for s in specs])
    assert table.specs(gathered) == specs
    error = table.codec_mismatch(specs, rank=1)
    assert isinstance(error, CodecMismatchError)
    assert "ranks 0, 2: 'int8'; rank 1: 'int4:block=128'" in str(error)
    assert "this rank (1) uses 'int4:block=128'" in str(error)
    with pytest.raises(CollectiveError, match="spec table"):
        table.specs(gathered[:-1])


@pytest.mark.parametrize(
    "word, value, message",
    [
        (0, 12345, "different commpress versions"),
        (4, 1 << 40, "spec length"),
        (5, 200, "dtype code"),
        (6, -1, "element count"),
        (6, 1 << 60, "element count"),
        (9, 2, "status"),
        (FIXED_WORDS, -8, "sizes"),
        (FIXED_WORDS + 1, 1 << 62, "sizes"),
    ],
)
def test_malformed_descriptor_rows_raise(word, value, message):
    rows = torch.cat([_desc().to_tensor(2, torch.device("cpu")) for _ in range(2)])
    rows[FIXED_WORDS + 2 + word] = value
    with pytest.raises(CollectiveError, match=message):
        DescriptorTable.from_tensor(rows, 2, "all_reduce")


def test_descriptor_table_of_the_wrong_width_raises():
    rows = torch.cat([_desc().to_tensor(2, torch.device("cpu")) for _ in range(2)])
    for bad in (rows[:-1], rows.int(), torch.cat([rows, rows])):
        with pytest.raises(CollectiveError, match="descriptor table"):
            DescriptorTable.from_tensor(bad, 2, "all_reduce")


# ------------------------------------------------------------------ point-to-point descriptor
def _p2p(codec: commpress.Codec, x: torch.Tensor) -> tuple[P2PDescriptor, torch.Tensor]:
    payload = pack(codec.encode(x))
    return P2PDescriptor.for_send(codec, x, payload.numel(), 1 << 30), payload


def test_p2p_descriptor_round_trip():
    codec = commpress.get_codec("int8")
    desc, payload = _p2p(codec, gaussian(500))
    words = desc.to_tensor(torch.device("cpu"))
    assert words.dtype == torch.int64 and words.numel() == P2P_WORDS
    assert P2PDescriptor.empty(torch.device("cpu")).shape == words.shape
    got = P2PDescriptor.from_tensor(words)
    assert got == desc and got.config_hash == codec.config_hash
    assert (got.numel, got.dtype, got.nbytes) == (500, torch.float32, payload.numel())
    got.check_codec(codec, payload, source=0)


@pytest.mark.parametrize(
    "word, value, message",
    [
        (0, 7, "not a commpress p2p descriptor"),
        (2, 5000, "spec length"),
        (3, 200, "dtype code"),
        (4, -3, "malformed"),
        (5, 1 << 60, "malformed"),
        (6, -1, "malformed"),
        (7, 1, "reserved"),
    ],
)
def test_malformed_p2p_descriptors_raise(word, value, message):
    words = _p2p(commpress.get_codec("int8"), gaussian(10))[0].to_tensor(torch.device("cpu"))
    words[word] = value
    with pytest.raises(WireError, match=message):
        P2PDescriptor.from_tensor(words)
    with pytest.raises(WireError, match="int64 words"):
        P2PDescriptor.from_tensor(words[:-1])


def test_p2p_check_codec_names_both_specs():
    sent, payload = _p2p(commpress.get_codec("int8"), gaussian(100))
    with pytest.raises(CodecMismatchError) as info:
        sent.check_codec(commpress.get_codec("int4"), payload, source=3)
    assert "rank 3 sent" in str(info.value)
    assert "'int8'" in str(info.value) and "'int4'" in str(info.value)
    # Same spec length, other hash: the hash alone decides.
    forged = P2PDescriptor(sent.config_hash ^ 1, 4, torch.float32, 100, payload.numel(), 1 << 30)
    with pytest.raises(CodecMismatchError, match="same spec, different config hash"):
        forged.check_codec(commpress.get_codec("int8"), payload, source=0)
    with pytest.raises(CodecMismatchError, match="unreadable spec of 4 bytes"):
        sent.check_codec(commpress.get_codec("int4"), payload[:10], source=0)


def _p2p_mismatch_body(rank, world):
    """Rank 0 sends int8; rank 1 receives as int4 (sync, then async), then as int8."""
    out: dict[str, tuple[str, str]] = {}
    x = gaussian(1000, seed=11)
    with using(Policy(min_bytes=0, error_feedback=False)):
        for name in ("recv", "irecv"):
            if rank == 0:
                cdist.send(x, 1, tag=5, codec="int8")
                continue
            got = torch.empty(1000)
            try:
                if name == "recv":
                    cdist.recv(got, 0, tag=5, codec="int4")
                else:
                    cdist.irecv(got, 0, tag=5, codec="int4").wait()
                out[name] = ("ok", "")
            except Exception as exc:  # noqa: BLE001 - returned to the test
                out[name] = (type(exc).__name__, str(exc))
        # The channel is still usable: a matching send arrives intact.
        if rank == 0:
            cdist.send(x, 1, tag=5, codec="int8")
        else:
            got = torch.empty(1000)
            cdist.recv(got, 0, tag=5, codec="int8")
            expected = commpress.get_codec("int8").roundtrip(x)
            out["after"] = ("ok", "") if torch.equal(got, expected) else ("differs", "")
    return out


def test_p2p_receiver_checks_the_senders_codec(gloo2):
    sender, receiver = gloo2.run(_p2p_mismatch_body)
    assert sender == {}
    for name in ("recv", "irecv"):
        kind, message = receiver[name]
        assert kind == "CodecMismatchError", (name, kind, message)
        assert "rank 0 sent" in message and "'int8'" in message and "'int4'" in message, message
    assert receiver["after"] == ("ok", "")
