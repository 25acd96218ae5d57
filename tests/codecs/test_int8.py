"""int8: block absmax quantization to 8 bits."""

import pytest

import commpress
from commpress.codecs.quant import Int8
from commpress.errors import ConfigError
from commpress.testing.suite import (
    LossyCodecTests,
    check_documented_nonfinite,
    check_known_example,
    check_stochastic_rounding_is_unbiased,
)


class TestInt8(LossyCodecTests):
    name = "int8"
    specs = ("int8", "int8:stochastic=1")
    golden_specs = ("int8", "int8:block=16")
    golden_file = __file__
    payload_bytes = 1000 + 4 * 4
    bad_configs = (
        ("int8:block=0", "block=0"),
        ("int8:stochastic=2", "stochastic"),
        ("int8:bits=4", "bits"),
    )


@pytest.mark.parametrize(
    "x, expected",
    [
        # Exact ties round up (toward +inf): 0.5 -> 1, -0.5 -> 0.
        ([127.0, 1.0, -127.0, 0.5], [127.0, 1.0, -127.0, 1.0]),
        ([127.0, 1.0, -127.0, -0.5], [127.0, 1.0, -127.0, 0.0]),
    ],
)
def test_small_known_examples(x, expected):
    check_known_example("int8:block=4", x, expected)


def test_documented_nonfinite_values():
    check_documented_nonfinite("int8", ["nan", "nan", "nan"])


def test_stochastic_rounding_is_unbiased():
    check_stochastic_rounding_is_unbiased("int8:stochastic=1")


def test_canonical_spec():
    assert commpress.get_codec("int8:block=256,stochastic=0").spec == "int8"


def test_bad_field_values_in_constructor():
    with pytest.raises(ConfigError, match="stochastic=1"):
        Int8(stochastic=1)
