"""The fast codec kernels against the reference path, bit for bit, on shared and hostile data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import commpress
from commpress import kernels
from commpress.testing import (
    SHAPES,
    check_fast_matches_reference,
    check_roundtrip,
    edge_values,
    gaussian,
    heavy_tailed,
)

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba kernels unavailable")

SPECS = [
    "int8", "int4", "int2", "int8:block=128", "int4:block=6", "int2:block=12", "int8:block=1",
    "fp8", "fp8_e5m2", "fp8:pow2=1", "fp8_e5m2:pow2=1", "fp8:block=100",
    "sign", "sign:block=100", "bf16", "fp16",
]  # fmt: skip
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fast_matches_reference(spec, dtype):
    codec = commpress.get_codec(spec)
    for shape in SHAPES:
        check_fast_matches_reference(codec, gaussian(shape, dtype))
    check_fast_matches_reference(codec, heavy_tailed(70_001, dtype, seed=3))
    check_fast_matches_reference(codec, edge_values(dtype))
    # A length past one staging chunk, so that non-float32 inputs take several chunks.
    check_fast_matches_reference(codec, gaussian(kernels.STAGE * 2 + 999, dtype, seed=1))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_values_within_bound(spec, dtype):
    """Every finite input holds its bound (float32 max, subnormals, zeros), never NaN."""
    codec = commpress.get_codec(spec)
    x = edge_values(dtype)
    bound = codec.error_bound(x)
    assert not bool(bound.isnan().any()), f"{spec}: error_bound is NaN somewhere"
    y = check_roundtrip(codec, x)
    assert bool(y[x.isnan()].isnan().all()), f"{spec}: a NaN decoded to a number"
    # sign: a NaN poisons its whole block; fp16 overflows past 65504 by design; float64
    # magnitudes beyond float32's range count as Inf (see the codecs' docs).
    keeps_extremes = codec.codec_id not in ("sign", "fp16") and dtype != torch.float64
    if keeps_extremes:
        big = x.abs() == torch.finfo(dtype).max
        assert bool(y[big].isfinite().all()), f"{spec}: a finite extreme decoded to Inf"


def test_bf16_saturates_instead_of_overflowing():
    """float32 max and float16 65504 stay finite through bf16 (they were Inf before)."""
    bf16 = commpress.get_codec("bf16")
    big = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    assert bool(bf16.roundtrip(big).isfinite().all())
    h = torch.tensor([65504.0, -65504.0], dtype=torch.float16)
    assert torch.equal(bf16.roundtrip(h), h)
    tiny = torch.tensor([2.0**-140])  # flushes to 0: the bound has an absolute term
    assert bool((bf16.roundtrip(tiny) - tiny).abs() <= bf16.error_bound(tiny))


def test_fp16_bound_is_inf_past_its_range():
    fp16 = commpress.get_codec("fp16")
    x = torch.tensor([1e5, 65504.0, 1.0])
    bound = fp16.error_bound(x)
    assert bound[0] == float("inf") and bool(bound[1:].isfinite().all())


def test_int_decode_saturates_near_float32_max():
    """A block at float32's max used to decode to -Inf (the old decode overflowed)."""
    x = torch.full((256,), torch.finfo(torch.float32).max)
    x[::2] *= -1
    for spec in ("int8", "int4", "int2", "fp8", "fp8_e5m2"):
        c = commpress.get_codec(spec)
        y = c.roundtrip(x)
        assert bool(y.isfinite().all()), spec
        assert bool(((y - x).abs() <= c.error_bound(x)).all()), spec


@pytest.mark.parametrize("spec", ["int8", "fp8", "bf16", "sign"])
def test_decode_accumulate_equals_add(spec):
    codec = commpress.get_codec(spec)
    x = gaussian(5000, seed=2)
    acc = gaussian(5000, seed=4)
    expected = acc + codec.roundtrip(x)
    codec.decode(codec.encode(x), out=acc, accumulate=True)
    assert torch.equal(acc, expected)
    # A float32 accumulator for a bfloat16 packet: decoded value rounded to bf16 first.
    xb = x.to(torch.bfloat16)
    acc = gaussian(5000, seed=4)
    expected = acc + codec.roundtrip(xb).float()
    codec.decode(codec.encode(xb), out=acc, accumulate=True)
    assert torch.equal(acc, expected)


def test_decode_accumulate_checks_its_arguments():
    codec = commpress.get_codec("int8")
    p = codec.encode(torch.randn(10))
    with pytest.raises(ValueError, match="needs an out"):
        codec.decode(p, accumulate=True)
    with pytest.raises(ValueError, match="expected"):
        codec.decode(p, out=torch.zeros(11), accumulate=True)
    with pytest.raises(ValueError, match="expected"):
        codec.decode(p, out=torch.zeros(10, dtype=torch.float64))  # not accumulating


def test_hostile_payload_is_rejected_by_the_fast_path():
    """The fused decode validates sections before any kernel touches them."""
    codec = commpress.get_codec("int8")
    p = codec.encode(torch.randn(1000))
    short = commpress.Packet((p.payload[0][:10], p.payload[1]), p.meta)
    with pytest.raises(commpress.WireError):
        codec.decode(short, out=torch.empty(1000))
    with pytest.raises(commpress.WireError):
        codec.decode(short)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_without_numba_the_reference_path_runs_with_one_warning():
    code = (
        "import sys, warnings; sys.modules['numba'] = None\n"
        "warnings.simplefilter('always')\n"
        "import torch, commpress\n"
        "from commpress import kernels\n"
        "x = torch.randn(1000)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for s in ('int8', 'fp8', 'bf16'):\n"
        "        c = commpress.get_codec(s); c.decode(c.encode(x))\n"
        "print(kernels.available(), len([m for m in w if 'numba' in str(m.message)]))\n"
    )
    r = _run(code, {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "1"], r.stdout + r.stderr


def test_env_switch_forces_the_reference_path_silently():
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, commpress\n"
        "from commpress import kernels\n"
        "c = commpress.get_codec('int8'); c.decode(c.encode(torch.randn(100)))\n"
        "print(kernels.available())\n"
    )
    r = _run(code, {"COMMPRESS_KERNELS": "reference"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize(
    "spec", ["none", "bf16", "fp16", "int8", "int4", "int2:block=6", "fp8", "sign", "topk", "zstd"]
)
@pytest.mark.parametrize("checksum", [False, True])
def test_encode_pack_writes_the_same_bytes_as_pack(spec, checksum):
    codec = commpress.get_codec(spec)
    for x in (gaussian(1001, seed=5), gaussian((3, 0)), edge_values(torch.float32)):
        expected = commpress.wire.pack(codec.encode(x), checksum=checksum)
        got = commpress.wire.encode_pack(codec, x, checksum=checksum)
        assert torch.equal(got, expected), spec
        # Into a slice of a larger buffer at an 8-byte boundary (a send buffer).
        big = torch.full((expected.numel() + 16,), 0xAB, dtype=torch.uint8)
        commpress.wire.encode_pack(codec, x, checksum=checksum, out=big[8 : 8 + expected.numel()])
        assert torch.equal(big[8 : 8 + expected.numel()], expected), spec
        assert bool((big[:8] == 0xAB).all()) and bool((big[-8:] == 0xAB).all())
    with pytest.raises(ValueError, match="bytes"):
        commpress.wire.encode_pack(codec, gaussian(10), out=torch.empty(3, dtype=torch.uint8))


def test_gpu_check_says_not_run_without_a_gpu():
    """The prepared GPU script runs everywhere; without CUDA it claims nothing."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_check.py itself")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
    r = subprocess.run(
        [sys.executable, script, "--quick"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "not run on GPU" in r.stdout


@pytest.mark.parametrize("spec", SPECS + ["none", "topk", "randomk", "zstd", "int8+zstd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_encode_writes_back_what_a_receiver_decodes(spec, dtype):
    """``encode_pack(..., roundtrip=True)``: the same bytes, and the tensor becomes
    exactly ``decode`` of them (the two_phase owner relies on it for bit-identity)."""
    from commpress.codecs.sparse import reset_draws

    codec = commpress.get_codec(spec)
    for x in (gaussian(70_001, dtype, seed=7), edge_values(dtype)):
        reset_draws()
        expected_buf = commpress.wire.encode_pack(codec, x)
        expected = codec.decode(commpress.wire.unpack(expected_buf, codec))
        y = x.clone()
        reset_draws()
        buf = commpress.wire.encode_pack(codec, y, roundtrip=True)
        assert torch.equal(buf, expected_buf), spec
        same = (y == expected) | (y.isnan() & expected.isnan())
        assert bool(same.all()), f"{spec} {dtype}: {int((~same).sum())} elements differ"


@pytest.mark.parametrize("spec", ["none", "fp16", "bf16"])
def test_a_packet_without_sections_is_a_wire_error(spec):
    """A consistent header with zero payload sections gave IndexError in the casts."""
    from commpress.codec import Packet, PacketMeta

    codec = commpress.get_codec(spec)
    packet = Packet((), PacketMeta(torch.Size([4]), torch.float32, codec.spec))
    with pytest.raises(commpress.WireError, match="malformed packet"):
        codec.decode(packet)
    with pytest.raises(commpress.WireError, match="malformed packet"):
        codec.decode(packet, out=torch.empty(4))
    buf = commpress.wire.pack(packet)
    with pytest.raises(commpress.WireError):
        codec.decode(commpress.wire.unpack(buf, codec))
