"""One registry of codecs, and the spec-string grammar.

Grammar::

    spec   := stage ("+" stage)*
    stage  := name [":" param ("," param)*]
    param  := key "=" value

``"int8"``, ``"int8:block=128,stochastic=1"``, ``"int8:block=128+zstd:level=3"``.
Values are converted to the type of the codec's dataclass field (``int``,
``float``, ``bool`` from ``1/0/true/false``, ``str``). A ``+`` chains codecs
left to right (see `commpress.codecs.chain.Chain`).

A config dict ``{"id": "int8", "block": 128}`` (what ``Codec.config()``
returns) is accepted wherever a spec string is, and so is a `Codec`.

Third-party codecs register through the entry-point group
``commpress.codecs``: each entry point names a `Codec` subclass, which is
registered under its ``codec_id`` the first time the registry is consulted.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

from .codec import Codec
from .errors import ConfigError, UnknownCodecError

__all__ = ["register_codec", "get_codec", "list_codecs", "parse_spec", "CodecLike"]

ENTRY_POINT_GROUP = "commpress.codecs"

_REGISTRY: dict[str, type[Codec]] = {}
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
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ConfigError(
            f"codec id {name!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[name] = cls
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


def _ensure_builtins() -> None:
    from . import codecs  # noqa: F401  (registers the built-in codecs on import)

    _load_entry_points()


def list_codecs() -> list[str]:
    """Names of every registered codec, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def _lookup(name: str) -> type[Codec]:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown codec {name!r}; registered codecs: {', '.join(sorted(_REGISTRY))}"
        ) from None


def _convert(codec_id: str, key: str, raw: Any, typ: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
    except ValueError:
        kind = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{codec_id}: {key}={raw!r} is not a valid {kind}") from None
    return raw


def _build(name: str, params: dict[str, Any]) -> Codec:
    cls = _lookup(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{name}: unknown parameter(s) {unknown}; allowed: {allowed}")
    kwargs = {k: _convert(name, k, v, hints.get(k)) for k, v in params.items()}
    return cls(**kwargs)


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split a spec string into ``[(name, {key: raw_value}), ...]`` stages.

    Raises:
        ConfigError: the string is empty or malformed (names the bad part).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"codec spec must be a non-empty string, got {spec!r}")
    stages = []
    for stage in spec.split("+"):
        stage = stage.strip()
        if not stage:
            raise ConfigError(f"codec spec {spec!r} has an empty stage around '+'")
        name, _, rest = stage.partition(":")
        name = name.strip()
        params: dict[str, str] = {}
        if rest.strip():
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                if not eq or not key.strip() or not value.strip():
                    raise ConfigError(
                        f"codec spec {spec!r}: parameter {item!r} is not of the form key=value"
                    )
                if key.strip() in params:
                    raise ConfigError(f"codec spec {spec!r}: parameter {key.strip()!r} given twice")
                params[key.strip()] = value.strip()
        elif rest or stage.endswith(":"):
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
        params = dict(spec)
        name = params.pop("id", None)
        if not isinstance(name, str):
            raise ConfigError(f"codec config {spec!r} has no string 'id'")
        if name == "chain":
            stages = params.pop("stages", None)
            if not isinstance(stages, list) or params:
                raise ConfigError(
                    f"chain config {spec!r} must be {{'id': 'chain', 'stages': [...]}}"
                )
            from .codecs.chain import Chain

            return Chain(tuple(get_codec(s) for s in stages))
        return _build(name, params)
    if not isinstance(spec, str):
        raise ConfigError(
            f"codec must be a spec string, a config dict or a Codec, got {type(spec).__name__}"
        )
    return _from_spec(spec)


@functools.lru_cache(maxsize=1024)
def _from_spec(spec: str) -> Codec:
    # Codecs are immutable, so one instance per spec string can be shared; the wire and
    # the collectives resolve specs on every call.
    stages = parse_spec(spec)
    codecs = [_build(name, params) for name, params in stages]
    if len(codecs) == 1:
        return codecs[0]
    from .codecs.chain import Chain

    return Chain(tuple(codecs))


def codec_factory(name: str) -> Callable[..., Codec]:
    """The registered class for ``name`` (for introspection and docs)."""
    return _lookup(name)
