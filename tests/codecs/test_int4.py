"""int4: block absmax quantization to 4 bits, two codes per byte."""

import pytest
import torch

import commpress
from commpress.testing import gaussian
from commpress.testing.suite import (
    LossyCodecTests,
    check_documented_nonfinite,
    check_known_example,
    check_stochastic_rounding_is_unbiased,
)


class TestInt4(LossyCodecTests):
    name = "int4"
    specs = ("int4", "int4:block=7,stochastic=1")
    golden_specs = ("int4", "int4:block=8")
    golden_file = __file__
    payload_bytes = 500 + 4 * 4
    any_length_spec = "int4:block=3"
    bad_configs = (("int4:block=-3", "block=-3"),)


def test_small_known_example():
    check_known_example("int4:block=4", [7.0, -3.0, 1.4, 0.0], [7.0, -3.0, 1.0, 0.0])


def test_documented_nonfinite_values():
    check_documented_nonfinite("int4", ["nan", "nan", "nan"])


def test_stochastic_rounding_is_unbiased():
    check_stochastic_rounding_is_unbiased("int4:stochastic=1")


def test_canonical_spec():
    assert commpress.get_codec("int4:stochastic=true").spec == "int4:stochastic=1"


def test_codes_are_packed_densely():
    x = torch.tensor([3.0, -3.0, 0.0, 1.0, -1.0])  # block absmax 3, int4 scale 3/7
    codes, scales = commpress.get_codec("int4").encode(x).payload
    assert scales.tolist() == pytest.approx([3.0 / 7])
    # offset binary codes 15, 1, 8, round(7/3)+8=10, 6 -> low nibble first
    assert codes.tolist() == [15 | 1 << 4, 8 | 10 << 4, 6]


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
