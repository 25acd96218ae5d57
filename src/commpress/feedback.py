"""Error feedback: remember what compression dropped and add it back next time.

``ErrorFeedback(codec)`` keeps, per key, the residual ``r = x - decode(encode(x))``.
The next call with the same key encodes ``x + r`` instead of ``x``, so errors
do not accumulate over steps: biased codecs (``sign``, ``topk``) converge
like the uncompressed run (Karimireddy et al., 2019).

Keys name a stream of tensors that are "the same thing" over time -- a
parameter's gradient, a DDP bucket index. Two different tensors must never
share a key. The residual is kept on the tensor's device in float32, or in
float64 for float64 tensors (a float32 residual would round their values, and
turn magnitudes beyond float32's range into Inf).

Gradient accumulation: call ``compensate`` only when the gradient is actually
communicated (once per optimizer step), not per micro-batch.

Checkpoints: ``state_dict()`` returns the residuals (CPU tensors) and the
codec spec; ``load_state_dict`` restores them and refuses a state made with
another codec (the residual of one codec is meaningless for another).
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Hashable
from typing import Any

import torch

from .codec import Codec, Packet
from .errors import CodecMismatchError, ConfigError
from .registry import CodecLike, get_codec

__all__ = [
    "ErrorFeedback",
    "residual_dtype",
    "error_feedback",
    "reset_error_feedback",
    "auto_key",
    "MAX_SLOTS_PER_SITE",
]


def residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where residuals are kept: float64 for float64 tensors, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ErrorFeedback:
    """Per-key residual memory around a codec.

    Args:
        codec: the codec whose error is fed back (spec, config or `Codec`).

    Example::

        >>> import torch, commpress
        >>> ef = commpress.ErrorFeedback("sign")
        >>> g = torch.randn(1000)
        >>> packet = ef.encode(g, key="w1")   # encodes g + residual, stores new residual
        >>> approx = ef.codec.decode(packet)
    """

    def __init__(self, codec: CodecLike) -> None:
        self.codec: Codec = get_codec(codec)
        self._residuals: dict[Hashable, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.codec.spec!r}, keys={len(self._residuals)})"

    def __len__(self) -> int:
        return len(self._residuals)

    def compensate(self, tensor: torch.Tensor, key: Hashable) -> torch.Tensor:
        """``tensor + residual[key]`` in `residual_dtype` (the residual is zero the first time).

        Raises:
            ConfigError: the stored residual for ``key`` has another shape.
        """
        x = tensor.detach().to(residual_dtype(tensor.dtype))
        r = self._residuals.get(key)
        if r is None:
            return x
        if r.shape != x.shape:
            raise ConfigError(
                f"error feedback key {key!r} holds a residual of shape {tuple(r.shape)} but got "
                f"a tensor of shape {tuple(x.shape)}; use a distinct key per tensor"
            )
        return x + r.to(x.device)

    def residual(self, key: Hashable, like: torch.Tensor) -> torch.Tensor:
        """The stored residual of ``key`` (zeros the first time), for in-place updates.

        Flat, in `residual_dtype` of ``like``, on ``like``'s device; algorithms that
        compensate and feed back one piece at a time (no full-size copy) write into it.

        Raises:
            ConfigError: the stored residual for ``key`` has another number of elements.
        """
        dtype = residual_dtype(like.dtype)
        r = self._residuals.get(key)
        if r is None:
            r = torch.zeros(like.numel(), dtype=dtype, device=like.device)
            self._residuals[key] = r
        elif r.numel() != like.numel():
            raise ConfigError(
                f"error feedback key {key!r} holds a residual of shape {tuple(r.shape)} but got "
                f"a tensor of shape {tuple(like.shape)}; use a distinct key per tensor"
            )
        elif r.dtype != dtype or r.device != like.device or not r.is_contiguous():
            r = r.to(dtype=dtype, device=like.device).contiguous()
            self._residuals[key] = r
        return r.view(-1)

    def update(self, key: Hashable, compensated: torch.Tensor, decoded: torch.Tensor) -> None:
        """Store ``compensated - decoded`` as the residual of ``key``.

        Non-finite residuals (from NaN/Inf inputs) are stored as zeros so one bad step
        does not poison every later one; the NaN itself still reaches the output.
        """
        dtype = residual_dtype(compensated.dtype)
        r = compensated.to(dtype) - decoded.to(dtype)
        self._residuals[key] = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)

    def encode(self, tensor: torch.Tensor, key: Hashable) -> Packet:
        """Encode ``tensor + residual`` and keep the new residual; returns the packet.

        The packet decodes to ``tensor.dtype`` (the compensation is done in `residual_dtype`).
        """
        x = self.compensate(tensor, key)
        packet = self.codec.encode(x.to(tensor.dtype) if tensor.dtype != x.dtype else x)
        self.update(key, x, self.codec.decode(packet))
        return packet

    def reset(self, key: Hashable | None = None) -> None:
        """Forget the residual of ``key``, or of every key when None."""
        if key is None:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        """Residuals as CPU tensors plus the codec spec, for checkpoints."""
        return {
            "codec": self.codec.spec,
            "residuals": {k: v.detach().cpu().clone() for k, v in self._residuals.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output.

        Raises:
            CodecMismatchError: the state was saved with another codec.
            ConfigError: the state is malformed.
        """
        if not isinstance(state, dict) or "codec" not in state or "residuals" not in state:
            raise ConfigError("error feedback state must be a dict with 'codec' and 'residuals'")
        if state["codec"] != self.codec.spec:
            raise CodecMismatchError(
                f"error feedback state was saved with codec {state['codec']!r}, this one uses "
                f"{self.codec.spec!r}; residuals do not carry over between codecs (call reset())"
            )
        residuals = state["residuals"]
        if not isinstance(residuals, dict):
            raise ConfigError(
                f"error feedback state: 'residuals' must be a dict of key -> tensor, got "
                f"{type(residuals).__name__}"
            )
        for k, v in residuals.items():
            if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
                what = type(v).__name__ if not isinstance(v, torch.Tensor) else str(v.dtype)
                raise ConfigError(
                    f"error feedback state: residual {k!r} must be a floating tensor, got {what}"
                )
            if not bool(torch.isfinite(v).all()):
                raise ConfigError(
                    f"error feedback state: residual {k!r} holds NaN or Inf; a non-finite "
                    "residual would turn every later output of that key non-finite"
                )
        self._residuals = {
            k: v.detach().to(residual_dtype(v.dtype)).clone() for k, v in residuals.items()
        }


# ------------------------------------------------- the collectives' memory
_store_lock = threading.Lock()
_store: dict[Codec, ErrorFeedback] = {}


def error_feedback(codec: CodecLike) -> ErrorFeedback:
    """The error-feedback memory of the compressed collectives for ``codec`` (residuals per key).

    Use it to inspect residuals, or to checkpoint them with ``state_dict()``.
    """
    c = get_codec(codec)
    with _store_lock:
        ef = _store.get(c)
        if ef is None:
            ef = _store[c] = ErrorFeedback(c)
        return ef


def reset_error_feedback() -> None:
    """Forget every residual of the compressed collectives."""
    with _store_lock:
        _store.clear()


def call_site(depth: int = 2) -> str:
    """``"module:function+line"`` of the first caller outside commpress and torch.distributed.

    The module is the caller's ``__name__`` (for a script: its ``__spec__`` name under
    ``python -m``, else its file name without ``.py``) and the line is counted from the
    function's ``def``: the site survives a move of the checkout and edits elsewhere in
    the file, which absolute ``path:line`` did not.
    """
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "commpress" or name.startswith(("commpress.", "torch.distributed"))):
            code = frame.f_code
            if name == "__main__":
                spec = frame.f_globals.get("__spec__")
                name = (
                    getattr(spec, "name", None)
                    or os.path.splitext(os.path.basename(code.co_filename))[0]
                )
            qualname = getattr(code, "co_qualname", code.co_name)
            return f"{name}:{qualname}+{frame.f_lineno - code.co_firstlineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


#: Most tensors one call site may keep apart before `auto_key` asks for ``key=``.
MAX_SLOTS_PER_SITE = 1024
_slots_lock = threading.Lock()
# (op, group, shape, dtype, site) -> one weak reference per slot: the tensor that used it last
_site_slots: dict[tuple, list[Any]] = {}


def auto_key(op: str, group_key: str, t: torch.Tensor) -> tuple:
    """The error-feedback key of a call without ``key=``: site, shape, dtype and a slot.

    Tensors reduced at one call site (a loop over layers) get one slot each, in call
    order: a tensor (or the tensor it is a view of) that used a slot before keeps it;
    a new one takes the first slot whose previous tensor has been freed (last step's
    gradients, after ``zero_grad``), else a new slot. So ``for p in params:
    all_reduce(p.grad)`` keeps one residual per parameter, step after step, whether
    ``zero_grad`` frees the gradients or zeroes them in place. What this cannot tell
    apart: temporaries made and freed inside the loop (``all_reduce(torch.cat(...))``)
    share one slot -- pass ``key=`` there.

    Raises:
        ConfigError: one site kept more than 1024 tensors alive at once.
    """
    site = (op, group_key, tuple(t.shape), str(t.dtype), call_site())
    owner = t._base if t._base is not None else t
    with _slots_lock:
        slots = _site_slots.setdefault(site, [])
        free = None
        for i, ref in enumerate(slots):
            held = ref()
            if held is owner:
                return (*site, i)
            if held is None and free is None:
                free = i
        if free is None:
            if len(slots) >= MAX_SLOTS_PER_SITE:
                raise ConfigError(
                    f"{op} at {site[-1]}: error feedback keeps more than "
                    f"{MAX_SLOTS_PER_SITE} live tensors of shape {list(t.shape)} apart at "
                    "this call site; pass key= (e.g. the parameter name) to name each stream"
                )
            slots.append(None)
            free = len(slots) - 1
        slots[free] = weakref.ref(owner)
        return (*site, free)
