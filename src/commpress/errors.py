"""The commpress error hierarchy.

Every error commpress raises on purpose derives from `CommpressError`, so a
caller can catch the whole family with one clause. Errors about a bad
configuration value also derive from `ValueError`, errors about a dtype from
`TypeError`, so code written against plain Python conventions keeps working.
"""

from __future__ import annotations

__all__ = [
    "CommpressError",
    "ConfigError",
    "UnknownCodecError",
    "UnsupportedDtypeError",
    "UnsupportedDeviceError",
    "WireError",
    "CodecMismatchError",
    "CollectiveError",
]


class CommpressError(Exception):
    """Root of every error commpress raises on purpose."""


class ConfigError(CommpressError, ValueError):
    """A codec, policy or engine parameter is out of range or malformed."""


class UnknownCodecError(ConfigError, KeyError):
    """A spec names a codec that is not registered.

    The message lists the names that are registered.
    """

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedDtypeError(CommpressError, TypeError):
    """A codec was given a tensor dtype it cannot encode (e.g. int32 to int8)."""


class UnsupportedDeviceError(CommpressError):
    """A codec or engine was given a tensor on a device it cannot run on."""


class WireError(CommpressError, ValueError):
    """A wire buffer is truncated, corrupted, hostile or not a commpress buffer."""


class CodecMismatchError(CommpressError):
    """Two sides of a transfer used different codec configurations.

    The message names both specs (and the ranks where they are known).
    """


class CollectiveError(CommpressError, RuntimeError):
    """A compressed collective failed: bad arguments, a peer that died or timed out."""
