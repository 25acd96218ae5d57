"""The ``powersgd`` algorithm in the table: low-rank all-reduce of the tensor whole.

`commpress.algorithms.powersgd` holds the math and the memory; this is its
declaration (name, wire code, what it runs) and the call glue: a descriptor
exchange first, because PowerSGD's backend all-reduces abort gloo when the
ranks' shapes differ.
"""

from __future__ import annotations

from typing import Any

import torch

from . import powersgd
from .common import Comm
from .registry import Algorithm, CodecSpeed, Link, register_algorithm

__all__ = ["PowerSGDAlgorithm"]


@register_algorithm
class PowerSGDAlgorithm(Algorithm):
    """``P = M Q``, all-reduce P, orthogonalize, ``Q = Mᵀ P``, all-reduce Q.

    Runs when the codec names it (``codec="powersgd:rank=4"``); error feedback is
    always on (the residuals live in `powersgd.memory`).
    """

    name = "powersgd"
    code = powersgd.WIRE_CODE
    by_codec = True
    flat = False

    def cost(
        self, nbytes: int, world: int, link: Link, speed: CodecSpeed, family: str = "all_reduce"
    ) -> float:
        """Two ring all-reduces of the factors (``S/r`` bytes together) plus the codec work."""
        wire = 2 * (world - 1) / world * nbytes / speed.ratio
        return (
            nbytes / speed.encode_Bps
            + link.seconds(wire, 4 * (world - 1))
            + nbytes / speed.decode_Bps
        )

    def all_reduce(
        self,
        comm: Comm,
        flat: torch.Tensor,
        op: Any,
        prepared: Any = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All-reduce ``flat`` (here: the tensor, any shape) in place; returns it."""
        powersgd.all_reduce(comm, flat, op, comm.key)
        return flat

    def reduce(
        self, comm: Comm, flat: torch.Tensor, op: Any, root: int, prepared: Any = None
    ) -> torch.Tensor | None:
        """An all-reduce whose result only ``root`` keeps: the others reduce a copy."""
        out = self.all_reduce(comm, flat if comm.rank == root else flat.detach().clone(), op)
        return out if comm.rank == root else None
