"""fp16: IEEE half-precision cast; summable, pre-scaled by the all-reduce."""

import commpress
from commpress.testing.suite import LossyCodecTests


class TestFP16(LossyCodecTests):
    name = "fp16"
    specs = ("fp16",)
    golden_specs = ("fp16",)
    golden_file = __file__
    bad_configs = (("fp16:block=4", "block"),)
    payload_bytes = 2000
    summable = True


def test_prescale_is_declared():
    assert commpress.get_codec("fp16").prescale
