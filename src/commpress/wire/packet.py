"""The packet format: a `Packet` as one contiguous ``uint8`` tensor.

Layout (little-endian), version 1::

    offset  size  field
    0       4     magic  b"CMPR"
    4       1     format version (1)
    5       1     flags (bit 0: a CRC32 of the payload follows the section table)
    6       1     dtype code of the original tensor (see ``codec.DTYPE_CODES``)
    7       1     ndim (<= 32)
    8       2     number of payload sections (<= 1024)
    10      2     length of the codec spec string in bytes (<= 4096)
    12      4     total header length in bytes (multiple of 8)
    16      8     codec config hash (``Codec.config_hash``)
    24      8*nd  shape, int64 each
    ..      spec  the codec's canonical spec string, UTF-8
    ..      9*ns  per section: dtype code (1 byte) + payload bytes (8 bytes)
    ..      4     CRC32 of the section bytes (only if flag bit 0)
    ..      pad   zeros up to a multiple of 8
    header  ...   the sections, each padded with zeros to a multiple of 8

Sections start on 8-byte boundaries so the receiver can view them in their
dtype without copying. ``unpack`` checks every field -- magic, version,
limits, dtype codes, that the section sizes add up to exactly the buffer's
length, that each section is a whole number of elements, that the shape's
element count is sane (zero-sized dimensions counted as 1, because torch's
strides multiply the others) -- before it creates any tensor. The sections it
returns are views into the buffer (no allocation), except where an element is wider
than the alignment allows (complex128, or a buffer that starts at an odd offset):
those sections are copied. There is no pickle here.

The config hash comes from the packet itself (`PacketMeta.config_hash`, set by
the codec that made it), so packing never rebuilds a codec. Only a packet built
by hand without a hash, and `unpack` without an expected codec, look the codec
up by its spec in the registry (which never imports ``wire``: no cycle).

Decode bound
------------
What a buffer may make its decoder allocate is bounded before anything is
decoded. The output is the header's shape in the header's dtype, ``numel x
itemsize`` bytes; `unpack` raises `WireError` when that exceeds

- ``max_decode_bytes`` (default `default_max_decode_bytes`: the size in
  ``COMMPRESS_MAX_DECODE_BYTES``, e.g. ``64GiB``, else `MAX_DECODE_BYTES`,
  16 GiB), for every buffer; and
- when the codec comes from the header (``codec=None``, so its config, a
  ``topk`` ratio of ``1e-9`` say, is as untrusted as the shape), also
  ``MAX_EXPANSION x len(buffer) + EXPANSION_SLACK`` (1024x plus 1 MiB). To
  decode a buffer that legitimately expands more (``zstd`` of zeros, sparse
  codecs below ``ratio=0.001``), pass the codec you expect.

Given the output size, every codec's decoder is held to it: fixed-size codecs
check that their sections are exactly ``encoded_nbytes`` of the header's
shape (a ``topk`` or ``randomk`` buffer must carry the ``k`` values its ratio
gives), ``powersgd`` that its factors make a matrix of the declared size,
``lz4``/``zstd`` check every chunk header against the declared size and
decompress into the output itself, and chains check their index. The
temporaries of a decode are of the order of its output (at most its
``int64`` indices for the sparse codecs).
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from ..codec import CODE_DTYPES, DTYPE_CODES, Codec, Packet, PacketMeta
from ..errors import CodecMismatchError, ConfigError, WireError
from ..registry import get_codec
from ..units import parse_size

__all__ = [
    "pack",
    "encode_pack",
    "unpack",
    "read_spec",
    "packed_nbytes",
    "layout_nbytes",
    "MAGIC",
    "VERSION",
    "HEADER_FIXED",
    "MAX_SPEC",
    "MAX_NUMEL",
    "MAX_DECODE_BYTES",
    "MAX_EXPANSION",
    "EXPANSION_SLACK",
    "default_max_decode_bytes",
]

MAGIC = b"CMPR"
VERSION = 1
_FIXED = struct.Struct("<4sBBBBHHIQ")
HEADER_FIXED = _FIXED.size  # 24
_SECTION = struct.Struct("<BQ")
MAX_NDIM = 32
MAX_SECTIONS = 1024
MAX_SPEC = 4096
MAX_NUMEL = 1 << 48
FLAG_CRC = 1
#: Default cap on the bytes one buffer may decode to (see "Decode bound").
MAX_DECODE_BYTES = 1 << 34
#: Environment variable that replaces `MAX_DECODE_BYTES` (a size: ``64GiB``, ``1T``).
ENV_MAX_DECODE_BYTES = "COMMPRESS_MAX_DECODE_BYTES"
#: With the codec read from the header, a buffer decodes to at most this many times its
#: length plus `EXPANSION_SLACK` (sign codes of float64 expand 64x, topk at ratio 0.001
#: about 670x; smaller ratios and runs of zeros need the expected codec passed).
MAX_EXPANSION = 1024
EXPANSION_SLACK = 1 << 20


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _crc(sections: list[torch.Tensor]) -> int:
    crc = 0
    for s in sections:
        if s.numel():
            crc = zlib.crc32(s.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
    return crc


def _config_hash(meta: PacketMeta) -> int:
    # A codec's packets carry its hash; only a packet built by hand falls back to the registry.
    if meta.config_hash is not None:
        return meta.config_hash
    return get_codec(meta.spec).config_hash


def _header(meta: PacketMeta, sections: list[tuple[torch.dtype, int]], crc: int | None) -> bytes:
    """The header for ``sections`` (``(dtype, bytes)`` each), padded to a multiple of 8."""
    spec = meta.spec.encode()
    if meta.dtype not in DTYPE_CODES:
        raise WireError(f"dtype {meta.dtype} has no wire code; supported: {list(DTYPE_CODES)}")
    for dtype, _ in sections:
        if dtype not in DTYPE_CODES:
            raise WireError(f"payload section dtype {dtype} has no wire code")
    if len(meta.shape) > MAX_NDIM or len(sections) > MAX_SECTIONS or len(spec) > MAX_SPEC:
        raise WireError(
            f"packet too complex for the wire: ndim={len(meta.shape)} (max {MAX_NDIM}), "
            f"sections={len(sections)} (max {MAX_SECTIONS}), "
            f"spec bytes={len(spec)} (max {MAX_SPEC})"
        )
    body = [struct.pack(f"<{len(meta.shape)}q", *meta.shape), spec]
    body += [_SECTION.pack(DTYPE_CODES[d], n) for d, n in sections]
    if crc is not None:
        body.append(struct.pack("<I", crc))
    raw_len = HEADER_FIXED + sum(len(b) for b in body)
    header_len = _pad8(raw_len)
    fixed = _FIXED.pack(
        MAGIC,
        VERSION,
        FLAG_CRC if crc is not None else 0,
        DTYPE_CODES[meta.dtype],
        len(meta.shape),
        len(sections),
        len(spec),
        header_len,
        _config_hash(meta),
    )
    return fixed + b"".join(body) + bytes(header_len - raw_len)


def _header_len(meta: PacketMeta, nsections: int, checksum: bool) -> int:
    raw = HEADER_FIXED + 8 * len(meta.shape) + len(meta.spec.encode()) + _SECTION.size * nsections
    return _pad8(raw + (4 if checksum else 0))


def _write_header(out: torch.Tensor, header: bytes) -> None:
    out[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))


def _zero_padding(out: torch.Tensor, pos: int, nbytes: int) -> None:
    # Section padding is zero so that equal packets give equal bytes (golden tests, CRC).
    pad = _pad8(nbytes) - nbytes
    if pad:
        out[pos + nbytes : pos + nbytes + pad].zero_()


def pack(packet: Packet, checksum: bool = False) -> torch.Tensor:
    """Serialize ``packet`` into one 1-D ``uint8`` tensor on the payload's device.

    Args:
        packet: an encoded tensor.
        checksum: append a CRC32 of the payload to the header (costs a host copy
            of the payload on GPU); ``unpack`` then verifies it.

    Returns:
        `uint8` tensor: header followed by the 8-byte aligned sections.
    """
    meta = packet.meta
    sections = [t.detach().contiguous().view(-1) for t in packet.payload]
    for t in sections:
        if t.dtype not in DTYPE_CODES:
            raise WireError(f"payload section dtype {t.dtype} has no wire code")
    sizes = [t.numel() * t.element_size() for t in sections]
    header = _header(
        meta,
        [(t.dtype, n) for t, n in zip(sections, sizes, strict=True)],
        _crc(sections) if checksum else None,
    )
    total = len(header) + sum(_pad8(n) for n in sizes)
    device = sections[0].device if sections else torch.device("cpu")
    out = torch.empty(total, dtype=torch.uint8, device=device)
    _write_header(out, header)
    pos = len(header)
    for t, n in zip(sections, sizes, strict=True):
        if n:
            out[pos : pos + n].copy_(t.view(torch.uint8))
        _zero_padding(out, pos, n)
        pos += _pad8(n)
    return out


def encode_pack(
    codec: Codec,
    tensor: torch.Tensor,
    checksum: bool = False,
    out: torch.Tensor | None = None,
    roundtrip: bool = False,
) -> torch.Tensor:
    """``pack(codec.encode(tensor))`` in one step.

    A codec that declares its layout (`Codec.sections`) encodes straight into the
    wire buffer's sections: no payload tensors, no copy. Others encode, then pack.

    Args:
        codec: the codec.
        tensor: what to encode.
        checksum: as in `pack`.
        out: optional 1-D ``uint8`` destination of exactly the packed size (8-byte
            aligned, e.g. a slice of a larger send buffer at a multiple of 8).
        roundtrip: also overwrite ``tensor`` (contiguous) with ``decode`` of the result,
            fused into the encode where the codec has a kernel (`Codec.encode_into`).

    Returns:
        The wire buffer (``out`` when given).
    """
    plan = _plan(codec, tensor.shape, tensor.dtype, checksum)
    if plan is None:
        packet = codec.encode(tensor)
        buf = pack(packet, checksum=checksum)
        if roundtrip:
            codec.decode(packet, out=tensor)
        if out is None:
            return buf
        _check_dest(out, buf.numel())
        out.copy_(buf)
        return out
    codec.check_tensor(tensor)
    if out is None:
        out = torch.empty(plan.total, dtype=torch.uint8, device=tensor.device)
    _check_dest(out, plan.total)
    views = []
    pos = plan.header_len
    for dtype, nbytes in plan.sizes:
        views.append(out[pos : pos + nbytes].view(dtype))
        _zero_padding(out, pos, nbytes)
        pos += _pad8(nbytes)
    codec.encode_into(tensor, tuple(views), roundtrip=roundtrip)
    if plan.header is not None:
        out[: plan.header_len].copy_(plan.header)
    else:
        _write_header(out, _header(plan.meta, list(plan.sizes), _crc(views)))
    return out


@dataclass(frozen=True)
class _Plan:
    """Where `encode_pack` puts a fixed-layout packet, computed once per call shape.

    ``sizes``: ``(dtype, bytes)`` per section; ``header``: the header bytes as a CPU
    ``uint8`` tensor (None with a checksum, which depends on the payload).
    """

    meta: PacketMeta
    sizes: tuple[tuple[torch.dtype, int], ...]
    header_len: int
    total: int
    header: torch.Tensor | None


@functools.lru_cache(maxsize=1024)
def _plan(codec: Codec, shape: torch.Size, dtype: torch.dtype, checksum: bool) -> _Plan | None:
    """The layout of ``codec``'s packet of a tensor (None: the codec declares none)."""
    numel = 1
    for d in shape:
        numel *= d
    layout = codec.sections(numel, dtype)
    if layout is None:
        return None
    meta = PacketMeta(torch.Size(shape), dtype, codec.spec, codec.config_hash)
    sizes = tuple((d, n * d.itemsize) for d, n in layout)
    header_len = _header_len(meta, len(layout), checksum)
    total = header_len + sum(_pad8(n) for _, n in sizes)
    header = None
    if not checksum:
        header = torch.frombuffer(bytearray(_header(meta, list(sizes), None)), dtype=torch.uint8)
    return _Plan(meta, sizes, header_len, total, header)


def _check_dest(out: torch.Tensor, total: int) -> None:
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != total:
        raise ValueError(
            f"encode_pack: out must be a 1-D uint8 tensor of {total} bytes, got "
            f"{out.dtype} of shape {tuple(out.shape)}"
        )
    if out.storage_offset() % 8 or not out.is_contiguous():
        raise ValueError("encode_pack: out must be contiguous and start on an 8-byte boundary")


def _header_bytes(buffer: torch.Tensor) -> tuple[bytes, Any]:
    """The fixed header's bytes and, for a CPU buffer, a numpy view of it (else None)."""
    if not isinstance(buffer, torch.Tensor):
        raise WireError(f"wire buffer must be a torch.Tensor, got {type(buffer).__name__}")
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise WireError(
            f"wire buffer must be a 1-D uint8 tensor, got dtype {buffer.dtype} with "
            f"{buffer.dim()} dims"
        )
    if buffer.numel() < HEADER_FIXED:
        raise WireError(
            f"wire buffer is truncated: {buffer.numel()} bytes, a header needs at least "
            f"{HEADER_FIXED}"
        )
    if buffer.device.type == "cpu":
        view = buffer.numpy()  # no copy: the header is read from it in place
        return view[:HEADER_FIXED].tobytes(), view
    return bytes(buffer[:HEADER_FIXED].cpu().numpy()), None


def read_spec(buffer: torch.Tensor) -> str:
    """The codec spec a wire buffer was made with (validating only what that needs)."""
    return _parse_header(buffer)[0].spec


def _parse_header(
    buffer: torch.Tensor,
) -> tuple[PacketMeta, int, tuple[tuple[torch.dtype, int], ...], int | None]:
    fixed, view = _header_bytes(buffer)
    magic, version, flags, dcode, ndim, nsec, spec_len, header_len, _ = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise WireError(f"not a commpress wire buffer: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireError(
            f"wire format version {version} is not supported by this commpress (reads version "
            f"{VERSION}); use the same commpress version on every rank"
        )
    if flags & ~FLAG_CRC:
        raise WireError(f"wire header has unknown flag bits {flags:#x}")
    if dcode not in CODE_DTYPES:
        raise WireError(f"wire header names unknown dtype code {dcode}")
    if ndim > MAX_NDIM or nsec > MAX_SECTIONS or spec_len > MAX_SPEC:
        raise WireError(
            f"wire header out of limits: ndim={ndim} (max {MAX_NDIM}), sections={nsec} "
            f"(max {MAX_SECTIONS}), spec bytes={spec_len} (max {MAX_SPEC})"
        )
    crc_len = 4 if flags & FLAG_CRC else 0
    raw_len = HEADER_FIXED + 8 * ndim + spec_len + _SECTION.size * nsec + crc_len
    if header_len != _pad8(raw_len):
        raise WireError(
            f"wire header length field {header_len} is inconsistent (expected {_pad8(raw_len)})"
        )
    if buffer.numel() < header_len:
        raise WireError(
            f"wire buffer is truncated: {buffer.numel()} bytes, its header alone needs {header_len}"
        )
    if view is not None:
        rest = view[HEADER_FIXED:raw_len].tobytes()
    else:
        rest = bytes(buffer[HEADER_FIXED:raw_len].cpu().numpy())
    return _parse_rest(fixed, rest, buffer.numel())


# A pure function of the header's bytes and the buffer's length, so a call that repeats
# (same shape and codec) parses its header once; 256 entries of at most ~14 KB of keys.
@functools.lru_cache(maxsize=256)
def _parse_rest(
    fixed: bytes, rest: bytes, numel: int
) -> tuple[PacketMeta, int, tuple[tuple[torch.dtype, int], ...], int | None]:
    """The header after its fixed part (``rest``: the fixed part already validated),
    checked against the buffer's length ``numel``."""
    _, _, flags, dcode, ndim, nsec, spec_len, header_len, config_hash = _FIXED.unpack(fixed)
    crc_len = 4 if flags & FLAG_CRC else 0
    shape = struct.unpack_from(f"<{ndim}q", rest, 0)
    pos = 8 * ndim
    span = 1
    for s in shape:
        if s < 0:
            raise WireError(f"wire header has a negative dimension in shape {shape}")
        # Zero-sized dims count as 1: torch's strides multiply the others (and overflow).
        span *= max(s, 1)
        if span > MAX_NUMEL:
            raise WireError(f"wire header shape {shape} is absurdly large")
    try:
        spec = rest[pos : pos + spec_len].decode()
    except UnicodeDecodeError:
        raise WireError("wire header codec spec is not valid UTF-8") from None
    pos += spec_len
    sections = []
    total = header_len
    for _ in range(nsec):
        code, nbytes = _SECTION.unpack_from(rest, pos)
        pos += _SECTION.size
        if code not in CODE_DTYPES:
            raise WireError(f"wire section has unknown dtype code {code}")
        dtype = CODE_DTYPES[code]
        itemsize = dtype.itemsize
        if nbytes % itemsize:
            raise WireError(
                f"wire section of {nbytes} bytes is not a whole number of {dtype} elements"
            )
        sections.append((dtype, nbytes))
        total += _pad8(nbytes)
        if total > numel:
            break
    if total != numel:
        raise WireError(
            f"wire buffer has {numel} bytes but its header describes {total}; "
            "the buffer is truncated or corrupted"
        )
    crc = struct.unpack_from("<I", rest, pos)[0] if crc_len else None
    meta = PacketMeta(torch.Size(shape), CODE_DTYPES[dcode], spec, config_hash)
    return meta, header_len, tuple(sections), crc


def default_max_decode_bytes() -> int:
    """The cap `unpack` applies when given none: ``COMMPRESS_MAX_DECODE_BYTES`` when set,
    else `MAX_DECODE_BYTES`.

    Raises:
        ConfigError: the variable is set to something that is not a size.
    """
    raw = os.environ.get(ENV_MAX_DECODE_BYTES, "").strip()
    if not raw:
        return MAX_DECODE_BYTES
    try:
        return parse_size(raw, minimum=1)
    except ValueError as exc:
        raise ConfigError(f"{ENV_MAX_DECODE_BYTES}={raw!r}: {exc}") from None


def _check_decode_size(meta: PacketMeta, nbytes: int, limit: int, from_header: bool) -> None:
    out_bytes = meta.numel * meta.dtype.itemsize
    why = "max_decode_bytes"
    if from_header and MAX_EXPANSION * nbytes + EXPANSION_SLACK < limit:
        limit = MAX_EXPANSION * nbytes + EXPANSION_SLACK
        why = f"{MAX_EXPANSION}x the buffer plus {EXPANSION_SLACK}, as the codec came from it"
    if out_bytes > limit:
        raise WireError(
            f"wire buffer of {nbytes} bytes declares a {meta.dtype} tensor of shape "
            f"{tuple(meta.shape)} ({out_bytes} bytes), over the decode limit of {limit} "
            f"bytes ({why}); the buffer is corrupted or hostile. To decode it anyway, pass "
            f"the expected codec and max_decode_bytes to unpack (or set {ENV_MAX_DECODE_BYTES})"
        )


def unpack(
    buffer: torch.Tensor, codec: Codec | None = None, *, max_decode_bytes: int | None = None
) -> Packet:
    """Parse a wire buffer back into a `Packet` whose sections view ``buffer``.

    Args:
        buffer: 1-D ``uint8`` tensor made by `pack`.
        codec: the codec the receiver expects. When given, a buffer made by any other
            codec config raises `CodecMismatchError`. When None, the codec named in the
            header is used as is, and the buffer may decode to at most `MAX_EXPANSION`
            times its length (see "Decode bound" in the module docstring).
        max_decode_bytes: the most bytes the decoded tensor may have; None:
            `default_max_decode_bytes`.

    Raises:
        WireError: truncated, corrupted, hostile or foreign buffer, or one that would
            decode past the bound.
        CodecMismatchError: the buffer was made by another codec config than ``codec``.
        ConfigError: ``max_decode_bytes`` is not an int.
    """
    if max_decode_bytes is None:
        limit = default_max_decode_bytes()
    elif isinstance(max_decode_bytes, int) and not isinstance(max_decode_bytes, bool):
        limit = max_decode_bytes
    else:
        raise ConfigError(f"max_decode_bytes must be an int, got {max_decode_bytes!r}")
    from_header = codec is None
    meta, header_len, sections, crc = _parse_header(buffer)
    if codec is not None:
        if meta.spec != codec.spec or meta.config_hash != codec.config_hash:
            detail = (
                ""
                if meta.spec != codec.spec
                else " (same spec, different config hash: mixed commpress versions?)"
            )
            raise CodecMismatchError(
                f"codec mismatch: the buffer was encoded with {meta.spec!r} but the receiver "
                f"expects {codec.spec!r}{detail}; every rank must use the same codec spec"
            )
    else:
        try:
            codec = get_codec(meta.spec)
        except ConfigError as exc:
            raise WireError(f"wire header names a codec this process cannot build: {exc}") from None
        if meta.config_hash != codec.config_hash:
            raise WireError(f"wire header config hash does not match its spec {meta.spec!r}")
    _check_decode_size(meta, buffer.numel(), limit, from_header)
    views = []
    pos = header_len
    for dtype, nbytes in sections:
        chunk = buffer[pos : pos + nbytes]
        if (buffer.storage_offset() + pos) % dtype.itemsize:
            # Sections are 8-byte aligned; wider elements (complex128) or a buffer that is
            # itself an odd slice need a copy, because torch views only aligned bytes.
            chunk = chunk.clone()
        views.append(chunk.view(dtype))
        pos += _pad8(nbytes)
    if crc is not None and _crc(views) != crc:
        raise WireError("wire buffer checksum mismatch: the payload was corrupted in transit")
    return Packet(tuple(views), meta)


def layout_nbytes(
    spec: str, shape: tuple[int, ...], layout: list[tuple[torch.dtype, int]], checksum: bool
) -> int:
    """Length of the packed buffer of a codec layout (`Codec.sections`), without encoding."""
    meta = PacketMeta(torch.Size(shape), torch.float32, spec)
    sizes = sum(_pad8(n * d.itemsize) for d, n in layout)
    return _header_len(meta, len(layout), checksum) + sizes


def packed_nbytes(packet: Packet, checksum: bool = False) -> int:
    """Length of ``pack(packet)`` without building it."""
    ns = len(packet.payload)
    raw = HEADER_FIXED + 8 * len(packet.shape) + len(packet.meta.spec.encode()) + _SECTION.size * ns
    raw += 4 if checksum else 0
    return _pad8(raw) + sum(_pad8(t.numel() * t.element_size()) for t in packet.payload)
