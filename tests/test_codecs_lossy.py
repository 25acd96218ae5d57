"""Lossy codecs: fp8, fp8_e5m2, int8, int4, int2, sign, topk and randomk.

Regenerate the golden file (only when an encoding change is intended)::

    python tests/test_codecs_lossy.py --regen
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commpress
from commpress.codec import Packet, PacketMeta
from commpress.codecs.quant import pack_bits, unpack_bits
from commpress.codecs.sparse import reset_draws
from commpress.errors import ConfigError, UnsupportedDtypeError, WireError
from commpress.testing import (
    SHAPES,
    check_bad_input,
    check_config,
    check_golden,
    check_nonfinite,
    check_roundtrip,
    gaussian,
    heavy_tailed,
    zeros,
)
from commpress.wire import pack, unpack

GOLDEN = Path(__file__).parent / "golden" / "lossy.json"

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_IDS = {d: str(d).replace("torch.", "") for d in FLOATS}

NAMES = ("fp8", "fp8_e5m2", "int8", "int4", "int2", "sign", "topk", "randomk")
LOSSY = (
    *NAMES,
    "fp8:block=32,pow2=1",
    "fp8_e5m2:block=7,pow2=1",
    "int8:stochastic=1",
    "int4:block=7,stochastic=1",
    "int2:block=5",
    "sign:block=9",
    "topk:ratio=0.3",
    "randomk:ratio=0.3,seed=7,unbiased=1",
)
STOCHASTIC = ("int8:stochastic=1", "int4:stochastic=1", "int2:stochastic=1")
DATA = {"gaussian": gaussian, "heavy_tailed": heavy_tailed, "zeros": lambda s, d, seed: zeros(s, d)}


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("dtype", FLOATS, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("spec", LOSSY)
def test_roundtrip_within_bound(spec, dtype, data):
    codec = commpress.get_codec(spec)
    for shape in SHAPES:
        x = DATA[data](shape, dtype, seed=len(shape))
        decoded = check_roundtrip(codec, x)
        if data == "zeros":
            assert not decoded.any(), f"{spec}: zeros did not decode to zeros"


@pytest.mark.parametrize("spec", LOSSY)
def test_non_contiguous_inputs(spec):
    codec = commpress.get_codec(spec)
    base = gaussian((40, 30), torch.float32, seed=4)
    for view in (base.t(), base[:, ::3], base[::2, 1::4], base.expand(2, 40, 30)):
        assert not view.is_contiguous()
        check_roundtrip(codec, view)


@pytest.mark.parametrize("spec", ["int8", "int4:block=3", "int2:block=256", "fp8:block=1"])
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 700),
    log_scale=st.floats(-30, 30),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_any_length_and_scale(spec, n, log_scale, seed):
    codec = commpress.get_codec(spec)
    x = gaussian(n, torch.float32, seed=seed) * 2.0**log_scale
    check_roundtrip(codec, x, via_wire=False)


def test_every_name_is_registered():
    assert set(NAMES) <= set(commpress.list_codecs())
    for name in NAMES:
        codec = commpress.get_codec(name)
        assert not codec.lossless and not codec.summable
        assert all(codec.supports(d) for d in FLOATS)


# ------------------------------------------------------------------ size
PAYLOAD_BYTES = {  # payload bytes for 1000 float32 elements with the default config
    "fp8": 1000 + 4 * 8,
    "fp8_e5m2": 1000 + 4 * 8,
    "int8": 1000 + 4 * 4,
    "int4": 500 + 4 * 4,
    "int2": 250 + 4 * 4,
    "sign": 125 + 4 * 4,
    "topk": 10 * (4 + 4),
    "randomk": 10 * 4 + 16,
}


@pytest.mark.parametrize("name", NAMES)
def test_payload_size_per_element(name):
    codec = commpress.get_codec(name)
    assert codec.encoded_nbytes(1000, torch.float32) == PAYLOAD_BYTES[name]
    assert codec.encode(gaussian(1000)).nbytes == PAYLOAD_BYTES[name]


@pytest.mark.parametrize("spec", LOSSY)
@pytest.mark.parametrize("dtype", FLOATS, ids=DTYPE_IDS.get)
def test_encoded_nbytes_is_exact(spec, dtype):
    codec = commpress.get_codec(spec)
    for n in (0, 1, 2, 3, 5, 7, 8, 9, 127, 128, 129, 255, 256, 257, 1000, 4099):
        packet = codec.encode(gaussian(n, dtype, seed=n))
        assert packet.nbytes == codec.encoded_nbytes(n, dtype), (spec, n)
        assert all(t.dim() == 1 for t in packet.payload)


def test_topk_keep_count_reads_ratio_as_written():
    topk = commpress.get_codec("topk:ratio=0.07")
    assert [topk.k(n) for n in (0, 1, 100, 101, 10**6)] == [0, 1, 7, 8, 70000]
    assert commpress.get_codec("topk:ratio=1").k(5) == 5


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("spec", LOSSY)
def test_config_round_trip(spec):
    codec = commpress.get_codec(spec)
    check_config(codec)
    check_bad_input(codec)


def test_canonical_specs_and_configs():
    assert commpress.get_codec("int8:block=256,stochastic=0").spec == "int8"
    assert commpress.get_codec("int4:stochastic=true").spec == "int4:stochastic=1"
    assert commpress.get_codec("topk:ratio=1").config() == {"id": "topk", "ratio": 1.0}
    assert commpress.get_codec({"id": "randomk", "ratio": 0.5, "seed": 3}).spec == (
        "randomk:ratio=0.5,seed=3"
    )
    assert commpress.get_codec("fp8").config() == {"id": "fp8", "block": 128, "pow2": False}


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("int8:block=0", "block=0"),
        ("int4:block=-3", "block=-3"),
        ("int2:block=2097153", "2097153"),
        ("fp8:block=0", "block=0"),
        ("fp8_e5m2:block=1.5", "block"),
        ("sign:block=0", "block=0"),
        ("topk:ratio=1.5", "ratio=1.5"),
        ("topk:ratio=0", "ratio=0"),
        ("topk:ratio=-0.1", "ratio=-0.1"),
        ("topk:ratio=nan", "ratio=nan"),
        ("randomk:ratio=0", "ratio=0"),
        ("randomk:ratio=1.5", "ratio=1.5"),
        ("randomk:seed=-1", "seed=-1"),
        ("int8:stochastic=2", "stochastic"),
        ("fp8:pow2=maybe", "pow2"),
        ("int8:bits=4", "bits"),
        ("topk:k=5", "'k'"),
        ("sign:stochastic=1", "stochastic"),
    ],
)
def test_bad_configs_raise_and_name_the_value(spec, needle):
    with pytest.raises(ConfigError) as info:
        commpress.get_codec(spec)
    assert needle in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_field_values_in_constructors():
    from commpress.codecs.fp8 import FP8
    from commpress.codecs.quant import Int8
    from commpress.codecs.sparse import RandomK, TopK

    with pytest.raises(ConfigError, match="stochastic=1"):
        Int8(stochastic=1)
    with pytest.raises(ConfigError, match="pow2='yes'"):
        FP8(pow2="yes")
    with pytest.raises(ConfigError, match="ratio=True"):
        TopK(ratio=True)
    with pytest.raises(ConfigError, match="unbiased=None"):
        RandomK(unbiased=None)


@pytest.mark.parametrize("spec", NAMES)
@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn]
)
def test_non_float_tensors_are_refused(spec, dtype):
    codec = commpress.get_codec(spec)
    with pytest.raises(UnsupportedDtypeError, match=str(dtype).replace("torch.", "")):
        codec.encode(torch.zeros(4, dtype=dtype))


# ------------------------------------------------------------------ NaN and Inf
@pytest.mark.parametrize("dtype", FLOATS, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("spec", LOSSY)
def test_nan_never_becomes_finite(spec, dtype):
    codec = commpress.get_codec(spec)
    decoded = check_nonfinite(codec, dtype)
    assert decoded.isnan()[5], f"{spec}: NaN did not stay NaN"


NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("int8", ["nan", "nan", "nan"]),
        ("int4", ["nan", "nan", "nan"]),
        ("int2", ["nan", "nan", "nan"]),
        ("fp8", ["nan", "nan", "nan"]),
        ("fp8:pow2=1", ["nan", "nan", "nan"]),
        ("fp8_e5m2", ["nan", "inf", "-inf"]),
        ("topk", ["nan", "inf", "-inf"]),
    ],
)
def test_documented_nonfinite_values(spec, expected):
    codec = commpress.get_codec(spec)
    x = gaussian(1000, seed=9)
    x[[3, 500, 999]] = torch.tensor(NONFINITE)
    decoded = codec.roundtrip(x)
    assert [str(v) for v in decoded[[3, 500, 999]].tolist()] == expected
    # The rest of the tensor is decoded as if the non-finite values were absent.
    finite = torch.isfinite(x)
    assert torch.isfinite(decoded[finite]).all()
    err = (decoded - x).abs()[finite]
    assert (err <= codec.error_bound(x)[finite]).all()


def test_sign_poisons_blocks_with_nonfinite_values():
    codec = commpress.get_codec("sign:block=4")
    x = torch.tensor([1.0, float("nan"), -2.0, 3.0, 1.0, -1.0, float("inf"), 2.0, 1.0, -3.0])
    decoded = codec.roundtrip(x)
    assert decoded[:4].isnan().all()
    assert decoded[4:8].tolist() == [math.inf, -math.inf, math.inf, math.inf]
    assert decoded[8:].tolist() == [2.0, -2.0]
    assert codec.error_bound(x)[:8].isinf().all()


def test_topk_marks_unsent_elements_nan_when_nonfinite_values_overflow_k():
    codec = commpress.get_codec("topk:ratio=0.1")
    x = gaussian(100, seed=1)
    x[:20] = float("nan")  # 20 NaN, only 10 sent
    decoded = codec.roundtrip(x)
    assert decoded.isnan().all()
    x[:20] = 0.0
    x[0] = float("nan")
    decoded = codec.roundtrip(x)
    assert decoded.isnan().sum() == 1 and decoded.isnan()[0]


def test_randomk_marks_unsent_elements_nan_when_input_is_not_finite():
    codec = commpress.get_codec("randomk:ratio=0.1")
    x = gaussian(100, seed=1)
    clean = codec.roundtrip(x)
    assert (clean == 0).sum() == 90
    x[17] = float("inf")
    decoded = codec.roundtrip(x)
    assert (decoded.isnan() | (decoded == x)).all()
    assert decoded.isnan().sum() == 90


# ------------------------------------------------------------------ exact values
@pytest.mark.parametrize(
    "spec, x, expected",
    [
        # Exact ties round up (toward +inf): 0.5 -> 1, -0.5 -> 0.
        ("int8:block=4", [127.0, 1.0, -127.0, 0.5], [127.0, 1.0, -127.0, 1.0]),
        ("int8:block=4", [127.0, 1.0, -127.0, -0.5], [127.0, 1.0, -127.0, 0.0]),
        ("int4:block=4", [7.0, -3.0, 1.4, 0.0], [7.0, -3.0, 1.0, 0.0]),
        ("int2:block=4", [2.0, -1.2, 0.9, 0.2], [2.0, -2.0, 0.0, 0.0]),
        ("int2:block=2", [2.0, -1.2, 0.9, 0.2], [2.0, -2.0, 0.9, 0.0]),
        ("sign:block=4", [1.0, -3.0, 0.0, 2.0], [1.5, -1.5, 1.5, 1.5]),
        ("sign:block=3", [1.0, -3.0, 2.0, -4.0], [2.0, -2.0, 2.0, -4.0]),
        ("fp8:block=2", [448.0, 1.0, -1.75, 3.5], [448.0, 1.0, -1.75, 3.5]),
        ("topk:ratio=0.5", [0.1, -5.0, 2.0, 0.3], [0.0, -5.0, 2.0, 0.0]),
    ],
)
def test_small_known_examples(spec, x, expected):
    codec = commpress.get_codec(spec)
    assert codec.roundtrip(torch.tensor(x)).tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("spec", ["fp8", "fp8_e5m2", "fp8:pow2=1", "fp8_e5m2:block=64,pow2=1"])
def test_fp8_matches_a_reference_cast(spec):
    codec = commpress.get_codec(spec)
    fp8 = torch.float8_e4m3fn if spec.startswith("fp8:") or spec == "fp8" else torch.float8_e5m2
    fmax = torch.finfo(fp8).max
    x = heavy_tailed(130 * 64, seed=2)
    codes, scales = codec.encode(x).payload
    blocks = x.view(-1, codec.block)
    absmax = blocks.abs().amax(dim=1)
    ref_scale = absmax / fmax
    if codec.pow2:
        ref_scale = 2.0 ** torch.ceil(torch.log2(ref_scale))
        assert torch.equal(scales, ref_scale)
        assert (torch.frexp(scales).mantissa == 0.5).all()
    else:
        assert torch.allclose(scales, ref_scale, rtol=2**-23, atol=0)
        # The block's largest magnitude maps to the format's largest value.
        top = codes.view(fp8).float().view(-1, codec.block).abs().amax(dim=1)
        assert (top == fmax).all()
    ref = (blocks / scales.unsqueeze(1)).to(fp8).float()
    got = codes.view(fp8).float().view(-1, codec.block)
    assert (got != ref).float().mean() < 1e-3  # only last-bit ties may differ


def test_quantized_codes_are_packed_densely():
    x = torch.tensor([3.0, -3.0, 0.0, 1.0, -1.0])  # block absmax 3, int4 scale 3/7
    codes, scales = commpress.get_codec("int4").encode(x).payload
    assert scales.tolist() == pytest.approx([3.0 / 7])
    # offset binary codes 15, 1, 8, round(7/3)+8=10, 6 -> low nibble first
    assert codes.tolist() == [15 | 1 << 4, 8 | 10 << 4, 6]
    codes, _ = commpress.get_codec("int2").encode(x).payload
    # codes +1, -1, 0, 0, 0 -> 3, 1, 2, 2, 2 at two bits each
    assert codes.tolist() == [3 | 1 << 2 | 2 << 4 | 2 << 6, 2]
    codes, _ = commpress.get_codec("sign").encode(x).payload
    assert codes.tolist() == [0b10010]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bit_packing_round_trips(bits):
    for n in (0, 1, 3, 8, 9, 31, 1001):
        codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, n), codes)
        # A slice that starts mid-word packs the same as a fresh tensor.
        assert torch.equal(pack_bits(torch.cat([codes[:1], codes])[1:], bits), packed)


@pytest.mark.parametrize("module", ["fp8", "quant", "sparse"])
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"commpress.codecs.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


# ------------------------------------------------------------------ stochastic rounding
@pytest.mark.parametrize("spec", STOCHASTIC)
def test_stochastic_rounding_is_unbiased(spec):
    codec = commpress.get_codec(spec)
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
    deterministic = commpress.get_codec(spec.split(":")[0]).roundtrip(x)
    assert (deterministic - x).abs().max() > 3 * tolerance
    assert (codec.roundtrip(x) - x).abs().max() < scale * (1 + 1e-5)


def test_stochastic_rounding_uses_torch_global_generator():
    codec = commpress.get_codec("int4:stochastic=1")
    x = gaussian(1000, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        a = codec.encode(x).payload[0]
        torch.manual_seed(5)
        b = codec.encode(x).payload[0]
        c = codec.encode(x).payload[0]
    assert torch.equal(a, b) and not torch.equal(b, c)


# ------------------------------------------------------------------ randomk
def test_randomk_sends_no_indices_and_regenerates_them():
    codec = commpress.get_codec("randomk:ratio=0.05,seed=3")
    x = gaussian(1000, seed=2)
    packet = unpack(pack(codec.encode(x)), codec)
    values, state = packet.payload
    assert values.shape == (50,) and state.dtype == torch.int64 and state.shape == (2,)
    assert packet.nbytes == 50 * 4 + 16  # values and two state words only
    idx = codec.indices(state[:1], 1000)
    assert idx.unique().numel() == 50 and 0 <= int(idx.min()) and int(idx.max()) < 1000
    assert torch.equal(values, x[idx])
    # A receiver with its own (equal) codec rebuilds the same tensor.
    decoded = commpress.get_codec("randomk:seed=3,ratio=0.05").decode(packet)
    expected = torch.zeros(1000)
    expected[idx] = x[idx]
    assert torch.equal(decoded, expected)


def test_randomk_draws_differ_per_call_and_reset_repeats_them():
    codec = commpress.get_codec("randomk:ratio=0.01,seed=12")
    x = gaussian(5000, seed=3)
    reset_draws()
    first = [codec.encode(x) for _ in range(3)]
    draws = [int(p.payload[1][0]) for p in first]
    assert draws == [0, 1, 2]
    subsets = [set(codec.indices(p.payload[1][:1], 5000).tolist()) for p in first]
    assert subsets[0] != subsets[1] != subsets[2]
    reset_draws()
    again = codec.encode(x)
    assert torch.equal(again.payload[0], first[0].payload[0])
    other_seed = commpress.get_codec("randomk:ratio=0.01,seed=13").encode(x)
    assert not torch.equal(other_seed.payload[0], again.payload[0])


def test_randomk_covers_elements_uniformly_over_draws():
    codec = commpress.get_codec("randomk:ratio=0.1,seed=1")
    n, draws = 100, 2000
    counts = torch.zeros(n)
    for d in range(draws):
        counts[codec.indices(torch.tensor([d]), n)] += 1
    # Binomial(2000, 0.1): mean 200, sd 13.4.
    assert counts.sum() == 10 * draws
    assert ((counts - 200).abs() < 6 * 13.5).all(), counts


def test_randomk_unbiased_scales_sent_values():
    codec = commpress.get_codec("randomk:ratio=0.25,unbiased=1")
    x = gaussian(64, seed=5)
    packet = codec.encode(x)
    decoded = codec.decode(packet)
    idx = codec.indices(packet.payload[1][:1], 64)
    assert torch.allclose(decoded[idx], x[idx] * 4)
    assert (decoded != 0).sum() == 16


# ------------------------------------------------------------------ malformed packets
@pytest.mark.parametrize("spec", NAMES)
def test_malformed_payload_raises_wire_error(spec):
    codec = commpress.get_codec(spec)
    packet = codec.encode(gaussian(300))
    first, *rest = packet.payload
    for payload in ((first[:-1], *rest), packet.payload[:-1], (first.double(), *rest)):
        with pytest.raises(WireError, match="malformed packet"):
            codec.decode(Packet(tuple(payload), packet.meta))


def test_topk_rejects_out_of_range_indices():
    codec = commpress.get_codec("topk:ratio=0.5")
    packet = codec.encode(gaussian(10))
    values, idx = packet.payload
    bad = Packet((values, idx + 100), PacketMeta(packet.shape, packet.dtype, packet.meta.spec))
    with pytest.raises(WireError, match="outside"):
        codec.decode(bad)


@pytest.mark.parametrize("spec", ["fp8+lz4", "int4+zstd", "sign+zstd", "topk:ratio=0.1+lz4"])
def test_chains_with_lossless_stages(spec):
    chain = commpress.get_codec(spec)
    first = commpress.get_codec(spec.split("+")[0])
    x = gaussian(1000, torch.bfloat16, seed=8)
    assert torch.equal(check_roundtrip(chain, x), first.roundtrip(x))


# ------------------------------------------------------------------ golden bytes
def _golden_input() -> torch.Tensor:
    """40 float32 values with varied magnitudes and signs; no RNG involved."""
    i = torch.arange(40, dtype=torch.float64)
    return (torch.sin(i * 0.7) * torch.linspace(0.5, 4.0, 40, dtype=torch.float64)).float()


GOLDEN_SPECS = (
    *NAMES,
    "fp8:block=8,pow2=1",
    "fp8_e5m2:block=8",
    "int8:block=16",
    "int4:block=8",
    "int2:block=8",
    "sign:block=8",
    "topk:ratio=0.25",
    "randomk:ratio=0.25,seed=5",
)


def _golden_packet(spec: str) -> torch.Tensor:
    reset_draws()  # randomk: draw 0
    return pack(commpress.get_codec(spec).encode(_golden_input()))


def _golden_cases() -> dict[str, str]:
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("spec", GOLDEN_SPECS)
def test_golden_bytes(spec):
    cases = _golden_cases()
    assert spec in cases, f"no golden value for {spec}; run with --regen"
    reset_draws()
    check_golden(commpress.get_codec(spec), _golden_input(), cases[spec])


def _regenerate() -> None:
    doc = {
        "_comment": "Wire buffers (hex) of lossy codecs on _golden_input(); regenerate with "
        "'python tests/test_codecs_lossy.py --regen' only for an intended format change.",
        "cases": {spec: _golden_packet(spec).numpy().tobytes().hex() for spec in GOLDEN_SPECS},
    }
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--regen"]:
        _regenerate()
        print(f"wrote {GOLDEN}")
    else:
        sys.exit("usage: python tests/test_codecs_lossy.py --regen")
