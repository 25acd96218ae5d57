"""The codec contract.

A codec is a small, pure tensor transform with a written contract. It never
talks to the network; collectives (``commpress.algorithms``) move its
packets.

Contract
--------
A codec is a frozen dataclass subclass of `Codec`. Its fields are its
parameters; they are validated in ``__post_init__`` (raise
`commpress.errors.ConfigError`, a ``ValueError``, naming the bad value and the
allowed range). From the fields follow, without extra code:

- ``config()`` -> ``{"id": codec_id, **fields}`` and ``Codec.from_config``;
- ``spec`` -> the canonical spec string (``"int8"``, ``"int8:block=128"``;
  parameters at their default are left out), which is also ``repr``;
- equality and hashing (two codecs are equal when their configs are).

Class-level capabilities, declared, never guessed:

- ``codec_id`` -- the registry name;
- ``lossless`` -- ``decode(encode(x))`` is bit-identical to ``x``;
- ``summable`` -- payloads of several ranks can be summed by the backend
  directly (the fp16/bf16 casts), so all-reduce needs no decode/re-encode hop.
- ``fixed_size`` -- ``encoded_nbytes(numel, dtype)`` is exact and known in
  advance for every supported dtype (then collectives need no size exchange);
- ``prescale`` -- for summable codecs: the all-reduce divides by the world
  size before encoding (fp16 would overflow otherwise) instead of after the sum;
- ``wants_error_feedback`` -- the codec is biased (sign, top-k, random-k,
  PowerSGD): the policy turns error feedback on unless told otherwise;
- ``algorithm`` -- name of the reduction algorithm the codec requires
  (``"powersgd"``), or None to let the policy choose from the capabilities;
- ``composite`` -- made of other codecs (``chain``, spelled ``a+b``).

Registration: ``commpress.registry.register_codec`` puts a class in
`CODEC_CLASSES`, the table `Codec.from_config` dispatches through; this module
never imports the registry.

Per-instance capabilities:

- ``supports(dtype)`` -- lossy codecs take floating dtypes only;
- ``encoded_nbytes(numel, dtype)`` -- the exact payload size in bytes when it
  is known in advance (then no size exchange is needed), else ``None``;
- ``error_bound(x)`` -- elementwise bound on ``|decode(encode(x)) - x|`` for
  finite inputs (zeros for lossless codecs). Tests hold every codec to it.

Subclasses implement two methods on flat tensors:

- ``_encode(x) -> tuple[Tensor, ...]``: ``x`` is 1-D, contiguous, of a
  supported dtype (possibly empty). Return 1-D payload sections.
- ``_decode(payload, numel, dtype) -> Tensor``: the inverse; return a 1-D
  tensor of ``numel`` elements of ``dtype`` on the payload's device.

The public ``encode``/``decode`` do validation, flattening and reshaping once
for every codec. Payload sections are always 1-D so that ``commpress.wire``
can ship them without shape information of their own.

NaN and Inf: no codec turns a NaN into a finite number. Each lossy codec's
docstring states what it does with non-finite values.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import (
    CodecMismatchError,
    ConfigError,
    UnknownCodecError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
    WireError,
)

__all__ = [
    "Codec",
    "CODEC_CLASSES",
    "codec_class",
    "Packet",
    "PacketMeta",
    "FLOAT_DTYPES",
    "is_float",
    "DTYPE_CODES",
    "CODE_DTYPES",
    "saturating_cast",
    "fresh_output",
]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
)

#: Stable one-byte codes for dtypes, used by the wire header and by chains.
#: Append only: a code, once given, never changes meaning.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.uint8: 1,
    torch.int8: 2,
    torch.int16: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.float16: 6,
    torch.bfloat16: 7,
    torch.float32: 8,
    torch.float64: 9,
    torch.bool: 10,
    torch.complex64: 11,
    torch.complex128: 12,
    torch.float8_e4m3fn: 13,
    torch.float8_e5m2: 14,
    torch.uint16: 15,
    torch.uint32: 16,
    torch.uint64: 17,
    torch.complex32: 18,
}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}


def is_float(dtype: torch.dtype) -> bool:
    """True for the real floating dtypes lossy codecs accept."""
    return dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class PacketMeta:
    """What a receiver needs besides the payload: stays local or rides in the wire header.

    Attributes:
        shape: shape of the original tensor.
        dtype: dtype of the original tensor.
        spec: canonical spec string of the codec that made the packet.
        config_hash: `Codec.config_hash` of that codec, so packing need not rebuild the
            codec from ``spec``; None in a packet built by hand (``wire.pack`` then looks
            the codec up by its spec).
    """

    shape: torch.Size
    dtype: torch.dtype
    spec: str
    config_hash: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Packet:
    """An encoded tensor.

    Attributes:
        payload: the 1-D tensors that go on the wire, in a fixed order.
        meta: shape, dtype and codec spec of the original tensor.
    """

    payload: tuple[torch.Tensor, ...]
    meta: PacketMeta

    @property
    def shape(self) -> torch.Size:
        return self.meta.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.meta.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of payload (what crosses the wire, without the wire header)."""
        return sum(t.numel() * t.element_size() for t in self.payload)


@dataclass(frozen=True)
class Codec(abc.ABC):
    """Base class of every codec; see the module docstring for the contract."""

    codec_id: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    summable: ClassVar[bool] = False
    #: ``encoded_nbytes`` is exact and never None for a supported dtype.
    fixed_size: ClassVar[bool] = False
    #: Summable codecs: divide by the world size before encoding, not after the sum.
    prescale: ClassVar[bool] = True
    #: Biased codecs (sign, topk, randomk, powersgd): the policy turns error feedback on.
    wants_error_feedback: ClassVar[bool] = False
    #: Reduction algorithm this codec requires (e.g. "powersgd"); None: chosen by capabilities.
    algorithm: ClassVar[str | None] = None
    #: Made of other codecs (``chain``): spec strings spell it with "+", not by name, and
    #: ``list_codecs`` leaves it out.
    composite: ClassVar[bool] = False
    #: Devices the codec can run on ("cpu", "cuda", ...); None means any.
    devices: ClassVar[tuple[str, ...] | None] = None
    #: Relative L2 error of one round trip with the default parameters on Gaussian
    #: float32 data (``commpress codecs``); what ``codec="auto"`` weighs against its
    #: error budget. None: not a candidate of ``auto`` (lossless codecs: ratio unknown).
    typical_rel_err: ClassVar[float | None] = None

    # ----------------------------------------------------------------- config
    def config(self) -> dict[str, Any]:
        """The codec as a JSON-able dict with its ``"id"``."""
        return {"id": self.codec_id, **dataclasses.asdict(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        """Build a codec from ``config()`` output (or any dict with an ``"id"``).

        On `Codec` itself the class is the registered one named by ``"id"``
        (``commpress.get_codec`` takes the same dicts and loads entry points first).

        Raises:
            UnknownCodecError: ``"id"`` names no registered codec.
            ConfigError: the dict has no string ``"id"``, another class's id, unknown
                parameters or values out of range.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"codec config must be a dict, got {type(config).__name__}")
        params = dict(config)
        name = params.pop("id", None)
        if not isinstance(name, str):
            raise ConfigError(f"codec config {config!r} has no string 'id'")
        target = codec_class(name) if cls is Codec else cls
        if name != target.codec_id:
            raise ConfigError(f"config {config!r} is not a {target.codec_id!r} config")
        return target.from_params(params)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Codec:
        """Build this class from parameter values (``config()`` without ``"id"``).

        String values are converted to the field's type (``int``, ``float``, ``bool``
        from exactly ``1``, ``0``, ``true`` or ``false``), as spec strings need.

        Raises:
            ConfigError: an unknown parameter, a value of the wrong kind or out of range.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - fields)
        if unknown:
            allowed = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"{cls.codec_id}: unknown parameter(s) {unknown}; allowed: {allowed}")
        return cls(**{k: _convert(cls.codec_id, k, v, hints.get(k)) for k, v in params.items()})

    @functools.cached_property
    def spec(self) -> str:
        """Canonical spec string; parameters at their default are left out."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            parts.append(f"{f.name}={_format_value(value)}")
        return self.codec_id + (":" + ",".join(parts) if parts else "")

    @functools.cached_property
    def config_hash(self) -> int:
        """64-bit hash of the full config; the wire header carries it."""
        blob = json.dumps(self.config(), sort_keys=True, default=str).encode()
        return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")

    def __repr__(self) -> str:
        return f"Codec({self.spec!r})"

    def __str__(self) -> str:
        return self.spec

    # ----------------------------------------------------------- capabilities
    def supports(self, dtype: torch.dtype) -> bool:
        """Whether ``encode`` accepts tensors of ``dtype``.

        Default: every dtype for lossless codecs, floating dtypes for lossy ones.
        """
        return True if self.lossless else is_float(dtype)

    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int | None:
        """Exact payload bytes for a tensor of ``numel`` elements, or None if data-dependent."""
        return None

    def sections(self, numel: int, dtype: torch.dtype) -> list[tuple[torch.dtype, int]] | None:
        """The payload's layout, ``[(section dtype, elements)]``, when it is known in advance
        (then ``wire.encode_pack`` encodes straight into the wire buffer), else None."""
        return None

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise bound on ``|decode(encode(x)) - x|`` for finite ``x``.

        Returns a float32 tensor shaped like ``x``. Lossless codecs return zeros.

        Raises:
            TypeError: a lossy codec that declares no bound (its author must override
                this; codecs without an elementwise bound return ``+inf``, as PowerSGD does).
        """
        if self.lossless:
            return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        raise TypeError(
            f"lossy codec {self.spec!r} ({type(self).__name__}) declares no error_bound; "
            "override error_bound(x) with its elementwise bound (or +inf if it has none)"
        )

    # --------------------------------------------------------------- encoding
    def check_tensor(self, tensor: torch.Tensor) -> None:
        """Raise a clear error when ``tensor`` cannot be encoded by this codec."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{self.spec}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not self.supports(tensor.dtype):
            allowed = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
            got = str(tensor.dtype).replace("torch.", "")
            raise UnsupportedDtypeError(
                f"codec {self.spec!r} cannot encode dtype {got}: "
                f"it is lossy and takes floating tensors only ({allowed}); "
                "use a lossless codec ('none', 'lz4', 'zstd') for integer, bool or complex data"
            )
        if self.devices is not None and tensor.device.type not in self.devices:
            raise UnsupportedDeviceError(
                f"codec {self.spec!r} cannot run on device {tensor.device}; "
                f"it runs on: {', '.join(self.devices)}"
            )

    def encode(self, tensor: torch.Tensor) -> Packet:
        """Encode ``tensor`` (any shape, contiguous or not) into a `Packet`.

        Raises:
            UnsupportedDtypeError: the codec does not take ``tensor.dtype``.
            UnsupportedDeviceError: the codec cannot run on ``tensor.device``.
        """
        self.check_tensor(tensor)
        flat = tensor.detach().contiguous().view(-1)
        payload = tuple(self._encode(flat))
        meta = PacketMeta(torch.Size(tensor.shape), tensor.dtype, self.spec, self.config_hash)
        return Packet(payload, meta)

    def encode_into(
        self,
        tensor: torch.Tensor,
        payload: tuple[torch.Tensor, ...],
        *,
        roundtrip: bool = False,
    ) -> None:
        """Encode ``tensor`` into preallocated payload sections laid out as `sections` says.

        Used by ``wire.encode_pack`` to write straight into a wire buffer; codecs with
        fused kernels write each section in place, the others encode and copy.

        Args:
            tensor: what to encode.
            payload: the sections to write.
            roundtrip: also overwrite ``tensor`` (contiguous) with what a receiver decodes
                from ``payload`` -- in the same pass where the codec has a fused kernel.
                The owner of a chunk in ``two_phase`` needs exactly that.

        Raises:
            UnsupportedDtypeError, UnsupportedDeviceError: as `encode`.
            ValueError: the codec has no fixed layout, or ``payload`` does not match it.
        """
        self.check_tensor(tensor)
        layout = self.sections(tensor.numel(), tensor.dtype)
        got = [(t.dtype, t.numel()) for t in payload]
        if layout is None or got != layout or any(not t.is_contiguous() for t in payload):
            raise ValueError(
                f"{self.spec}: encode_into needs contiguous sections {layout}, got {got}"
            )
        if roundtrip and not tensor.is_contiguous():
            raise ValueError(f"{self.spec}: encode_into(roundtrip=True) needs a contiguous tensor")
        self._encode_into(tensor.detach().contiguous().view(-1), payload, roundtrip)

    def decode(
        self, packet: Packet, out: torch.Tensor | None = None, *, accumulate: bool = False
    ) -> torch.Tensor:
        """Decode ``packet`` to a tensor of its original shape and dtype.

        Args:
            packet: made by ``encode`` of an equal codec (or by ``wire.unpack``).
            out: optional destination of the packet's shape; written in place and
                returned. Its dtype must be the packet's, except with ``accumulate``.
            accumulate: add the decoded tensor to ``out`` instead of overwriting it,
                as ``out += decode(packet)`` would (the decoded value is rounded to the
                packet's dtype first), but without a temporary where the codec has a
                fused kernel. ``out`` may then be of any floating dtype (a float32
                accumulator for 16-bit packets).

        Raises:
            CodecMismatchError: the packet was made by another codec config.
            WireError: the payload does not match the packet's shape and dtype.
            ValueError: ``out`` is missing (with ``accumulate``) or has the wrong shape
                or dtype.
        """
        meta = packet.meta
        if meta.spec != self.spec:
            raise CodecMismatchError(
                f"packet was encoded with codec {meta.spec!r} but is being decoded with "
                f"{self.spec!r}; every side of a transfer must use the same codec spec"
            )
        # A packet from the wire carries a header that may be corrupted: check what the
        # codec is asked to produce, and what it produced, against the header.
        if not self.supports(meta.dtype):
            raise WireError(
                f"packet header names dtype {meta.dtype}, which {self.spec!r} cannot produce"
            )
        if out is not None:
            _check_out(out, meta, accumulate)
            if out.is_contiguous():
                fused = self._decode_into(
                    packet.payload, meta.numel, meta.dtype, out.view(-1), accumulate
                )
                if fused is not None:
                    return out
        elif accumulate:
            raise ValueError("decode(accumulate=True) needs an out tensor to add to")
        else:
            fresh = self._decode_into(packet.payload, meta.numel, meta.dtype, None, False)
            if fresh is not None:
                return fresh.view(meta.shape)
        flat = self._decode(packet.payload, meta.numel, meta.dtype)
        if flat.numel() != meta.numel or flat.dtype != meta.dtype:
            raise WireError(
                f"{self.spec!r} decoded {flat.numel()} elements of {flat.dtype} but the packet "
                f"header says shape {tuple(meta.shape)} of {meta.dtype}; the packet is corrupted"
            )
        result = flat.view(meta.shape)
        if out is None:
            return result
        if accumulate:
            out.add_(result)
        else:
            out.copy_(result)
        return out

    def roundtrip(self, tensor: torch.Tensor) -> torch.Tensor:
        """``decode(encode(tensor))``; handy for error feedback and tests."""
        return self.decode(self.encode(tensor))

    # ------------------------------------------------------- for subclasses
    @abc.abstractmethod
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode flat ``x`` into 1-D payload sections (see the module docstring)."""

    @abc.abstractmethod
    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Inverse of `_encode`: a 1-D tensor of ``numel`` elements of ``dtype``."""

    def _encode_into(
        self, x: torch.Tensor, payload: tuple[torch.Tensor, ...], roundtrip: bool = False
    ) -> None:
        """Optional fused path of `encode_into` (flat ``x``); default: encode, then copy
        (and decode back into ``x`` for ``roundtrip``)."""
        for dst, src in zip(payload, self._encode(x), strict=True):
            dst.copy_(src)
        if roundtrip:
            meta = PacketMeta(torch.Size([x.numel()]), x.dtype, self.spec, self.config_hash)
            self.decode(Packet(tuple(payload), meta), out=x)

    def _decode_into(
        self,
        payload: tuple[torch.Tensor, ...],
        numel: int,
        dtype: torch.dtype,
        out: torch.Tensor | None,
        accumulate: bool,
    ) -> torch.Tensor | None:
        """Optional fused path: decode straight into flat contiguous ``out`` (or add to it).

        ``out`` None: into a new 1-D tensor of ``numel`` elements of ``dtype``, allocated
        only after ``payload`` was validated (a hostile header must not allocate). Return
        the written tensor, or None to let `decode` fall back to `_decode` plus a copy or
        an add; a codec that writes must first validate ``payload`` as `_decode` does.
        """
        return None


#: Every registered codec class by ``codec_id``; ``commpress.registry.register_codec``
#: fills it (the built-ins register when ``commpress`` is imported).
CODEC_CLASSES: dict[str, type[Codec]] = {}


def codec_class(name: str) -> type[Codec]:
    """The registered class named ``name``.

    Raises:
        UnknownCodecError: no codec of that name is registered (lists those that are).
    """
    try:
        return CODEC_CLASSES[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown codec {name!r}; registered codecs: {', '.join(sorted(CODEC_CLASSES))}"
        ) from None


def fresh_output(
    payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype, out: torch.Tensor | None
) -> torch.Tensor:
    """``out``, or (for ``_decode_into`` with ``out=None``) a new flat tensor on the
    payload's device; call it only after the payload was validated."""
    if out is not None:
        return out
    return torch.empty(numel, dtype=dtype, device=payload[0].device)


def _check_out(out: torch.Tensor, meta: PacketMeta, accumulate: bool) -> None:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
    dtype_ok = (
        is_float(out.dtype) if accumulate and is_float(meta.dtype) else (out.dtype == meta.dtype)
    )
    if out.shape != meta.shape or not dtype_ok:
        want = "a floating dtype" if accumulate and is_float(meta.dtype) else str(meta.dtype)
        raise ValueError(
            f"out has shape {tuple(out.shape)} and dtype {out.dtype}, expected "
            f"{tuple(meta.shape)} and {want}"
        )


def saturating_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` where a finite value that rounds past ``dtype``'s range becomes its
    largest finite value (with the sign) instead of Inf; NaN and +-Inf pass through.

    Decoders use it for narrower output dtypes: a decoded value may exceed the input's
    largest magnitude by the codec's error, and must not turn a finite input into Inf.
    """
    y = t.to(dtype)
    if dtype == t.dtype or not dtype.is_floating_point:
        return y
    over = y.isinf() & t.isfinite()
    # On CPU, skip the select in the common case; elsewhere asking would sync the host.
    if y.device.type != "cpu" or bool(over.any()):
        big = torch.full((), torch.finfo(dtype).max, dtype=dtype, device=y.device)
        y = torch.where(over, torch.where(t < 0, -big, big), y)
    return y


#: A boolean codec parameter in a spec: no "yes"/"on", so every rank spells it one way.
_BOOLS = {"1": True, "true": True, "0": False, "false": False}


def _convert(codec_id: str, key: str, raw: Any, typ: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    if typ is bool:
        if raw not in _BOOLS:
            raise ConfigError(
                f"{codec_id}: {key}={raw!r} is not a valid bool; expected one of 0, 1, true, false"
            )
        return _BOOLS[raw]
    try:
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
    except ValueError:
        kind = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{codec_id}: {key}={raw!r} is not a valid {kind}") from None
    return raw


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def check_range(
    codec_id: str, name: str, value: Any, lo: float, hi: float, integer: bool = False
) -> None:
    """Raise ConfigError unless ``lo <= value <= hi`` (and an int if ``integer``)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ConfigError(
            f"{codec_id}: {name}={value!r} is not allowed; expected {kind} with "
            f"{lo} <= {name} <= {hi}"
        )


def check_choice(codec_id: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(
            f"{codec_id}: {name}={value!r} is not allowed; choose one of {list(choices)}"
        )
