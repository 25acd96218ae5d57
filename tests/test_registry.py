"""The registry and the spec grammar."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import commpress
from commpress import registry
from commpress.codec import CODEC_CLASSES, Codec
from commpress.codecs.chain import Chain
from commpress.errors import ConfigError, UnknownCodecError
from commpress.registry import get_codec, list_codecs, parse_spec, register_codec


@pytest.fixture
def isolated_registry(monkeypatch):
    """The registry, with entry points not yet loaded; restored afterwards."""
    list_codecs()  # make sure the built-ins are in before copying
    saved = dict(CODEC_CLASSES)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield CODEC_CLASSES
    CODEC_CLASSES.clear()
    CODEC_CLASSES.update(saved)
    registry._from_spec.cache_clear()


@dataclass(frozen=True, repr=False)
class Halve(Codec):
    """A third-party style codec: keeps every other element (for tests only)."""

    codec_id: ClassVar[str] = "test_halve"
    keep: int = 2
    scale: float = 1.0
    exact: bool = False

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ConfigError(f"test_halve: keep={self.keep} is not allowed; expected keep >= 1")

    def _encode(self, x):
        return (x[:: self.keep] * self.scale,)

    def _decode(self, payload, numel, dtype):
        out = torch.zeros(numel, dtype=dtype)
        out[:: self.keep] = payload[0] / self.scale
        return out


class FakeEntryPoint:
    def __init__(self, name: str, target: object) -> None:
        self.name = name
        self._target = target

    def load(self) -> object:
        return self._target


# ------------------------------------------------------------------ grammar
@pytest.mark.parametrize(
    "spec, stages",
    [
        ("int8", [("int8", {})]),
        ("int8:block=128", [("int8", {"block": "128"})]),
        ("int8:block=128,stochastic=1", [("int8", {"block": "128", "stochastic": "1"})]),
        ("int8:block=128+zstd:level=3", [("int8", {"block": "128"}), ("zstd", {"level": "3"})]),
        ("a+b+c", [("a", {}), ("b", {}), ("c", {})]),
    ],
)
def test_parse_spec(spec, stages):
    assert parse_spec(spec) == stages


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("int8:", "':' must be followed"),
        ("int8:block", "key=value"),
        ("int8:=3", "key=value"),
        ("int8:block=", "key=value"),
        ("int8:block=1,,", "key=value"),
        ("int8:block=1,block=2", "given twice"),
        ("+", "empty stage"),
        ("zstd+", "empty stage"),
        ("+zstd", "empty stage"),
        ("", "non-empty"),
        ("   ", "non-empty"),
        ("bf16 + zstd:level=7", "whitespace"),
    ],
)
def test_bad_spec_grammar(spec, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        get_codec(spec)
    assert repr(spec.strip()) in str(info.value) or not spec.strip()


@pytest.mark.parametrize("bad", [None, 3, 1.5, ["zstd"], b"zstd"])
def test_spec_of_the_wrong_type(bad):
    with pytest.raises(ConfigError, match="spec string"):
        get_codec(bad)


def test_bad_value_names_key_and_type():
    with pytest.raises(ConfigError, match=r"level='x' is not a valid int"):
        get_codec("zstd:level=x")
    with pytest.raises(ConfigError, match="block='x'"):
        get_codec("int8:block=x")


def test_unknown_parameter_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as info:
        get_codec("zstd:levle=3")
    message = str(info.value)
    assert "levle" in message and "level" in message and "shuffle" in message
    with pytest.raises(ConfigError, match="allowed: none"):
        get_codec("none:x=1")


def test_unknown_codec_lists_every_registered_name():
    with pytest.raises(UnknownCodecError) as info:
        get_codec("nosuchcodec:level=3")
    message = str(info.value)
    assert "'nosuchcodec'" in message
    for name in list_codecs():
        assert name in message
    assert not message.startswith('"')  # not KeyError's quoting
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigError)
    with pytest.raises(UnknownCodecError):
        get_codec("zstd+nosuchcodec")
    with pytest.raises(UnknownCodecError):
        get_codec({"id": "nosuchcodec"})


@pytest.mark.parametrize(
    "raw, value", [("1", True), ("true", True), ("0", False), ("false", False)]
)
def test_bool_values(raw, value):
    assert get_codec(f"zstd:shuffle={raw}").shuffle is value


@pytest.mark.parametrize("raw", ["Yes", "off", "yes", "on", "True", "2"])
def test_bool_values_outside_the_grammar_are_refused(raw):
    with pytest.raises(
        ConfigError, match=rf"shuffle='{raw}' is not a valid bool.*0, 1, true, false"
    ):
        get_codec(f"zstd:shuffle={raw}")


def test_canonical_spec_leaves_defaults_out():
    assert get_codec("zstd:level=3,shuffle=1").spec == "zstd"
    assert get_codec("zstd:level=7").spec == "zstd:level=7"
    assert str(get_codec("zstd:level=7")) == "zstd:level=7"
    assert repr(get_codec("zstd:level=7")) == "Codec('zstd:level=7')"
    assert get_codec("bf16+zstd:level=7").spec == "bf16+zstd:level=7"


# ------------------------------------------------------------------ configs
def _all_codecs() -> list[Codec]:
    codecs = []
    for name in list_codecs():
        codecs.append(get_codec(name))
    codecs += [get_codec("bf16+zstd:level=5"), get_codec("zstd+lz4")]
    return codecs


@pytest.mark.parametrize("codec", _all_codecs(), ids=str)
def test_config_dict_round_trip(codec):
    config = codec.config()
    assert config["id"] in (codec.codec_id, "chain")
    again = get_codec(json.loads(json.dumps(config)))
    assert again == codec and hash(again) == hash(codec)
    assert again.config_hash == codec.config_hash
    assert get_codec(codec.spec) == codec
    assert Codec.from_config(config) == codec
    assert get_codec(codec) is codec


def test_chain_config_and_flattening():
    chain = get_codec("bf16+zstd+lz4")
    assert isinstance(chain, Chain)
    assert [s.spec for s in chain.stages] == ["bf16", "zstd", "lz4"]
    nested = Chain((get_codec("bf16"), Chain((get_codec("zstd"), get_codec("lz4")))))
    assert nested == chain
    assert chain.config() == {
        "id": "chain",
        "stages": [
            {"id": "bf16"},
            {"id": "zstd", "level": 3, "shuffle": True},
            {"id": "lz4", "acceleration": 1, "shuffle": True},
        ],
    }


@pytest.mark.parametrize(
    "config",
    [
        {"level": 3},
        {"id": 3},
        {"id": "chain"},
        {"id": "chain", "stages": "zstd"},
        {"id": "chain", "stages": [{"id": "zstd"}], "extra": 1},
        {"id": "chain", "stages": [{"id": "zstd"}]},
        {"id": "zstd", "nope": 1},
    ],
)
def test_bad_config_dicts(config):
    with pytest.raises(ConfigError):
        get_codec(config)


def test_lossy_stage_after_the_first_is_refused():
    with pytest.raises(ConfigError, match="only the first stage"):
        get_codec("zstd+bf16")


def test_different_params_are_different_codecs():
    a, b = get_codec("zstd:level=3"), get_codec("zstd:level=4")
    assert a != b and a.config_hash != b.config_hash
    assert get_codec("zstd") != get_codec("lz4")


# ------------------------------------------------------------------ registration
def test_register_codec_rejects_bad_ids(isolated_registry):
    for bad in ("", "a:b", "a+b", "a,b", "a=b", "a b"):
        cls = type("Bad", (Halve,), {"codec_id": bad})
        with pytest.raises(ConfigError, match="codec id"):
            register_codec(cls)


def test_register_codec_refuses_a_taken_id(isolated_registry):
    impostor = type("Impostor", (Halve,), {"codec_id": "zstd"})
    with pytest.raises(ConfigError, match="already registered"):
        register_codec(impostor)
    assert register_codec(Halve) is Halve
    assert register_codec(Halve) is Halve  # the same class again is fine


def test_registered_test_codec_works_everywhere(isolated_registry):
    register_codec(Halve)
    assert "test_halve" in list_codecs()
    codec = get_codec("test_halve:keep=3,scale=0.5,exact=true")
    assert codec == Halve(keep=3, scale=0.5, exact=True)
    assert codec.spec == "test_halve:keep=3,scale=0.5,exact=1"
    x = torch.arange(9, dtype=torch.float32)
    y = codec.decode(commpress.wire.unpack(commpress.wire.pack(codec.encode(x)), codec))
    assert torch.equal(y[::3], x[::3]) and torch.all(y[1::3] == 0)
    assert type(get_codec("test_halve")) is Halve
    with pytest.raises(ConfigError, match="keep=0"):
        get_codec("test_halve:keep=0")


def test_entry_point_codec_is_loaded_once(isolated_registry, monkeypatch):
    calls = []

    def entry_points(group):
        calls.append(group)
        return [FakeEntryPoint("halve", Halve)]

    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)
    assert "test_halve" not in isolated_registry
    assert get_codec("test_halve:keep=4") == Halve(keep=4)
    assert "test_halve" in list_codecs()
    assert get_codec("bf16+zstd").spec == "bf16+zstd"
    assert calls == [registry.ENTRY_POINT_GROUP]


def test_entry_point_that_is_not_a_codec(isolated_registry, monkeypatch):
    monkeypatch.setattr(
        registry.metadata, "entry_points", lambda group: [FakeEntryPoint("junk", len)]
    )
    with pytest.raises(ConfigError, match="junk"):
        list_codecs()


def test_a_lossy_codec_without_a_declared_bound_is_refused_clearly():
    @dataclass(frozen=True, repr=False)
    class NoBound(Codec):
        codec_id: ClassVar[str] = "test_nobound"

        def _encode(self, x):
            return (x,)

        def _decode(self, payload, numel, dtype):
            return payload[0]

    with pytest.raises(TypeError, match="declares no error_bound"):
        NoBound().error_bound(torch.ones(3))


# ------------------------------------------------------------------ declared capabilities
@pytest.mark.parametrize("name", ["sign", "topk", "randomk", "powersgd"])
def test_biased_codecs_declare_error_feedback(name):
    assert get_codec(name).wants_error_feedback


@pytest.mark.parametrize("codec", _all_codecs(), ids=str)
def test_fixed_size_matches_encoded_nbytes(codec):
    for dtype in (torch.float32, torch.bfloat16, torch.int32):
        if codec.supports(dtype):
            assert (codec.encoded_nbytes(4096, dtype) is not None) == codec.fixed_size


def test_from_config_needs_no_registry_call():
    assert Codec.from_config({"id": "int8", "block": 64}) == get_codec("int8:block=64")
    assert Codec.from_config({"id": "chain", "stages": [{"id": "bf16"}, {"id": "zstd"}]}) == (
        get_codec("bf16+zstd")
    )
    with pytest.raises(UnknownCodecError, match="registered codecs"):
        Codec.from_config({"id": "nope"})
    with pytest.raises(ConfigError, match="not a 'zstd' config"):
        type(get_codec("zstd")).from_config({"id": "lz4"})
