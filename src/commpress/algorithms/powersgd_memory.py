"""The memory of the PowerSGD all-reduce: warm-start ``Q`` and residuals, per key.

`PowerSGDMemory` is one stream of calls' state (what `commpress.algorithms.powersgd`
reads and updates); `memory` is the process-wide store the compressed collectives
use, one memory per codec config, and `reset_memory` empties it. The store is
thread-safe: async calls reach it from the engine's worker threads and, in DDP,
from the backend's completion callbacks.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import torch

from ..codec import Codec
from ..codecs.powersgd import PowerSGD
from ..errors import CodecMismatchError, ConfigError
from ..registry import CodecLike, get_codec

__all__ = ["PowerSGDMemory", "memory", "reset_memory"]

_STATE_VERSION = 1


class PowerSGDMemory:
    """Per-key state of the PowerSGD all-reduce: warm-start ``Q`` and error-feedback residual.

    A memory is used with one codec config (the first one it sees); the residual
    and ``Q`` of one config mean nothing to another, so using it with another one
    raises until ``reset()``.

    Keys name a tensor that is "the same thing" from call to call (a parameter
    name, a DDP bucket index); their ``repr`` seeds the first ``Q``, so use keys
    whose ``repr`` is the same on every rank (strings, ints, tuples of them).

    Gradient accumulation: call ``all_reduce_many`` once per optimizer step, not
    per micro-batch; the residual is meant to be added once per communication.

    Checkpoints: ``state_dict()`` holds CPU copies. The residuals are per rank
    (each rank's own loss), so save and restore every rank's memory, not only
    rank 0's; ``Q`` is the same on every rank.

    Example::

        memory = PowerSGDMemory()
        for step in range(steps):
            grads = [p.grad for p in model.parameters()]
            all_reduce_many(grads, "powersgd:rank=4", average=True, memory=memory,
                            keys=[n for n, _ in model.named_parameters()])
    """

    def __init__(self) -> None:
        self.spec: str | None = None
        self._q: dict[Hashable, torch.Tensor] = {}
        self._residuals: dict[Hashable, torch.Tensor] = {}
        self._calls: dict[Hashable, int] = {}

    def __repr__(self) -> str:
        return f"PowerSGDMemory(spec={self.spec!r}, keys={len(self._calls)})"

    def __len__(self) -> int:
        return len(self._calls)

    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The float32 ``(m, n)`` residual of ``key``, or None (read-only use)."""
        return self._residuals.get(key)

    def reset(self, key: Hashable | None = None) -> None:
        """Forget ``key`` (residual, ``Q``, call count), or everything (and the codec) when None."""
        if key is None:
            self.spec = None
            self._q.clear()
            self._residuals.clear()
            self._calls.clear()
        else:
            for d in (self._q, self._residuals, self._calls):
                d.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of every key's ``Q`` and residual, the call counts and the codec spec."""
        return {
            "version": _STATE_VERSION,
            "codec": self.spec,
            "q": {k: v.detach().cpu().clone() for k, v in self._q.items()},
            "residuals": {k: v.detach().cpu().clone() for k, v in self._residuals.items()},
            "calls": dict(self._calls),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (tensors move to the right device on next use).

        Raises:
            ConfigError: ``state`` is not a PowerSGD memory state of this version.
        """
        keys = ("version", "codec", "q", "residuals", "calls")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ConfigError(f"PowerSGD memory state must be a dict with keys {list(keys)}")
        if state["version"] != _STATE_VERSION:
            raise ConfigError(
                f"PowerSGD memory state has version {state['version']!r}; this commpress "
                f"reads version {_STATE_VERSION}"
            )
        self.spec = state["codec"]
        self._q = {k: v.detach().float().clone() for k, v in state["q"].items()}
        self._residuals = {k: v.detach().float().clone() for k, v in state["residuals"].items()}
        self._calls = {k: int(v) for k, v in state["calls"].items()}

    def _bind(self, codec: PowerSGD) -> None:
        if self.spec is None:
            self.spec = codec.spec
        elif self.spec != codec.spec:
            raise CodecMismatchError(
                f"this PowerSGD memory holds state for {self.spec!r} but is used with "
                f"{codec.spec!r}; use one memory per codec config, or call memory.reset()"
            )


_store_lock = threading.Lock()
_store: dict[Codec, PowerSGDMemory] = {}


def memory(codec: CodecLike) -> PowerSGDMemory:
    """The `PowerSGDMemory` the compressed collectives use for ``codec``'s all-reduces.

    One per codec config, made on first use; the same object for equal configs.
    """
    c = get_codec(codec)
    with _store_lock:
        found = _store.get(c)
        if found is None:
            found = _store[c] = PowerSGDMemory()
        return found


def reset_memory() -> None:
    """Forget every PowerSGD state of the compressed collectives (every codec config)."""
    with _store_lock:
        _store.clear()
