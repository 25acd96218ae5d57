"""The `Algorithm` protocol and the one table of algorithms.

An algorithm is a small class that declares what it is and what it can do,
like a codec does:

- ``name`` (what ``Policy(algorithm=...)`` and `commpress.policy.Decision`
  say) and ``code`` (its word in the collective descriptor, so ranks that run
  different algorithms find out before any payload moves);
- ``families``: the op families it runs (`commpress.ops`);
- ``auto_order``: its place in the default choice among the algorithms that
  `eligible` admits (lower first), or None for one that runs only when asked
  for (``Policy(algorithm=...)``, or -- ``by_codec`` -- a codec that names it,
  like PowerSGD);
- `eligible`: whether it can run a call (codec capabilities, reduce op,
  size), and `fits`: whether the default choice should take it;
- `cost`: modelled seconds of one call from link figures and codec speeds
  (`Link`, `CodecSpeed`); the formulas are in ``docs/algorithms.md``;
- the work itself: ``all_reduce(comm, flat, op, out=None)`` and
  ``reduce(comm, flat, op, root)`` for reductions; ``stages`` when the
  chunked driver (`commpress.algorithms.chunked`) may pipeline its chunks;
  ``reduce_scatter`` / ``all_gather`` where it runs those families its own
  way (None: the faces run the flat ones, `two_phase` / `transport`).

Registering is one decorator; the ``algorithms`` package imports each
algorithm's module once (one line per algorithm), and everything else finds
them here::

    @register_algorithm
    class Direct(Algorithm):
        name = "direct"
        code = 1
        auto_order = 0

        def cost(self, nbytes, world, link, speed): ...  # the model of this algorithm

        all_reduce = staticmethod(all_reduce)             # the module's functions
        reduce = staticmethod(reduce)

`get_algorithm` raises `ConfigError` for a name that is not registered,
listing those that are.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..codec import Codec
    from .comm import Comm

__all__ = [
    "Algorithm",
    "Link",
    "CodecSpeed",
    "Stage",
    "register_algorithm",
    "get_algorithm",
    "algorithms",
    "algorithm_names",
    "algorithm_name",
    "default_order",
]

#: One stage of a chunk's pipeline: ``(lag, fn)``; see `commpress.algorithms.chunked`.
Stage = tuple[int, Callable[[int, Any], Any]]


@dataclass(frozen=True)
class Link:
    """Figures of the link a call crosses, per rank.

    Attributes:
        latency_s: seconds of one small message (alpha).
        bandwidth_Bps: payload bytes per second one rank can send (1/beta).
        local: ranks per host that share a faster link (1: every rank on its own host).
        intra_latency_s: alpha of the link inside a host.
        intra_bandwidth_Bps: bytes per second inside a host.
        knee_bytes: message size up to which ``small_bandwidth_Bps`` holds instead of
            ``bandwidth_Bps`` (0: one bandwidth for every size). Calibration measures a
            middle size, where a message's time is not yet its bytes at the link's rate:
            a NIC's or a token bucket's burst, the backend's small-message protocol.
        small_bandwidth_Bps: bytes per second of messages up to ``knee_bytes``.
        large_knee_bytes: message size beyond which ``bandwidth_Bps`` holds, with
            ``mid_bandwidth_Bps`` from ``knee_bytes`` to it (0: ``bandwidth_Bps`` from
            ``knee_bytes`` on). Calibration's fourth size on a fast link: on gloo and
            loopback an all-gather of 16 MiB a rank took 10x the time of 4 MiB.
        mid_bandwidth_Bps: bytes per second between the two knees.
    """

    latency_s: float
    bandwidth_Bps: float
    local: int = 1
    intra_latency_s: float = 5e-6
    intra_bandwidth_Bps: float = math.inf
    knee_bytes: float = 0.0
    small_bandwidth_Bps: float = math.inf
    large_knee_bytes: float = 0.0
    mid_bandwidth_Bps: float = math.inf

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        """``messages`` latencies plus ``nbytes`` in messages of equal size: each one's
        bytes up to ``knee_bytes`` at ``small_bandwidth_Bps``, up to ``large_knee_bytes``
        at ``mid_bandwidth_Bps``, the rest at ``bandwidth_Bps`` (a line through the
        calibrated sizes, bent at each one between the first and the last)."""
        if self.knee_bytes <= 0 or messages <= 0:
            return messages * self.latency_s + nbytes / self.bandwidth_Bps
        small = min(nbytes, messages * self.knee_bytes)
        rest = nbytes - small
        seconds = messages * self.latency_s + small / self.small_bandwidth_Bps
        if self.large_knee_bytes > self.knee_bytes:
            mid = min(rest, messages * (self.large_knee_bytes - self.knee_bytes))
            seconds += mid / self.mid_bandwidth_Bps
            rest -= mid
        return seconds + rest / self.bandwidth_Bps


@dataclass(frozen=True)
class CodecSpeed:
    """How fast a codec runs on this device, and how much it saves.

    Attributes:
        encode_Bps: input bytes encoded per second.
        decode_Bps: output bytes decoded per second.
        ratio: input bytes per wire byte.
    """

    encode_Bps: float
    decode_Bps: float
    ratio: float

    @classmethod
    def plain(cls) -> CodecSpeed:
        """No codec: nothing to encode or decode, every byte on the wire."""
        return cls(math.inf, math.inf, 1.0)


class Algorithm(abc.ABC):
    """Base class of the compressed collective algorithms; see the module docstring.

    `cost` is abstract: every algorithm states its model. `all_reduce` / `reduce`
    are bound by the reduction algorithms; one that runs only moving ops
    (``transport``) keeps these defaults, which refuse with the ops it does run.
    """

    name: ClassVar[str]
    code: ClassVar[int]
    families: ClassVar[frozenset[str]] = frozenset({"all_reduce", "reduce"})
    auto_order: ClassVar[int | None] = None
    #: Chosen only by a codec that names it (``Codec.algorithm``, e.g. PowerSGD), never
    #: by ``Policy(algorithm=...)``; calls with such a codec keep error feedback on.
    by_codec: ClassVar[bool] = False
    #: ``all_reduce(out=flat)`` is safe: every chunk of ``flat`` is encoded before its
    #: part of the result is written, so no full-size temporary is needed.
    in_place: ClassVar[bool] = False
    #: Works on the 1-D view of the tensor, so the chunked driver may cut it; False for
    #: an algorithm that needs the tensor's shape (PowerSGD: its matrix view).
    flat: ClassVar[bool] = True
    #: ``reduce_scatter(comm, flat, bounds, op) -> this rank's block`` (AVG not applied)
    #: and ``all_gather(comm, tensor, outputs)``, bound by an algorithm that runs those
    #: families itself (``hierarchical``); None: `two_phase`'s / `transport`'s.
    reduce_scatter: ClassVar[Callable[..., torch.Tensor] | None] = None
    all_gather: ClassVar[Callable[..., None] | None] = None

    def eligible(self, codec: Codec, sum_like: bool) -> str | None:
        """None if this algorithm can reduce with ``codec``, else why not (for errors)."""
        return None

    def fits(self, codec: Codec, nbytes: int, world: int, policy: Any) -> bool:
        """Whether the default choice takes this algorithm for a call of this size.

        ``policy`` is the call's `commpress.policy.Policy` (typed loosely: the policy
        layer sits above this one and imports it).
        """
        return True

    @abc.abstractmethod
    def cost(
        self, nbytes: int, world: int, link: Link, speed: CodecSpeed, family: str = "all_reduce"
    ) -> float:
        """Modelled seconds of one call of ``nbytes`` per rank over ``world`` ranks.

        ``family``: the op family of the call (`commpress.ops`); an algorithm that runs
        several models each (``two_phase``'s reduce-scatter is its first round alone).
        """

    # The work: algorithms bind their module's functions here (``staticmethod``).
    def all_reduce(
        self,
        comm: Comm,
        flat: torch.Tensor,
        op: Any,
        prepared: Any = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reduce the 1-D ``flat``; the result in the accumulation dtype, on every rank.

        ``prepared``: `prepare`'s output when the encode already ran (chunks prepared
        ahead); ``out``: where to write the result (may be ``flat`` if `in_place`).
        """
        raise self._not_run("all_reduce")

    def reduce(
        self, comm: Comm, flat: torch.Tensor, op: Any, root: int, prepared: Any = None
    ) -> torch.Tensor | None:
        """Reduce the 1-D ``flat`` into group rank ``root`` (None on the others)."""
        raise self._not_run("reduce")

    def prepare(self, comm: Comm, flat: torch.Tensor) -> Any:
        """The local work of `all_reduce` (the encode), run ahead by the chunked driver."""
        return None

    def stages(
        self,
        comms: Sequence[Comm],
        flat: torch.Tensor,
        op: Any,
        bounds: Sequence[tuple[int, int]],
        out: torch.Tensor,
    ) -> list[Stage] | None:
        """The chunk pipeline of a chunked all-reduce on CPU, or None to prepare ahead.

        The stages post transfers asynchronously and must do so in the same order on
        every rank, so every size they move must be known without another exchange
        (`two_phase` and `direct` offer stages for fixed-size codecs only).
        ``comms[0]`` runs the call's one descriptor exchange, before the first stage.
        """
        return None

    def _not_run(self, op: str) -> ConfigError:
        return ConfigError(
            f"algorithm {self.name!r} does not run {op}; it runs "
            f"{', '.join(sorted(self.families))} (choose another with Policy(algorithm=...))"
        )

    def __repr__(self) -> str:
        return f"<algorithm {self.name}>"


_A = TypeVar("_A", bound=type[Algorithm])
_TABLE: dict[str, Algorithm] = {}


def register_algorithm(cls: _A) -> _A:
    """Class decorator: add one instance of ``cls`` to the table under ``cls.name``.

    Raises:
        ConfigError: the name or the wire code is taken by another algorithm.
    """
    for other in _TABLE.values():
        if other.name == cls.name or other.code == cls.code:
            raise ConfigError(
                f"algorithm {cls.__name__} (name {cls.name!r}, code {cls.code}) clashes with "
                f"{type(other).__name__} (name {other.name!r}, code {other.code})"
            )
    _TABLE[cls.name] = cls()
    return cls


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm called ``name``.

    Raises:
        ConfigError: no algorithm has that name (the message lists those that do).
    """
    try:
        return _TABLE[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; expected one of {sorted(_TABLE)}") from None


def algorithm_name(code: int) -> str:
    """The name of the algorithm with wire ``code`` (for messages; the code itself if none)."""
    for a in _TABLE.values():
        if a.code == code:
            return a.name
    return str(code)


def algorithms(family: str | None = None) -> list[Algorithm]:
    """The registered algorithms (that run ``family``), in registration order."""
    return [a for a in _TABLE.values() if family is None or family in a.families]


def default_order(family: str) -> list[Algorithm]:
    """The algorithms the default choice weighs for ``family``, in ``auto_order``."""
    ordered = (a for a in algorithms(family) if a.auto_order is not None)
    return sorted(ordered, key=lambda a: a.auto_order)


def algorithm_names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_TABLE)
