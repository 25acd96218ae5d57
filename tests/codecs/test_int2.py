"""int2: block absmax quantization to 2 bits, four codes per byte."""

import pytest
import torch

import commpress
from commpress.testing.suite import (
    LossyCodecTests,
    check_documented_nonfinite,
    check_known_example,
    check_stochastic_rounding_is_unbiased,
)


class TestInt2(LossyCodecTests):
    name = "int2"
    specs = ("int2", "int2:block=5")
    golden_specs = ("int2", "int2:block=8")
    golden_file = __file__
    payload_bytes = 250 + 4 * 4
    any_length_spec = "int2:block=256"
    bad_configs = (("int2:block=2097153", "2097153"),)


@pytest.mark.parametrize(
    "spec, x, expected",
    [
        ("int2:block=4", [2.0, -1.2, 0.9, 0.2], [2.0, -2.0, 0.0, 0.0]),
        ("int2:block=2", [2.0, -1.2, 0.9, 0.2], [2.0, -2.0, 0.9, 0.0]),
    ],
)
def test_small_known_examples(spec, x, expected):
    check_known_example(spec, x, expected)


def test_documented_nonfinite_values():
    check_documented_nonfinite("int2", ["nan", "nan", "nan"])


def test_stochastic_rounding_is_unbiased():
    check_stochastic_rounding_is_unbiased("int2:stochastic=1")


def test_codes_are_packed_densely():
    x = torch.tensor([3.0, -3.0, 0.0, 1.0, -1.0])
    codes, _ = commpress.get_codec("int2").encode(x).payload
    # codes +1, -1, 0, 0, 0 -> 3, 1, 2, 2, 2 at two bits each
    assert codes.tolist() == [3 | 1 << 2 | 2 << 4 | 2 << 6, 2]
