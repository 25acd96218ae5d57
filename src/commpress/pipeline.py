"""Compressed point-to-point transfers for pipeline parallelism.

Between pipeline stages travel activations (forward) and their gradients
(backward): large, dense, floating tensors that tolerate FP8 or INT8 well.
These helpers send them with `commpress.distributed.send`/``isend`` and a
codec, and take care of what plain ``recv`` leaves to the caller: the shape
and dtype.

Every transfer is two messages with the same tag: a fixed-size header
(`commpress.wire.pipeline.PipelineHeader`: magic, dtype, ndim, dims; sent
uncompressed, 88 bytes; only `commpress.wire` reads it) and the payload,
encoded with ``codec``. So a receiver that does not know the shape
(``recv_activation``) and one that does (``irecv_activation`` into ``out``)
both pair with either send; the header also lets a receiver with a
preallocated ``out`` refuse a tensor of another shape with a clear error
instead of garbage. Both sides must use the same codec; a mismatch
raises `commpress.CodecMismatchError` on the receiver.

``isend_activation`` and ``irecv_activation`` return a `commpress.Handle`
(a ``torch.distributed.Work``); the receive's ``result()`` is ``[out]`` and
its ``source_rank()`` is ``src``.

Defaults: ``codec="fp8"`` (e4m3, a scale per 128 elements) for both
directions. Gradients have a wider dynamic range than activations; per-block
scales handle that, but ``"int8"`` or ``"bf16"`` are the safer choice for
gradients of the first stages when loss curves diverge. Integer tensors
(token ids sent between stages) travel losslessly whatever the codec.

Example (two stages, one micro-batch)::

    # rank 0
    h = stage0(x)
    send_activation(h, dst=1)
    h.backward(recv_activation(src=1, codec="int8"))
    # rank 1
    h = recv_activation(src=0).requires_grad_()
    loss = stage1(h); loss.backward()
    send_activation(h.grad, dst=0, codec="int8")
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError
from .handle import Handle
from .registry import CodecLike, get_codec
from .wire.pipeline import MAX_NDIM, PipelineHeader

__all__ = [
    "send_activation",
    "recv_activation",
    "isend_activation",
    "irecv_activation",
    "MAX_NDIM",
]


def control_device(group: Any = None) -> torch.device:
    """Device for small control tensors (headers, counts): CUDA under NCCL, else CPU."""
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_out(out: torch.Tensor, header: PipelineHeader) -> None:
    if out.shape != header.shape or out.dtype != header.dtype:
        raise ConfigError(
            f"recv_activation: the peer sent a tensor of shape {tuple(header.shape)} and dtype "
            f"{header.dtype}, but out has shape {tuple(out.shape)} and dtype {out.dtype}"
        )


def send_activation(
    tensor: torch.Tensor,
    dst: int,
    *,
    codec: CodecLike = "fp8",
    group: Any = None,
    tag: int = 0,
) -> None:
    """Send ``tensor`` (any shape, dtype, contiguity) to ``dst``, encoded with ``codec``.

    Blocks until sent. Pairs with `recv_activation` or `irecv_activation` on ``dst``.

    Raises:
        ConfigError: more than `MAX_NDIM` dimensions, or a bad codec spec.
    """
    from . import distributed as cdist

    get_codec(codec)
    header = PipelineHeader.for_tensor(tensor).to_tensor(control_device(group))
    cdist.send(header, dst=dst, group=group, tag=tag, codec="none")
    cdist.send(tensor.detach().contiguous(), dst=dst, group=group, tag=tag, codec=codec)


def isend_activation(
    tensor: torch.Tensor,
    dst: int,
    *,
    codec: CodecLike = "fp8",
    group: Any = None,
    tag: int = 0,
) -> Handle:
    """Non-blocking `send_activation`; do not modify ``tensor`` before ``wait()``.

    Returns:
        A `commpress.Handle` done once both messages are sent; ``result()`` is ``[tensor]``.
    """
    from . import distributed as cdist

    get_codec(codec)
    header = PipelineHeader.for_tensor(tensor).to_tensor(control_device(group))
    works = (
        cdist.isend(header, dst=dst, group=group, tag=tag, codec="none"),
        cdist.isend(tensor.detach().contiguous(), dst=dst, group=group, tag=tag, codec=codec),
    )

    def complete() -> list[torch.Tensor]:
        for w in works:
            w.wait()
        return [tensor]

    return Handle(completer=complete, poll=lambda: all(w.is_completed() for w in works))


def recv_activation(
    src: int,
    *,
    codec: CodecLike = "fp8",
    group: Any = None,
    tag: int = 0,
    out: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Receive a tensor sent by `send_activation` on ``src``; blocks until it arrives.

    Args:
        src: rank of the sender (in ``group``'s numbering as for ``torch.distributed.recv``).
        codec: must equal the sender's codec.
        out: optional destination of the right shape and dtype.
        device: where to allocate the result when ``out`` is None (default: CUDA under
            NCCL, else CPU).

    Returns:
        The tensor, of the sender's shape and dtype (``out`` if given).

    Raises:
        ConfigError: ``out`` does not match what was sent.
        WireError: the header is malformed (the peer did not use `send_activation`).
        CodecMismatchError: the sender used another codec.
    """
    from . import distributed as cdist

    get_codec(codec)
    buf = PipelineHeader.empty(control_device(group))
    cdist.recv(buf, src=src, group=group, tag=tag, codec="none")
    header = PipelineHeader.from_tensor(buf)
    if out is None:
        out = torch.empty(header.shape, dtype=header.dtype, device=device or control_device(group))
    else:
        _check_out(out, header)
    cdist.recv(out, src=src, group=group, tag=tag, codec=codec)
    return out


def irecv_activation(
    src: int,
    *,
    out: torch.Tensor,
    codec: CodecLike = "fp8",
    group: Any = None,
    tag: int = 0,
) -> Handle:
    """Non-blocking receive into ``out`` (its shape must be known: the usual pipeline case).

    Returns:
        A `commpress.Handle`, at once; its ``result()`` is ``[out]``, its ``source_rank()``
        is ``src``. ``wait()`` raises `ConfigError` if the sender's tensor had another
        shape or dtype, `WireError` if the header is malformed.
    """
    from . import distributed as cdist

    get_codec(codec)
    buf = PipelineHeader.empty(control_device(group))
    header_work = cdist.irecv(buf, src=src, group=group, tag=tag, codec="none")
    work = cdist.irecv(out, src=src, group=group, tag=tag, codec=codec)

    def complete() -> list[torch.Tensor]:
        header_work.wait()
        _check_out(out, PipelineHeader.from_tensor(buf))  # before the payload's own errors
        work.wait()
        return [out]

    return Handle(
        completer=complete,
        poll=lambda: header_work.is_completed() and work.is_completed(),
        source_rank=src,
    )
