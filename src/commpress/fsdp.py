"""`FSDPReduceScatter`: FSDP2's gradient reduce-scatter through commpress (`commpress.hooks`).

Kept apart from the DDP hook (`commpress.hooks` re-exports it): it shares no
state with it, only the rule that a hook compresses everything it is handed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError
from .handle import Handle
from .registry import CodecLike, get_codec

__all__ = ["FSDPReduceScatter"]

try:  # torch's FSDP2 custom-comm interface (private module; public setter)
    from torch.distributed.fsdp._fully_shard._fsdp_api import (
        ReduceScatter as _FSDPReduceScatterBase,
    )
except ImportError:  # older torch: duck typing is all FSDP2 needs
    _FSDPReduceScatterBase = object  # type: ignore[assignment,misc]


class FSDPReduceScatter(_FSDPReduceScatterBase):  # type: ignore[misc,valid-type]
    """FSDP2 gradient reduce-scatter through `commpress.distributed.reduce_scatter_tensor`.

    ::

        model = fully_shard(model)
        model.set_custom_reduce_scatter(commpress.hooks.FSDPReduceScatter(codec="int8"))

    Compresses only the gradient reduce-scatter (parameters are all-gathered
    exactly). ``set_custom_reduce_scatter`` applies to one FSDP module, so call it on
    every ``fully_shard``-ed submodule. FSDP2 asks for ``AVG`` with float32/bfloat16
    gradients; it runs as a compressed ``SUM`` followed by a division by the group
    size. ``PREMUL_SUM`` (from ``set_gradient_divide_factor``) is not supported.

    Like `CompressionState`, it compresses every reduce-scatter it is handed, whatever
    its size (the policy's ``min_bytes`` is for calls nobody chose to compress: with
    it, a model of small layers had 30 of its 90 reduce-scatters compressed); pass
    ``min_bytes`` to leave small ones plain.

    Args:
        codec: codec spec; any codec the reduce-scatter accepts (not ``powersgd``).
        min_bytes: reduce-scatters of fewer input bytes run uncompressed (default 0).
    """

    def __init__(self, codec: CodecLike = "int8", min_bytes: int = 0) -> None:
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise ConfigError(
                f"FSDPReduceScatter(min_bytes={min_bytes!r}) is not allowed; expected an int >= 0"
            )
        self.min_bytes = min_bytes
        self.codec = get_codec(codec)
        if self.codec.algorithm is not None:
            raise ConfigError(
                f"FSDPReduceScatter: codec {self.codec.spec!r} needs the "
                f"{self.codec.algorithm!r} all-reduce algorithm, which has no reduce-scatter; "
                "use an elementwise codec such as 'int8', 'fp8' or 'bf16'"
            )

    def __repr__(self) -> str:
        return f"FSDPReduceScatter(codec={self.codec.spec!r}, min_bytes={self.min_bytes})"

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any = dist.ReduceOp.SUM,
        async_op: bool = False,
    ) -> Handle | None:
        """Reduce-scatter ``input_tensor`` into ``output_tensor``; a `Handle` if ``async_op``.

        ``AVG`` runs as a ``SUM`` and a division once the sum is there (gloo has no
        ``AVG`` for the uncompressed fallback of small calls).
        """
        from . import distributed as cdist
        from .policy import using

        average = op == dist.ReduceOp.AVG
        if not average and op != dist.ReduceOp.SUM:
            raise ConfigError(
                f"FSDPReduceScatter supports ReduceOp SUM and AVG, got {op!r}; "
                "do not combine it with set_gradient_divide_factor"
            )
        with using(min_bytes=self.min_bytes):
            work = cdist.reduce_scatter_tensor(
                output_tensor,
                input_tensor,
                op=dist.ReduceOp.SUM,
                group=group,
                async_op=async_op,
                codec=self.codec,
            )

        def finish() -> list[torch.Tensor]:
            if work is not None:
                work.wait()
            if average:
                output_tensor.div_(group.size())
            return [output_tensor]

        if not async_op:
            finish()
            return None
        return Handle(completer=finish, poll=work.is_completed if work is not None else None)
