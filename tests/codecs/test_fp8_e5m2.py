"""fp8_e5m2: e5m2 (with +-Inf) and a scale per block; the shared fp8 checks are in test_fp8."""

from commpress.testing.suite import LossyCodecTests, check_documented_nonfinite


class TestFP8E5M2(LossyCodecTests):
    name = "fp8_e5m2"
    specs = ("fp8_e5m2", "fp8_e5m2:block=7,pow2=1")
    golden_specs = ("fp8_e5m2", "fp8_e5m2:block=8")
    golden_file = __file__
    payload_bytes = 1000 + 4 * 8
    bad_configs = (("fp8_e5m2:block=1.5", "block"),)


def test_documented_nonfinite_values():
    check_documented_nonfinite("fp8_e5m2", ["nan", "inf", "-inf"])
