"""One registry of codecs, and the spec-string grammar.

Grammar::

    spec   := stage ("+" stage)*
    stage  := name [":" param ("," param)*]
    param  := key "=" value

``"int8"``, ``"int8:block=128,stochastic=1"``, ``"int8:block=128+zstd:level=3"``.
A spec has no whitespace anywhere (``" int8"`` and ``"int8: block=128"`` raise
`ConfigError`): the canonical spec is compared byte for byte across ranks and
in wire headers, so a spelling with spaces is refused rather than guessed at.
Values are converted to the type of the codec's dataclass field (``int``,
``float``, ``bool`` from exactly ``1``/``0``/``true``/``false``, ``str``). A
``+`` chains codecs left to right (see `commpress.codecs.chain.Chain`).

A config dict ``{"id": "int8", "block": 128}`` (what ``Codec.config()``
returns) is accepted wherever a spec string is, and so is a `Codec`.

The table itself is `commpress.codec.CODEC_CLASSES` (so that
``Codec.from_config`` needs no registry); the built-in codecs, ``chain``
among them, register with `register_codec` when ``commpress`` is imported.
Third-party codecs register through the entry-point group
``commpress.codecs``: each entry point names a `Codec` subclass, which is
registered under its ``codec_id`` the first time the registry is consulted.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import TypeVar

from .codec import CODEC_CLASSES, Codec, codec_class
from .errors import ConfigError

__all__ = ["register_codec", "get_codec", "list_codecs", "parse_spec", "CodecLike"]

ENTRY_POINT_GROUP = "commpress.codecs"

_entry_points_loaded = False

C = TypeVar("C", bound=type[Codec])
CodecLike = str | dict | Codec


def register_codec(cls: C) -> C:
    """Class decorator: register a `Codec` subclass under its ``codec_id``.

    Raises:
        ConfigError: the id is empty, contains ``:,+=`` or is taken by another class.
    """
    name = cls.codec_id
    if not name or any(ch in name for ch in ":,+= "):
        raise ConfigError(f"codec id {name!r} is not allowed; use a non-empty name without ':,+= '")
    existing = CODEC_CLASSES.get(name)
    if existing is not None and existing is not cls:
        raise ConfigError(
            f"codec id {name!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    CODEC_CLASSES[name] = cls
    _from_spec.cache_clear()
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Codec)):
            raise ConfigError(
                f"entry point {ep.name!r} in group {ENTRY_POINT_GROUP!r} is {cls!r}, "
                "expected a commpress.Codec subclass"
            )
        register_codec(cls)


def list_codecs() -> list[str]:
    """Names of every registered codec a spec can name, sorted (``chain`` is spelled ``+``)."""
    _load_entry_points()
    return sorted(name for name, cls in CODEC_CLASSES.items() if not cls.composite)


def _lookup(name: str) -> type[Codec]:
    _load_entry_points()
    return codec_class(name)


def _stage(name: str, params: dict[str, str]) -> Codec:
    cls = _lookup(name)
    if cls.composite:
        raise ConfigError(f"codec {name!r} is spelled with '+' in a spec, e.g. 'int8+zstd'")
    return cls.from_params(params)


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split a spec string into ``[(name, {key: raw_value}), ...]`` stages.

    Raises:
        ConfigError: the string is empty, contains whitespace or is malformed (names the
            bad part).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"codec spec must be a non-empty string, got {spec!r}")
    if any(ch.isspace() for ch in spec):
        raise ConfigError(
            f"codec spec {spec!r} contains whitespace, which a spec may not; "
            f"write it without: {''.join(spec.split())!r}"
        )
    stages = []
    for stage in spec.split("+"):
        if not stage:
            raise ConfigError(f"codec spec {spec!r} has an empty stage around '+'")
        name, _, rest = stage.partition(":")
        params: dict[str, str] = {}
        if rest:
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                if not eq or not key or not value:
                    raise ConfigError(
                        f"codec spec {spec!r}: parameter {item!r} is not of the form key=value"
                    )
                if key in params:
                    raise ConfigError(f"codec spec {spec!r}: parameter {key!r} given twice")
                params[key] = value
        elif stage.endswith(":"):
            raise ConfigError(f"codec spec {spec!r}: ':' must be followed by key=value parameters")
        stages.append((name, params))
    return stages


def get_codec(spec: CodecLike) -> Codec:
    """Resolve a spec string, a config dict or a `Codec` to a `Codec`.

    Example::

        >>> import commpress
        >>> commpress.get_codec("int8:block=128+zstd:level=3").spec
        'int8:block=128+zstd:level=3'

    Raises:
        UnknownCodecError: a name is not registered (the message lists the known ones).
        ConfigError: the spec is malformed or a parameter is out of range.
    """
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, dict):
        _load_entry_points()
        return Codec.from_config(spec)
    if not isinstance(spec, str):
        raise ConfigError(
            f"codec must be a spec string, a config dict or a Codec, got {type(spec).__name__}"
        )
    return _from_spec(spec)


@functools.lru_cache(maxsize=1024)
def _from_spec(spec: str) -> Codec:
    # Codecs are immutable, so one instance per spec string can be shared; the wire and
    # the collectives resolve specs on every call.
    codecs = [_stage(name, params) for name, params in parse_spec(spec)]
    # "+" is how a spec string spells the registered "chain" codec.
    return codecs[0] if len(codecs) == 1 else _lookup("chain")(tuple(codecs))
