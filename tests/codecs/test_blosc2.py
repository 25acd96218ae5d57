"""The c-blosc2 container lz4 and zstd share: sizes, chunk settings, devices, hostile input.

Each test runs on both codecs (the format and its validation are one implementation,
``codecs/lossless.py``); the per-codec suites are in test_lz4 and test_zstd.
"""

import os
import struct
import subprocess
import sys
import textwrap

import blosc2
import pytest
import torch

import commpress
from commpress.codecs.lossless import PIECE_BYTES
from commpress.errors import UnsupportedDeviceError, WireError
from commpress.testing import check_roundtrip, gaussian, random_bits, structured
from commpress.wire import pack, unpack


# ------------------------------------------------------------------ size
@pytest.mark.parametrize("spec", ["lz4", "zstd", "zstd:level=22", "lz4:acceleration=65537"])
@pytest.mark.parametrize("nbytes", [1, 7, 64, 4097, 1 << 18])
def test_incompressible_input_grows_by_one_byte_at_most(spec, nbytes):
    codec = commpress.get_codec(spec)
    x = random_bits((nbytes,), torch.uint8, seed=nbytes)
    packet = codec.encode(x)
    assert len(packet.payload) == 1 and packet.payload[0].dtype == torch.uint8
    assert packet.nbytes <= nbytes + 1
    assert int(packet.payload[0][0]) == 0  # stored raw
    check_roundtrip(codec, x)


@pytest.mark.parametrize("spec", ["lz4", "zstd"])
def test_compressible_input_compresses(spec):
    codec = commpress.get_codec(spec)
    x = torch.zeros(1 << 18, dtype=torch.float32)
    packet = codec.encode(x)
    assert int(packet.payload[0][0]) == 1
    assert x.numel() * 4 / packet.nbytes > 100


@pytest.mark.parametrize("name", ["lz4", "zstd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_byte_shuffle_raises_the_ratio(name, dtype):
    x = gaussian(1 << 16, dtype, seed=0)
    nbytes = x.numel() * x.element_size()
    shuffled = commpress.get_codec(f"{name}:shuffle=1").encode(x).nbytes
    plain = commpress.get_codec(f"{name}:shuffle=0").encode(x).nbytes
    assert nbytes / shuffled > nbytes / plain * 1.03, (nbytes / shuffled, nbytes / plain)


def _chunk_header(section: torch.Tensor, offset: int = 1) -> dict:
    """The fields of the blosc2 chunk header at ``offset`` of a compressed section."""
    raw = section.numpy().tobytes()
    flags, typesize, nbytes, blocksize, cbytes = struct.unpack_from("<xxBBiii", raw, offset)
    return {
        "compressor": flags >> 5,
        "typesize": typesize,
        "nbytes": nbytes,
        "blocksize": blocksize,
        "cbytes": cbytes,
        "filter": raw[offset + 16],
        "split": not flags & 0x10,
    }


@pytest.mark.parametrize(
    "spec, dtype, compressor, filt, split",
    [
        ("lz4", torch.float32, 1, 2, True),  # bit shuffle, planes compressed apart
        ("lz4", torch.bfloat16, 1, 2, True),
        ("lz4", torch.uint8, 1, 2, True),  # bits of single bytes too
        ("lz4:shuffle=0", torch.float32, 1, 0, False),
        ("zstd", torch.float32, 4, 1, True),  # byte shuffle
        ("zstd", torch.int64, 4, 1, True),
        ("zstd", torch.uint8, 4, 0, False),  # a byte shuffle of bytes is a no-op
        ("zstd:shuffle=0", torch.bfloat16, 4, 0, False),
    ],
)
def test_chunk_settings(spec, dtype, compressor, filt, split):
    x = structured((1 << 16,), dtype)
    section = commpress.get_codec(spec).encode(x).payload[0]
    assert int(section[0]) == 1
    header = _chunk_header(section)
    assert header["compressor"] == compressor and header["filter"] == filt
    assert header["split"] == split and header["typesize"] == dtype.itemsize
    assert header["nbytes"] == x.numel() * dtype.itemsize
    assert header["cbytes"] == section.numel() - 1


def test_encoded_nbytes_is_data_dependent():
    for spec in ("lz4", "zstd"):
        assert commpress.get_codec(spec).encoded_nbytes(100, torch.float32) is None


# ------------------------------------------------------------------ devices
@pytest.mark.parametrize("spec", ["lz4", "zstd", "bf16+zstd"])
def test_non_cpu_tensor_is_refused_with_a_clear_message(spec):
    codec = commpress.get_codec(spec)
    x = torch.empty(16, device="meta")
    with pytest.raises(UnsupportedDeviceError, match="cpu|CPU"):
        codec.encode(x)


def test_non_cpu_payload_is_refused():
    codec = commpress.get_codec("zstd")
    with pytest.raises(UnsupportedDeviceError, match="host"):
        codec._decode((torch.empty(9, dtype=torch.uint8, device="meta"),), 2, torch.float32)


# ------------------------------------------------------------------ hostile input
def _compressed_section(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = structured((2000,), torch.float32)
    section = commpress.get_codec(spec).encode(x).payload[0]
    assert int(section[0]) == 1
    return x, section


@pytest.mark.parametrize("spec", ["lz4", "zstd", "zstd:shuffle=0"])
def test_truncated_stream_raises_wire_error_at_every_length(spec):
    x, section = _compressed_section(spec)
    codec = commpress.get_codec(spec)
    for n in range(section.numel()):
        with pytest.raises(WireError):
            codec._decode((section[:n].clone(),), x.numel(), x.dtype)


@pytest.mark.parametrize("spec", ["lz4", "zstd"])
def test_corrupted_stream_never_crashes(spec):
    x, section = _compressed_section(spec)
    codec = commpress.get_codec(spec)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        bad = section.clone()
        pos = torch.randint(1, bad.numel(), (3,), generator=g)
        bad[pos] = torch.randint(0, 256, (3,), generator=g, dtype=torch.uint8)
        try:
            y = codec._decode((bad,), x.numel(), x.dtype)
        except WireError:
            continue
        # Some corruptions still form a valid stream; only the wire CRC can catch those.
        assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("spec", ["lz4", "zstd"])
def test_hostile_sizes_are_refused_before_allocating(spec):
    x, section = _compressed_section(spec)
    codec = commpress.get_codec(spec)
    with pytest.raises(WireError, match="cannot expand"):
        codec._decode((section,), 1 << 40, torch.float64)
    with pytest.raises(WireError):
        codec._decode((section,), x.numel() + 1, x.dtype)
    with pytest.raises(WireError):
        codec._decode((section,), x.numel() - 1, x.dtype)
    raw = torch.zeros(9, dtype=torch.uint8)
    with pytest.raises(WireError, match="raw payload"):
        codec._decode((raw,), 1 << 40, torch.float32)


@pytest.mark.parametrize("spec", ["lz4", "zstd"])
def test_malformed_payload_structure(spec):
    codec = commpress.get_codec(spec)
    ok = codec.encode(torch.zeros(4)).payload[0]
    bad_mode = ok.clone()
    bad_mode[0] = 7
    cases = [
        (),
        (ok, ok),
        (torch.empty(0, dtype=torch.uint8),),
        (ok.view(-1, 1),),
        (torch.zeros(4, dtype=torch.int32),),
        (bad_mode,),
    ]
    for payload in cases:
        with pytest.raises(WireError):
            codec._decode(payload, 4, torch.float32)


def _patched(section: torch.Tensor, offset: int, fmt: str, value: int) -> torch.Tensor:
    raw = bytearray(section.numpy().tobytes())
    struct.pack_into(fmt, raw, 1 + offset, value)
    return torch.frombuffer(raw, dtype=torch.uint8)


def _hostile_headers(section: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The section with one field of its blosc2 chunk header forged (offsets in the header)."""
    flags, blosc2_flags = int(section[1 + 2]), int(section[1 + 31])
    cbytes = section.numel() - 1
    return [
        ("no extended header", _patched(section, 2, "B", flags & ~0x04)),
        ("delta flag", _patched(section, 2, "B", flags | 0x08)),
        ("user-defined compressor", _patched(section, 2, "B", (flags & 0x1F) | 6 << 5)),
        ("other compressor", _patched(section, 2, "B", (flags & 0x1F) | 3 << 5)),
        ("typesize", _patched(section, 3, "B", 8)),
        ("typesize 0", _patched(section, 3, "B", 0)),
        ("nbytes larger", _patched(section, 4, "<i", 1 << 30)),
        ("nbytes negative", _patched(section, 4, "<i", -1)),
        ("blocksize huge", _patched(section, 8, "<i", 1 << 30)),
        ("blocksize 0", _patched(section, 8, "<i", 0)),
        ("cbytes past the end", _patched(section, 12, "<i", cbytes + 1)),
        ("cbytes short", _patched(section, 12, "<i", cbytes - 1)),
        ("cbytes tiny", _patched(section, 12, "<i", 16)),
        ("filter", _patched(section, 16, "B", 3)),
        ("second filter", _patched(section, 17, "B", 1)),
        ("filter meta", _patched(section, 24, "B", 1)),
        ("dictionary", _patched(section, 31, "B", blosc2_flags | 0x01)),
        ("lazy chunk", _patched(section, 31, "B", blosc2_flags | 0x08)),
        ("instrumented", _patched(section, 31, "B", blosc2_flags | 0x80)),
        ("special nan", _patched(section, 31, "B", blosc2_flags | 2 << 4)),
        ("special run", _patched(section, 31, "B", blosc2_flags | 3 << 4)),
        ("special uninit", _patched(section, 31, "B", blosc2_flags | 4 << 4)),
        ("special zeros with blocks", _patched(section, 31, "B", blosc2_flags | 1 << 4)),
        ("trailing byte", torch.cat([section, torch.zeros(1, dtype=torch.uint8)])),
    ]


_HOSTILE_NAMES = [name for name, _ in _hostile_headers(torch.zeros(40, dtype=torch.uint8))]


@pytest.mark.parametrize("spec", ["lz4", "zstd", "zstd:shuffle=0"])
@pytest.mark.parametrize("name", _HOSTILE_NAMES)
def test_forged_chunk_headers_raise_wire_error(spec, name):
    x, section = _compressed_section(spec)
    codec = commpress.get_codec(spec)
    assert torch.equal(codec._decode((section,), x.numel(), x.dtype), x)
    bad = dict(_hostile_headers(section))[name]
    with pytest.raises(WireError, match="blosc2"):
        codec._decode((bad,), x.numel(), x.dtype)


@pytest.mark.parametrize("spec", ["lz4", "zstd"])
def test_tensor_larger_than_a_piece_spans_several_chunks(spec):
    codec = commpress.get_codec(spec)
    n = PIECE_BYTES // 4 + 1000
    x = structured((n,), torch.float32)
    x[: 1 << 20] = random_bits((1 << 20,), torch.float32)  # incompressible start
    section = codec.encode(x).payload[0]
    assert int(section[0]) == 1
    first = _chunk_header(section)
    second = _chunk_header(section, 1 + first["cbytes"])
    assert (first["nbytes"], second["nbytes"]) == (PIECE_BYTES, 4000)
    assert 1 + first["cbytes"] + second["cbytes"] == section.numel()
    assert torch.equal(codec.decode(codec.encode(x)).view(torch.int32), x.view(torch.int32))
    # The second chunk missing, or the first chunk's content forged to cover everything.
    with pytest.raises(WireError, match="truncated"):
        codec._decode((section[: 1 + first["cbytes"]].clone(),), n, x.dtype)
    with pytest.raises(WireError, match="bytes of content"):
        codec._decode((_patched(section, 4, "<i", n * 4),), n, x.dtype)


def test_all_zero_pieces_are_bare_headers_and_decode():
    codec = commpress.get_codec("lz4")
    x = torch.zeros(PIECE_BYTES // 4 * 2, dtype=torch.float32)
    packet = codec.encode(x)
    assert packet.payload[0].numel() == 1 + 2 * 32
    assert torch.equal(codec.decode(packet), x)


@pytest.mark.parametrize("spec", ["lz4", "zstd"])
def test_nan_payloads_and_signed_zeros_survive(spec):
    bits = torch.tensor(
        [0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000, 0x00000001], dtype=torch.int64
    ).to(torch.int32)
    x = bits.repeat(4000).view(torch.float32)
    packet = commpress.get_codec(spec).encode(x)
    assert int(packet.payload[0][0]) == 1
    y = commpress.get_codec(spec).decode(packet)
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, commpress

    def status(key):
        line = next(v for v in open("/proc/self/status") if v.startswith(key))
        return int(line.split()[1]) * 1024

    spec, path = sys.argv[1], sys.argv[2]
    codec = commpress.get_codec(spec)
    buffer = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8)
    packet = commpress.wire.unpack(buffer, codec)
    codec.decode(codec.encode(torch.ones(8)))  # first use: the library, its buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    base = status("VmRSS:")
    y = codec.decode(packet)
    print(y.numel() * y.element_size(), status("VmHWM:") - base)
""")


@pytest.mark.parametrize("spec", ["lz4", "zstd"])
def test_decode_peak_memory_is_about_the_output(spec, tmp_path):
    # In a fresh process, so that the peak resident size is the decoder's alone.
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident size")
    nbytes = 96 << 20
    rows = gaussian((nbytes // 4096, 1024), torch.float32, seed=0)
    rows[torch.arange(rows.shape[0]) % 8 != 0] = 0  # sparse: the buffer is small
    path = tmp_path / "packet.bin"
    path.write_bytes(pack(commpress.get_codec(spec).encode(rows)).numpy().tobytes())
    del rows
    assert path.stat().st_size < nbytes // 4
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, spec, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out_bytes, grew = (int(v) for v in run.stdout.split())
    assert out_bytes == nbytes
    assert grew <= 1.5 * nbytes, f"decoding {nbytes} bytes raised the peak by {grew}"


# Wire buffers of the format before blosc2 (mode 1 held one LZ4 block / zstd frame).
_PRE_BLOSC2 = [
    (
        "lz4",
        structured((64,), torch.int32),
        "434d505201000401010003003000000005356e80e4afcaf540000000000000006c7a340137000000"
        "000000000000000001dffafbfcfdfeff000102030405060d002011ff010012000100010c0012ff0c"
        "000f0d00140f2600130f4d00070f40002850000000000000",
    ),
    (
        "zstd",
        structured((3, 21), torch.int64),
        "434d5052010005020100040038000000c8915d80ee3191f0030000000000000015000000000000007a"
        "737464013f000000000000000000000128b52ffd60f800a5010078fafbfcfdfeff00010203040506ff"
        "001000e0804104e0804104e0804104e0804104e0804104e080ab8a601001cce12e7688e61700",
    ),
]


@pytest.mark.parametrize("spec, x, hexed", _PRE_BLOSC2, ids=["lz4", "zstd"])
def test_packets_of_the_format_before_blosc2_are_refused(spec, x, hexed):
    codec = commpress.get_codec(spec)
    packet = unpack(torch.frombuffer(bytearray.fromhex(hexed), dtype=torch.uint8), codec)
    assert packet.meta.shape == x.shape and int(packet.payload[0][0]) == 1
    with pytest.raises(WireError, match="blosc2 chunk"):
        codec.decode(packet)


def test_compression_releases_the_gil():
    commpress.get_codec("lz4").encode(torch.ones(64))
    assert blosc2.set_releasegil(True) is True
