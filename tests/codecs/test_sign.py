"""sign: one bit per element and one scale per block."""

import math

import pytest
import torch

import commpress
from commpress.testing.suite import LossyCodecTests, check_known_example


class TestSign(LossyCodecTests):
    name = "sign"
    specs = ("sign", "sign:block=9")
    golden_specs = ("sign", "sign:block=8")
    golden_file = __file__
    payload_bytes = 125 + 4 * 4
    wants_error_feedback = True
    bad_configs = (("sign:block=0", "block=0"), ("sign:stochastic=1", "stochastic"))


@pytest.mark.parametrize(
    "spec, x, expected",
    [
        ("sign:block=4", [1.0, -3.0, 0.0, 2.0], [1.5, -1.5, 1.5, 1.5]),
        ("sign:block=3", [1.0, -3.0, 2.0, -4.0], [2.0, -2.0, 2.0, -4.0]),
    ],
)
def test_small_known_examples(spec, x, expected):
    check_known_example(spec, x, expected)


def test_poisons_blocks_with_nonfinite_values():
    codec = commpress.get_codec("sign:block=4")
    x = torch.tensor([1.0, float("nan"), -2.0, 3.0, 1.0, -1.0, float("inf"), 2.0, 1.0, -3.0])
    decoded = codec.roundtrip(x)
    assert decoded[:4].isnan().all()
    assert decoded[4:8].tolist() == [math.inf, -math.inf, math.inf, math.inf]
    assert decoded[8:].tolist() == [2.0, -2.0]
    assert codec.error_bound(x)[:8].isinf().all()


def test_codes_are_packed_densely():
    x = torch.tensor([3.0, -3.0, 0.0, 1.0, -1.0])
    codes, _ = commpress.get_codec("sign").encode(x).payload
    assert codes.tolist() == [0b10010]
