"""Every byte format of commpress; only this package parses bytes.

- `packet`: a `Packet` as one ``uint8`` buffer (`pack`, `encode_pack`, `unpack`).
- `descriptor`: the ``int64`` row every rank all-gathers before a compressed
  collective (`Descriptor`, `DescriptorTable`).
- `p2p`: the ``int64`` message before each compressed send (`P2PDescriptor`).

Algorithms build these through the typed classes and move the resulting
tensors; they never read words or bytes themselves.
"""

from __future__ import annotations

from .descriptor import Descriptor, DescriptorTable
from .p2p import P2PDescriptor
from .packet import (
    HEADER_FIXED,
    MAGIC,
    VERSION,
    encode_pack,
    layout_nbytes,
    pack,
    packed_nbytes,
    read_spec,
    unpack,
)

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
    "Descriptor",
    "DescriptorTable",
    "P2PDescriptor",
]
