"""bf16: bfloat16 cast (float32's range); summable, no pre-scaling."""

import commpress
from commpress.testing.suite import LossyCodecTests


class TestBF16(LossyCodecTests):
    name = "bf16"
    specs = ("bf16",)
    golden_specs = ("bf16",)
    golden_file = __file__
    bad_configs = (("bf16:scale=2", "scale"),)
    payload_bytes = 2000
    summable = True


def test_prescale_is_declared():
    assert not commpress.get_codec("bf16").prescale
