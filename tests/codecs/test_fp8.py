"""fp8: e4m3 with a scale per block (DeepSeek-V3 tile scaling); and what both fp8 formats share."""

import pytest
import torch

import commpress
from commpress.codecs.fp8 import FP8
from commpress.errors import ConfigError
from commpress.testing import heavy_tailed
from commpress.testing.suite import LossyCodecTests, check_documented_nonfinite, check_known_example


class TestFP8(LossyCodecTests):
    name = "fp8"
    specs = ("fp8", "fp8:block=32,pow2=1")
    golden_specs = ("fp8", "fp8:block=8,pow2=1")
    golden_file = __file__
    payload_bytes = 1000 + 4 * 8
    any_length_spec = "fp8:block=1"
    bad_configs = (("fp8:block=0", "block=0"), ("fp8:pow2=maybe", "pow2"))


def test_small_known_example():
    check_known_example("fp8:block=2", [448.0, 1.0, -1.75, 3.5], [448.0, 1.0, -1.75, 3.5])


@pytest.mark.parametrize("spec", ["fp8", "fp8:pow2=1"])
def test_documented_nonfinite_values(spec):
    check_documented_nonfinite(spec, ["nan", "nan", "nan"])


def test_canonical_config():
    assert commpress.get_codec("fp8").config() == {"id": "fp8", "block": 128, "pow2": False}


def test_bad_field_values_in_constructor():
    with pytest.raises(ConfigError, match="pow2='yes'"):
        FP8(pow2="yes")


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
