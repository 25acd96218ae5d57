"""Every byte format of commpress; only this package parses bytes.

- `packet`: a `Packet` as one ``uint8`` buffer (`pack`, `encode_pack`, `unpack`).
- `descriptor`: the ``int64`` row every rank all-gathers before a compressed
  collective (`Descriptor`, `DescriptorTable`).
- `p2p`: the ``int64`` message before each compressed send (`P2PDescriptor`).
- `pipeline`: the header of a pipeline-parallel activation (`PipelineHeader`).

Algorithms build these through the typed classes and move the resulting
tensors; they never read words or bytes themselves.
"""

from __future__ import annotations

from . import packet
from .descriptor import Descriptor, DescriptorTable
from .p2p import P2PDescriptor
from .packet import *  # noqa: F403 - the packet format is the package's main API

__all__ = [*packet.__all__, "Descriptor", "DescriptorTable", "P2PDescriptor"]
