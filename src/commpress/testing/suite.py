"""Shared test classes for codecs, in the spirit of numcodecs' ``tests/common.py``.

A codec's test file subclasses one of them and declares what to test; pytest
then runs every shared check on it (the classes parametrize their own tests
through ``pytest_generate_tests``)::

    from commpress.testing.suite import LossyCodecTests


    class TestInt8(LossyCodecTests):
        name = "int8"
        specs = ("int8", "int8:stochastic=1")
        golden_specs = ("int8", "int8:block=16")
        payload_bytes = 1000 + 4 * 4  # 1000 float32 elements, default config
        bad_configs = (("int8:block=0", "block=0"),)

Golden bytes live beside the test file, in ``golden/<name>.json``; write them
once (and only again for an intended format change) with
``python tests/codecs/regen_golden.py``.
"""

from __future__ import annotations

import doctest
import json
import math
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..codec import FLOAT_DTYPES, Packet
from ..codecs.sparse import reset_draws
from ..errors import ConfigError, UnsupportedDtypeError, WireError
from ..registry import get_codec, list_codecs
from ..wire import pack, unpack
from .checks import (
    SHAPES,
    check_bad_input,
    check_config,
    check_golden,
    check_nonfinite,
    check_roundtrip,
    gaussian,
    heavy_tailed,
    random_bits,
    structured,
    zeros,
)

__all__ = [
    "CodecTests",
    "LossyCodecTests",
    "LosslessCodecTests",
    "golden_input",
    "check_known_example",
    "check_documented_nonfinite",
    "check_stochastic_rounding_is_unbiased",
    "check_golden_case",
    "ALL_DTYPES",
]

#: Every dtype a lossless codec must carry bit for bit.
ALL_DTYPES: tuple[torch.dtype, ...] = (
    *FLOAT_DTYPES,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
)
#: Dtypes a lossy codec must refuse.
NON_FLOAT_DTYPES = (torch.int8, torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn)
DATA = {"gaussian": gaussian, "heavy_tailed": heavy_tailed, "zeros": lambda s, d, seed: zeros(s, d)}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def golden_input() -> torch.Tensor:
    """40 float32 values with varied magnitudes and signs; no RNG involved."""
    i = torch.arange(40, dtype=torch.float64)
    return (torch.sin(i * 0.7) * torch.linspace(0.5, 4.0, 40, dtype=torch.float64)).float()


class CodecTests:
    """What every codec's tests share: parametrization, the registry, config, golden bytes.

    Class attributes a test file sets:
        name: the registered codec name.
        specs: the configurations every shared check runs on (``name`` first).
        config_specs: more specs for the config round trip only.
        bad_configs: ``(spec, text the ConfigError must contain)`` pairs.
        golden_file: the test file's ``__file__``; golden bytes are in ``golden/<name>.json``.
    """

    name: ClassVar[str] = ""
    specs: ClassVar[tuple[str, ...]] = ()
    config_specs: ClassVar[tuple[str, ...]] = ()
    bad_configs: ClassVar[tuple[tuple[str, str], ...]] = ()
    golden_file: ClassVar[str] = ""
    dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES

    def parameters(self) -> dict[str, tuple[list[Any], Any]]:
        """``{argument: (values, ids)}`` that test methods are parametrized over."""
        return {
            "spec": (list(self.specs), None),
            "config_spec": (list(self.specs + self.config_specs), None),
            "bad_config": (list(self.bad_configs), lambda c: c[0]),
            "dtype": (list(self.dtypes), dtype_id),
        }

    def pytest_generate_tests(self, metafunc: Any) -> None:
        for arg, (values, ids) in self.parameters().items():
            if arg in metafunc.fixturenames:
                metafunc.parametrize(arg, values, ids=ids)

    @property
    def golden_path(self) -> Path:
        return Path(self.golden_file).parent / "golden" / f"{self.name}.json"

    def test_is_registered(self):
        assert self.name in list_codecs()
        assert get_codec(self.name).codec_id == self.name

    def test_fixed_size_is_declared(self, spec):
        codec = get_codec(spec)
        for dtype in ALL_DTYPES:
            if codec.supports(dtype):
                known = codec.encoded_nbytes(1000, dtype) is not None
                assert known == codec.fixed_size, (spec, dtype)

    def test_config_round_trip(self, config_spec):
        codec = get_codec(config_spec)
        check_config(codec)
        check_bad_input(codec)

    def test_bad_configs_raise_and_name_the_value(self, bad_config):
        spec, needle = bad_config
        with pytest.raises(ConfigError) as info:
            get_codec(spec)
        assert needle in str(info.value), str(info.value)
        assert isinstance(info.value, ValueError)

    def test_non_contiguous_inputs(self, spec):
        codec = get_codec(spec)
        base = self.sample((40, 30))
        for view in (base.t(), base[:, ::3], base[::2, 1::4], base.expand(2, 40, 30)):
            assert not view.is_contiguous()
            check_roundtrip(codec, view)

    def sample(self, shape: tuple[int, ...]) -> torch.Tensor:
        return gaussian(shape, torch.float32, seed=4)


class LossyCodecTests(CodecTests):
    """Shared tests of a lossy codec. Besides `CodecTests`' attributes:

    Attributes:
        golden_specs: specs whose wire bytes on `golden_input` are pinned.
        payload_bytes: payload bytes of 1000 float32 elements at the default config.
        summable: whether the codec is one of the summable casts.
        wants_error_feedback: whether the codec declares itself biased.
        any_length_spec: the spec random lengths and scales are tried on.
    """

    golden_specs: ClassVar[tuple[str, ...]] = ()
    payload_bytes: ClassVar[int] = 0
    summable: ClassVar[bool] = False
    wants_error_feedback: ClassVar[bool] = False
    any_length_spec: ClassVar[str] = ""

    def parameters(self) -> dict[str, tuple[list[Any], Any]]:
        return {
            **super().parameters(),
            "data": (list(DATA), None),
            "golden_spec": (list(self.golden_specs), None),
            "non_float": (list(NON_FLOAT_DTYPES), dtype_id),
            "any_length_spec": ([self.any_length_spec or self.name], None),
        }

    # One method serves every subclass; its instances hold no state, so the runs are
    # independent whichever class executes them.
    @settings(
        max_examples=25, deadline=None, suppress_health_check=[HealthCheck.differing_executors]
    )
    @given(n=st.integers(0, 700), log_scale=st.floats(-30, 30), seed=st.integers(0, 2**16))
    def test_roundtrip_any_length_and_scale(self, any_length_spec, n, log_scale, seed):
        x = gaussian(n, torch.float32, seed=seed) * 2.0**log_scale
        check_roundtrip(get_codec(any_length_spec), x, via_wire=False)

    def test_roundtrip_within_bound(self, spec, dtype, data):
        codec = get_codec(spec)
        for shape in SHAPES:
            x = DATA[data](shape, dtype, seed=len(shape))
            decoded = check_roundtrip(codec, x)
            if data == "zeros":
                assert not decoded.any(), f"{spec}: zeros did not decode to zeros"

    def test_capabilities(self):
        codec = get_codec(self.name)
        assert not codec.lossless and codec.summable == self.summable
        assert codec.wants_error_feedback == self.wants_error_feedback
        assert all(codec.supports(d) for d in FLOAT_DTYPES)

    def test_payload_size_per_element(self):
        codec = get_codec(self.name)
        assert codec.encoded_nbytes(1000, torch.float32) == self.payload_bytes
        assert codec.encode(gaussian(1000)).nbytes == self.payload_bytes

    def test_encoded_nbytes_is_exact(self, spec, dtype):
        codec = get_codec(spec)
        for n in (0, 1, 2, 3, 5, 7, 8, 9, 127, 128, 129, 255, 256, 257, 1000, 4099):
            packet = codec.encode(gaussian(n, dtype, seed=n))
            assert packet.nbytes == codec.encoded_nbytes(n, dtype), (spec, n)
            assert all(t.dim() == 1 for t in packet.payload)

    def test_non_float_tensors_are_refused(self, non_float):
        codec = get_codec(self.name)
        with pytest.raises(UnsupportedDtypeError, match=dtype_id(non_float)):
            codec.encode(torch.zeros(4, dtype=non_float))

    def test_nan_never_becomes_finite(self, spec, dtype):
        decoded = check_nonfinite(get_codec(spec), dtype)
        assert decoded.isnan()[5], f"{spec}: NaN did not stay NaN"

    def test_malformed_payload_raises_wire_error(self):
        codec = get_codec(self.name)
        packet = codec.encode(gaussian(300))
        first, *rest = packet.payload
        for payload in ((first[:-1], *rest), packet.payload[:-1], (first.double(), *rest)):
            with pytest.raises(WireError, match="malformed packet"):
                codec.decode(Packet(tuple(payload), packet.meta))

    def test_docstring_examples_run(self):
        module = sys.modules[type(get_codec(self.name)).__module__]
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, result

    def test_golden_bytes(self, golden_spec):
        cases = json.loads(self.golden_path.read_text())["cases"]
        assert golden_spec in cases, f"no golden value for {golden_spec}; regenerate"
        reset_draws()  # randomk: draw 0
        check_golden(get_codec(golden_spec), golden_input(), cases[golden_spec])

    @classmethod
    def golden_document(cls) -> dict[str, Any]:
        """What `golden_path` holds, computed from the current encoders."""
        cases = {}
        for spec in cls.golden_specs:
            reset_draws()
            cases[spec] = _wire_hex(spec, golden_input())
        return {
            "_comment": f"Wire buffers (hex) of {cls.name} on golden_input(); regenerate with "
            "'python tests/codecs/regen_golden.py' only for an intended format change.",
            "cases": cases,
        }


class LosslessCodecTests(CodecTests):
    """Shared tests of a lossless codec. Besides `CodecTests`' attributes:

    Attributes:
        golden_cases: ``(spec, description, input tensor)`` whose wire bytes are pinned.
        library_version: version of the compression library the encoder's exact output
            depends on (old buffers must decode whatever the version), or None.
    """

    dtypes: ClassVar[tuple[torch.dtype, ...]] = ALL_DTYPES
    golden_cases: ClassVar[tuple[tuple[str, str, torch.Tensor], ...]] = ()
    library_version: ClassVar[str | None] = None

    def parameters(self) -> dict[str, tuple[list[Any], Any]]:
        return {
            **super().parameters(),
            "golden_case": (list(self.golden_cases), lambda c: f"{c[0]}-{c[1]}"),
        }

    def sample(self, shape: tuple[int, ...]) -> torch.Tensor:
        return structured(shape, torch.float32)

    def test_exact_roundtrip_every_dtype_and_shape(self, spec, dtype):
        codec = get_codec(spec)
        assert codec.lossless and codec.supports(dtype)
        for shape in SHAPES:
            check_roundtrip(codec, structured(shape, dtype))
            check_roundtrip(codec, random_bits(shape, dtype))

    def test_golden_file_covers_every_case(self):
        stored = {(c["spec"], c["input"]) for c in self._golden()["cases"]}
        assert stored == {(spec, desc) for spec, desc, _ in self.golden_cases}

    def test_golden_bytes(self, golden_case):
        check_golden_case(self._golden(), *golden_case, self.library_version)

    def _golden(self) -> dict[str, Any]:
        return json.loads(self.golden_path.read_text())

    @classmethod
    def golden_document(cls) -> dict[str, Any]:
        """What `golden_path` holds, computed from the current encoders."""
        cases = [
            {"spec": spec, "input": desc, "hex": _wire_hex(spec, x)}
            for spec, desc, x in cls.golden_cases
        ]
        return {
            "_comment": f"Wire buffers (hex) of {cls.name}; regenerate with "
            "'python tests/codecs/regen_golden.py' only for an intended format change.",
            "library_version": cls.library_version,
            "cases": cases,
        }


def _wire_hex(spec: str, x: torch.Tensor) -> str:
    return pack(get_codec(spec).encode(x)).numpy().tobytes().hex()


def check_golden_case(
    golden: dict[str, Any], spec: str, desc: str, x: torch.Tensor, library_version: str | None
) -> None:
    """The stored buffer of ``(spec, desc)`` decodes to what ``x`` encodes to, and (when
    the file was made with ``library_version``) the encoder still writes it byte for byte."""
    expected = {(c["spec"], c["input"]): c["hex"] for c in golden["cases"]}[(spec, desc)]
    codec = get_codec(spec)
    # Old buffers must always decode: this holds whatever the compression library version.
    buffer = torch.frombuffer(bytearray.fromhex(expected), dtype=torch.uint8)
    decoded = codec.decode(unpack(buffer, codec))
    want = x if codec.lossless else codec.roundtrip(x)
    assert decoded.shape == x.shape and decoded.dtype == x.dtype
    assert torch.equal(decoded.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    # The encoder's exact output is pinned for the library version that made the file.
    if library_version != golden["library_version"]:
        pytest.skip(f"golden bytes were made with version {golden['library_version']}")
    check_golden(codec, x, expected)


def check_known_example(spec: str, x: list[float], expected: list[float]) -> None:
    """``spec`` round-trips the small input ``x`` to exactly ``expected`` (to 1e-6)."""
    decoded = get_codec(spec).roundtrip(torch.tensor(x))
    assert decoded.tolist() == pytest.approx(expected, abs=1e-6)


def check_documented_nonfinite(spec: str, expected: list[str]) -> None:
    """NaN, +Inf and -Inf in a gaussian tensor decode to ``expected`` (as ``str`` of the
    floats); the rest decodes within the bound as if they were absent."""
    codec = get_codec(spec)
    x = gaussian(1000, seed=9)
    x[[3, 500, 999]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    decoded = codec.roundtrip(x)
    assert [str(v) for v in decoded[[3, 500, 999]].tolist()] == expected
    finite = torch.isfinite(x)
    assert torch.isfinite(decoded[finite]).all()
    err = (decoded - x).abs()[finite]
    assert (err <= codec.error_bound(x)[finite]).all()


def check_stochastic_rounding_is_unbiased(spec: str) -> None:
    """A block quantizer with ``stochastic=1``: the mean of many encodings is the input."""
    codec = get_codec(spec)
    block, trials = codec.block, 4000
    x = gaussian(block, seed=11)
    scale = x.abs().max() / codec.levels
    # One encode of `trials` copies of the block is `trials` independent encodings.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mean = codec.roundtrip(x.repeat(trials)).view(trials, block).double().mean(dim=0)
    # Each rounding error lies in (-scale, scale) with variance <= scale**2 / 4;
    # 7 standard errors is safe over 256 elements and still far below the
    # deterministic bias seen below.
    tolerance = 7 * scale / 2 / math.sqrt(trials)
    assert ((mean - x.double()).abs() <= tolerance).all()
    deterministic = get_codec(spec.split(":")[0]).roundtrip(x)
    assert (deterministic - x).abs().max() > 3 * tolerance
    assert (codec.roundtrip(x) - x).abs().max() < scale * (1 + 1e-5)
