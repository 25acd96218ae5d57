"""`Comm`: everything an algorithm needs to know about one call."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..codec import Codec
from ..errors import CollectiveError
from ..feedback import ErrorFeedback
from ..stats import CallRecord

__all__ = ["Comm"]


@dataclass
class Comm:
    """Everything an algorithm needs about one call.

    Attributes:
        op: the public op name (``"all_reduce"``...), for messages and codes.
        group: the torch process group (None: the default group).
        rank: this process's rank in ``group``.
        size: number of ranks in ``group``.
        device: where buffers live (the tensors' device).
        codec: the codec of the call.
        verify: exchange descriptors (always True for variable-size codecs).
        checksum: CRC32 in every wire buffer.
        rec: the call's stats record, filled in as the algorithm runs.
        feedback: error feedback memory when the call uses it, else None.
        key: the error-feedback key of the call.
    """

    op: str
    group: Any
    rank: int
    size: int
    device: torch.device
    codec: Codec
    verify: bool = True
    checksum: bool = False
    rec: CallRecord = field(default_factory=lambda: CallRecord(""))
    feedback: ErrorFeedback | None = None
    key: Hashable | None = None

    def global_rank(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` (what torch's ``src=``/``dst=`` take)."""
        if self.group is None or self.group is dist.GroupMember.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def fail(self, what: str) -> CollectiveError:
        return CollectiveError(f"{self.op}: {what}")
