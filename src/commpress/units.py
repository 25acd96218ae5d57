"""Byte sizes, booleans and seconds as people type them: one parser (and formatter) each.

Size grammar (case-insensitive, spaces allowed around the parts)::

    size   := number [unit ["B" | "iB"] | "B"]
    number := digits ["." digits]              (no sign, no exponent)
    unit   := "K" | "M" | "G" | "T"            (powers of 1024)

so ``4096``, ``7B``, ``64K``, ``64KB``, ``64KiB``, ``1.5M`` and ``1G`` all
parse; ``K``, ``KB`` and ``KiB`` all mean 1024 bytes. The size must come to a
whole number of bytes (``0.5K`` is 512; ``0.3K`` is refused).

Boolean grammar: ``1/true/yes/on`` and ``0/false/no/off``, case-insensitive.

Seconds in an environment variable (`env_seconds`): a number >= 0, e.g. ``60``
or ``0.5``; unset or empty gives the caller's default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from .errors import ConfigError

__all__ = ["parse_size", "format_size", "parse_bool", "env_seconds"]

_SCALES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_GRAMMAR = (
    "a number without sign or exponent, an optional unit K, M, G or T (powers of 1024) "
    "and an optional B (iB after a unit), e.g. 4096, 7B, 64K, 64KiB, 1.5M, 1G"
)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])\s*(I?B)?|(B)?)\s*$", re.I)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_size(text: str, *, minimum: int = 0) -> int:
    """Bytes in ``text``, e.g. ``"64K"`` -> 65536, ``"1.5MiB"`` -> 1572864.

    Args:
        text: a size in the grammar of the module docstring.
        minimum: the smallest size the caller accepts.

    Raises:
        ValueError: ``text`` is not in the grammar, not a whole number of bytes, or
            under ``minimum`` (the message names the text and the grammar).
    """
    match = _SIZE_RE.match(str(text))
    if match is None:
        raise ValueError(f"size {text!r} is not understood; expected {_GRAMMAR}")
    number, unit = match.group(1), (match.group(2) or "").lower()
    value = float(number) * _SCALES[unit]
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes; expected {_GRAMMAR}")
    if value < minimum:
        raise ValueError(f"size {text!r} is too small; expected at least {minimum} bytes")
    return int(value)


def format_size(nbytes: int, *, exact: bool = False) -> str:
    """A byte count for people: ``65536`` -> ``"64 KiB"``, ``3 << 19`` -> ``"1.5 MiB"``.

    Args:
        nbytes: the count.
        exact: instead, the shortest spelling that `parse_size` reads back to exactly
            ``nbytes`` (``8192`` -> ``"8K"``, ``1536 << 10`` -> ``"1536K"``,
            ``7`` -> ``"7B"``), for labels that must round-trip.
    """
    units = (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))
    if exact:
        for unit, scale in units:
            if nbytes and nbytes % scale == 0:
                return f"{nbytes // scale}{unit}"
        return f"{nbytes}B"
    for unit, scale in units:
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit}iB"
    return f"{nbytes} B"


def parse_bool(text: str) -> bool:
    """``"1"``, ``"true"``, ``"yes"``, ``"on"`` -> True; ``"0"``, ``"false"``, ``"no"``,
    ``"off"`` -> False (case-insensitive, spaces ignored).

    Raises:
        ValueError: anything else (the message names the text and what is accepted).
    """
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean; expected 1/0, true/false, yes/no or on/off")


def env_seconds(
    name: str, default: float, zero: str, environ: Mapping[str, str] | None = None
) -> float:
    """Seconds from environment variable ``name`` (``default`` when unset or empty).

    Args:
        name: the variable.
        default: its value when unset.
        zero: what 0 means, for the error message (e.g. "0 turns the check off").
        environ: the environment to read (default: ``os.environ``).

    Raises:
        ConfigError: the value is not a number >= 0 (the message names the variable).
    """
    env = os.environ if environ is None else environ
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not valid: expected seconds >= 0 ({zero})"
        )
    return value
