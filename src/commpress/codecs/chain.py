"""Chains: ``"int8+zstd"`` applies ``int8``, then ``zstd`` to each of its payload sections.

A chain is a codec too. Its payload is one ``int64`` index section followed
by the sections of the last stage. The index records, for every stage after
the first, how each input section was split: ``[dtype code, numel, number
of output sections]`` per input section, so decoding can walk the stages
backwards without any other information.

Capabilities follow from the stages: a chain is lossless when every stage
is, is never summable, takes the dtypes its first stage takes, wants error
feedback (and pre-scaling) when its first stage does, and its size is
data-dependent (``fixed_size`` is False, ``encoded_nbytes`` None). It is
registered as ``"chain"`` like any codec, but ``composite``: spec strings
spell it with ``+`` rather than by name. Its error bound is the first
lossy stage's bound (later stages must be lossless, which is checked,
because a bound for lossy-after-lossy would depend on the intermediate
encoding, and no useful chain needs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..codec import CODE_DTYPES, DTYPE_CODES, Codec
from ..errors import ConfigError, UnsupportedDtypeError, WireError
from ..registry import register_codec

__all__ = ["Chain"]


@register_codec
@dataclass(frozen=True, repr=False)
class Chain(Codec):
    """Codecs applied left to right. Build with ``get_codec("a+b")`` or ``Chain((a, b))``.

    Args:
        stages: two or more codecs; every stage after the first must be lossless.
    """

    codec_id: ClassVar[str] = "chain"
    composite: ClassVar[bool] = True
    stages: tuple[Codec, ...] = ()

    def __post_init__(self) -> None:
        if len(self.stages) < 2 or not all(isinstance(s, Codec) for s in self.stages):
            raise ConfigError(f"a chain needs two or more Codec stages, got {self.stages!r}")
        flat: list[Codec] = []
        for s in self.stages:
            flat.extend(s.stages if isinstance(s, Chain) else (s,))
        object.__setattr__(self, "stages", tuple(flat))
        for s in self.stages[1:]:
            if not s.lossless:
                raise ConfigError(
                    f"chain {self.spec!r}: stage {s.spec!r} is lossy; only the first stage of a "
                    "chain may be lossy (e.g. 'int8+zstd')"
                )

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Codec:
        """Build from ``{"stages": [stage config or Codec, ...]}`` (``config()`` without id).

        Raises:
            ConfigError: ``stages`` is missing or not a list, or other keys are present.
        """
        rest = dict(params)
        stages = rest.pop("stages", None)
        if not isinstance(stages, list) or rest:
            raise ConfigError(
                f"chain config {{'id': 'chain', **{params!r}}} must be "
                "{'id': 'chain', 'stages': [...]}"
            )
        return cls(tuple(s if isinstance(s, Codec) else Codec.from_config(s) for s in stages))

    @property
    def lossless(self) -> bool:  # type: ignore[override]
        return all(s.lossless for s in self.stages)

    @property
    def wants_error_feedback(self) -> bool:  # type: ignore[override]
        return self.stages[0].wants_error_feedback

    @property
    def prescale(self) -> bool:  # type: ignore[override]
        return self.stages[0].prescale

    @property
    def devices(self) -> tuple[str, ...] | None:  # type: ignore[override]
        allowed: set[str] | None = None
        for s in self.stages:
            if s.devices is not None:
                allowed = set(s.devices) if allowed is None else allowed & set(s.devices)
        return None if allowed is None else tuple(sorted(allowed))

    def config(self) -> dict[str, Any]:
        return {"id": "chain", "stages": [s.config() for s in self.stages]}

    @property
    def spec(self) -> str:
        return "+".join(s.spec for s in self.stages)

    def supports(self, dtype: torch.dtype) -> bool:
        return self.stages[0].supports(dtype)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages[0].error_bound(x)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sections = list(self.stages[0]._encode(x))
        index: list[int] = []
        for stage in self.stages[1:]:
            index.append(len(sections))
            out: list[torch.Tensor] = []
            for s in sections:
                if not stage.supports(s.dtype):
                    raise UnsupportedDtypeError(
                        f"chain {self.spec!r}: stage {stage.spec!r} cannot take the {s.dtype} "
                        "section produced by the stage before it"
                    )
                stage.check_tensor(s)
                sub = stage._encode(s)
                index += [DTYPE_CODES[s.dtype], s.numel(), len(sub)]
                out.extend(sub)
            sections = out
        idx = torch.tensor(index, dtype=torch.int64, device=x.device)
        return (idx, *sections)

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        if not payload or payload[0].dtype != torch.int64 or payload[0].dim() != 1:
            got = f"a {payload[0].dtype} section" if payload else "nothing"
            raise WireError(
                f"chain {self.spec!r}: packet must start with a 1-D int64 index section, got "
                f"{got}; the buffer is corrupted"
            )
        index = payload[0].tolist()
        sections = list(payload[1:])
        # Split the index into one table per stage (forward order), then undo backwards.
        tables = []
        pos = 0
        for _ in self.stages[1:]:
            if pos >= len(index):
                raise WireError(f"chain {self.spec!r}: index section is truncated")
            count = index[pos]
            rows = index[pos + 1 : pos + 1 + 3 * count]
            if count < 0 or len(rows) != 3 * count:
                raise WireError(f"chain {self.spec!r}: index section is corrupted")
            tables.append([rows[i : i + 3] for i in range(0, len(rows), 3)])
            pos += 1 + 3 * count
        for stage, table in zip(reversed(self.stages[1:]), reversed(tables), strict=True):
            if sum(r[2] for r in table) != len(sections) or any(
                r[2] < 0 or r[1] < 0 for r in table
            ):
                raise WireError(f"chain {self.spec!r}: index does not match the payload sections")
            restored = []
            start = 0
            for code, n, count in table:
                if code not in CODE_DTYPES:
                    raise WireError(f"chain {self.spec!r}: unknown dtype code {code} in index")
                sub = tuple(sections[start : start + count])
                start += count
                restored.append(stage._decode(sub, n, CODE_DTYPES[code]))
            sections = restored
        return self.stages[0]._decode(tuple(sections), numel, dtype)
