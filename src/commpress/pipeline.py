"""Compressed point-to-point transfers for pipeline parallelism.

Between pipeline stages travel activations (forward) and their gradients
(backward): large, dense, floating tensors that tolerate FP8 or INT8 well.
These helpers send them with `commpress.distributed.send`/``isend`` and a
codec, and take care of what plain ``recv`` leaves to the caller: the shape
and dtype.

Every transfer is two messages with the same tag: a fixed-size header
(``int64[2 + MAX_NDIM]``: dtype code, ndim, dims; sent uncompressed, 80
bytes) and the payload, encoded with ``codec``. So a receiver that does not
know the shape (``recv_activation``) and one that does (``irecv_activation``
into ``out``) both pair with either send; the header also lets a receiver
with a preallocated ``out`` refuse a tensor of another shape with a clear
error instead of garbage. Both sides must use the same codec; a mismatch
raises `commpress.CodecMismatchError` on the receiver.

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

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .codec import CODE_DTYPES, DTYPE_CODES
from .errors import ConfigError
from .registry import CodecLike, get_codec

__all__ = [
    "send_activation",
    "recv_activation",
    "isend_activation",
    "irecv_activation",
    "SendHandle",
    "RecvHandle",
    "MAX_NDIM",
]

#: Most dimensions an activation may have (the header is fixed-size).
MAX_NDIM = 8
_HEADER_LEN = 2 + MAX_NDIM


def control_device(group: Any = None) -> torch.device:
    """Device for small control tensors (headers, counts): CUDA under NCCL, else CPU."""
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _header(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.dim() > MAX_NDIM:
        raise ConfigError(
            f"send_activation: tensors of up to {MAX_NDIM} dimensions are supported, got "
            f"{t.dim()}; reshape it first"
        )
    if t.dtype not in DTYPE_CODES:
        raise ConfigError(f"send_activation: dtype {t.dtype} has no wire code")
    values = [DTYPE_CODES[t.dtype], t.dim(), *t.shape] + [0] * (MAX_NDIM - t.dim())
    return torch.tensor(values, dtype=torch.int64, device=device)


def _parse_header(header: torch.Tensor) -> tuple[torch.Size, torch.dtype]:
    values = header.tolist()
    code, ndim = values[0], values[1]
    if code not in CODE_DTYPES or not 0 <= ndim <= MAX_NDIM or any(d < 0 for d in values[2:]):
        raise ConfigError(
            f"recv_activation: malformed header {values}; was the peer using send_activation "
            "with the same tag?"
        )
    return torch.Size(values[2 : 2 + ndim]), CODE_DTYPES[code]


def _check_out(out: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
    if out.shape != shape or out.dtype != dtype:
        raise ConfigError(
            f"recv_activation: the peer sent a tensor of shape {tuple(shape)} and dtype {dtype}, "
            f"but out has shape {tuple(out.shape)} and dtype {out.dtype}"
        )


@dataclass
class SendHandle:
    """Pending ``isend_activation``: ``wait()`` returns once both messages are sent."""

    _works: tuple[Any, ...]

    def wait(self) -> None:
        for w in self._works:
            w.wait()

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)


@dataclass
class RecvHandle:
    """Pending ``irecv_activation``: ``wait()`` returns the received tensor (``out``)."""

    _header: torch.Tensor
    _header_work: Any
    _work: Any
    out: torch.Tensor

    def wait(self) -> torch.Tensor:
        self._header_work.wait()
        shape, dtype = _parse_header(self._header)
        _check_out(self.out, shape, dtype)
        self._work.wait()
        return self.out

    def is_completed(self) -> bool:
        return bool(self._header_work.is_completed() and self._work.is_completed())


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
    header = _header(tensor, control_device(group))
    cdist.send(header, dst=dst, group=group, tag=tag, codec="none")
    cdist.send(tensor.detach().contiguous(), dst=dst, group=group, tag=tag, codec=codec)


def isend_activation(
    tensor: torch.Tensor,
    dst: int,
    *,
    codec: CodecLike = "fp8",
    group: Any = None,
    tag: int = 0,
) -> SendHandle:
    """Non-blocking `send_activation`; do not modify ``tensor`` before ``wait()``."""
    from . import distributed as cdist

    get_codec(codec)
    header = _header(tensor, control_device(group))
    w1 = cdist.isend(header, dst=dst, group=group, tag=tag, codec="none")
    w2 = cdist.isend(tensor.detach().contiguous(), dst=dst, group=group, tag=tag, codec=codec)
    return SendHandle((w1, w2))


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
        ConfigError: ``out`` does not match what was sent, or the header is malformed.
        CodecMismatchError: the sender used another codec.
    """
    from . import distributed as cdist

    get_codec(codec)
    header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=control_device(group))
    cdist.recv(header, src=src, group=group, tag=tag, codec="none")
    shape, dtype = _parse_header(header)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device or control_device(group))
    else:
        _check_out(out, shape, dtype)
    cdist.recv(out, src=src, group=group, tag=tag, codec=codec)
    return out


def irecv_activation(
    src: int,
    *,
    out: torch.Tensor,
    codec: CodecLike = "fp8",
    group: Any = None,
    tag: int = 0,
) -> RecvHandle:
    """Non-blocking receive into ``out`` (its shape must be known: the usual pipeline case).

    Returns at once; ``handle.wait()`` returns ``out`` and raises `ConfigError` if the
    sender's tensor had another shape or dtype.
    """
    from . import distributed as cdist

    get_codec(codec)
    header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=control_device(group))
    hw = cdist.irecv(header, src=src, group=group, tag=tag, codec="none")
    w = cdist.irecv(out, src=src, group=group, tag=tag, codec=codec)
    return RecvHandle(header, hw, w, out)
