"""The point-to-point descriptor: the fixed-size ``int64`` message before each compressed send.

A compressed send is two messages (see ``algorithms.transport``): this
descriptor on the caller's tag, then the packed buffer on a private tag::

    word  field
    0     magic + p2p descriptor version
    1     codec config hash (``Codec.config_hash`` as a signed int64)
    2     length of the codec spec string in bytes (<= ``MAX_SPEC``)
    3     dtype code of the tensor (``codec.DTYPE_CODES``, 0 for none)
    4     element count of the tensor
    5     packed payload size in bytes
    6     tag of the payload message
    7     reserved, 0

The receiver learns from it how many bytes to receive and on which tag, and
checks the codec (`P2PDescriptor.check_codec`) once it has drained the payload,
so that a mismatch leaves the channel usable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec import CODE_DTYPES, DTYPE_CODES, Codec
from ..errors import CodecMismatchError, WireError
from .descriptor import signed64, unsigned64
from .packet import MAX_NUMEL, MAX_SPEC, read_spec

__all__ = ["P2PDescriptor", "P2P_MAGIC", "P2P_WORDS"]

P2P_MAGIC = (0x434D5053 << 32) | 1  # "CMPS", p2p descriptor version 1
P2P_WORDS = 8


@dataclass(frozen=True)
class P2PDescriptor:
    """What a compressed send announces to its receiver.

    Attributes:
        config_hash: ``Codec.config_hash`` of the sender's codec (unsigned 64-bit).
        spec_nbytes: length of the sender's codec spec in UTF-8 bytes.
        dtype: dtype of the sent tensor (None: a dtype without a wire code).
        numel: element count of the sent tensor.
        nbytes: size of the packed payload that follows.
        payload_tag: the tag the payload travels on.
    """

    config_hash: int
    spec_nbytes: int
    dtype: torch.dtype | None
    numel: int
    nbytes: int
    payload_tag: int

    @classmethod
    def for_send(
        cls, codec: Codec, tensor: torch.Tensor, nbytes: int, payload_tag: int
    ) -> P2PDescriptor:
        """The descriptor of sending ``tensor`` with ``codec`` as ``nbytes`` packed bytes."""
        return cls(
            config_hash=codec.config_hash,
            spec_nbytes=len(codec.spec.encode()),
            dtype=tensor.dtype if tensor.dtype in DTYPE_CODES else None,
            numel=tensor.numel(),
            nbytes=nbytes,
            payload_tag=payload_tag,
        )

    @staticmethod
    def empty(device: torch.device) -> torch.Tensor:
        """A receive buffer for one descriptor."""
        return torch.empty(P2P_WORDS, dtype=torch.int64, device=device)

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        """The ``P2P_WORDS`` ``int64`` words of the descriptor."""
        words = [
            P2P_MAGIC,
            signed64(self.config_hash),
            self.spec_nbytes,
            DTYPE_CODES.get(self.dtype, 0) if self.dtype is not None else 0,
            self.numel,
            self.nbytes,
            self.payload_tag,
            0,
        ]
        return torch.tensor(words, dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, buf: torch.Tensor) -> P2PDescriptor:
        """Parse a received descriptor.

        Raises:
            WireError: not ``P2P_WORDS`` ``int64`` words, not a commpress p2p descriptor
                (a plain message on the tag, or another commpress version), or a field
                out of range.
        """
        if buf.dtype != torch.int64 or buf.numel() != P2P_WORDS:
            raise WireError(
                f"p2p descriptor must be {P2P_WORDS} int64 words, got {buf.numel()} {buf.dtype}"
            )
        magic, config_hash, spec_nbytes, dcode, numel, nbytes, tag, reserved = buf.tolist()
        if magic != P2P_MAGIC:
            raise WireError(
                "not a commpress p2p descriptor (mixed compressed and plain sends on one tag, "
                "or mixed commpress versions)"
            )
        if dcode and dcode not in CODE_DTYPES:
            raise WireError(f"p2p descriptor names unknown dtype code {dcode}")
        if not 0 <= spec_nbytes <= MAX_SPEC or reserved != 0:
            raise WireError(
                f"p2p descriptor is malformed: spec length {spec_nbytes} (max {MAX_SPEC}), "
                f"reserved word {reserved}"
            )
        if not 0 <= numel <= MAX_NUMEL or not 0 <= nbytes <= MAX_NUMEL or tag < 0:
            raise WireError(
                f"p2p descriptor is malformed: {numel} elements, {nbytes} bytes, tag {tag}"
            )
        return cls(
            config_hash=unsigned64(config_hash),
            spec_nbytes=spec_nbytes,
            dtype=CODE_DTYPES.get(dcode),
            numel=numel,
            nbytes=nbytes,
            payload_tag=tag,
        )

    def check_codec(self, codec: Codec, payload: torch.Tensor, source: int) -> None:
        """Raise `CodecMismatchError` naming both specs if the sender used another codec.

        Args:
            codec: the receiver's codec.
            payload: the drained payload; its packet header names the sender's spec.
            source: the sender's rank, for the message.
        """
        spec = codec.spec
        if self.config_hash == codec.config_hash and self.spec_nbytes == len(spec.encode()):
            return
        try:
            theirs = repr(read_spec(payload))
        except WireError:
            theirs = f"an unreadable spec of {self.spec_nbytes} bytes"
        detail = (
            " (same spec, different config hash: mixed commpress versions?)"
            if theirs == repr(spec)
            else ""
        )
        raise CodecMismatchError(
            f"codec mismatch: rank {source} sent a tensor encoded with {theirs} but this rank "
            f"receives with {spec!r}{detail}; every rank must use the same codec spec"
        )
