"""Chains: ``a+b`` applies ``a``, then each lossless ``b`` to its payload sections."""

import json
from pathlib import Path

import blosc2
import pytest
import torch

import commpress
from commpress.testing import SHAPES, check_config, check_roundtrip, gaussian, structured
from commpress.testing.suite import check_golden_case

GOLDEN = Path(__file__).parent / "golden" / "chain.json"
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CHAINS = ("bf16+lz4", "fp16+zstd", "int8+zstd", "int8+lz4")
GOLDEN_CASES = (("bf16+zstd", "gaussian float32 (40,) seed 0", gaussian(40, torch.float32)),)


@pytest.mark.parametrize("spec", CHAINS)
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).replace("torch.", ""))
def test_chains_roundtrip_and_equal_their_first_stage(spec, dtype):
    chain = commpress.get_codec(spec)
    first = commpress.get_codec(spec.split("+")[0])
    check_config(chain)
    for shape in SHAPES:
        x = gaussian(shape, dtype, seed=1)
        decoded = check_roundtrip(chain, x)
        # Lossless stages after the first change the bytes on the wire, never the values.
        assert torch.equal(decoded, first.decode(first.encode(x)))


@pytest.mark.parametrize("spec", ["fp8+lz4", "int4+zstd", "sign+zstd", "topk:ratio=0.1+lz4"])
def test_chains_with_lossless_stages(spec):
    chain = commpress.get_codec(spec)
    first = commpress.get_codec(spec.split("+")[0])
    x = gaussian(1000, torch.bfloat16, seed=8)
    assert torch.equal(check_roundtrip(chain, x), first.roundtrip(x))


def test_chain_of_lossless_stages_is_lossless():
    chain = commpress.get_codec("zstd+lz4")
    assert chain.lossless
    for dtype in (torch.int64, torch.bool, torch.complex64):
        check_roundtrip(chain, structured((257,), dtype))


def test_chain_refuses_gpu_like_device():
    assert commpress.get_codec("bf16+lz4").devices == ("cpu",)


@pytest.mark.parametrize("spec", ["bf16+zstd", "sign+zstd", "topk+lz4", "int8+zstd"])
def test_capabilities_follow_the_first_stage(spec):
    chain, first = commpress.get_codec(spec), commpress.get_codec(spec.split("+")[0])
    assert chain.wants_error_feedback == first.wants_error_feedback
    assert chain.prescale == first.prescale
    assert not chain.fixed_size and not chain.summable
    assert chain.encoded_nbytes(1000, torch.float32) is None


def test_chain_is_registered_but_spelled_with_a_plus():
    assert "chain" not in commpress.list_codecs()
    assert type(commpress.get_codec("int8+zstd")).codec_id == "chain"
    with pytest.raises(commpress.ConfigError, match="'\\+'"):
        commpress.get_codec("chain")


def test_golden_file_covers_every_case():
    stored = {(c["spec"], c["input"]) for c in json.loads(GOLDEN.read_text())["cases"]}
    assert stored == {(spec, desc) for spec, desc, _ in GOLDEN_CASES}


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_golden_bytes(case):
    check_golden_case(json.loads(GOLDEN.read_text()), *case, blosc2.VERSION_STRING)
