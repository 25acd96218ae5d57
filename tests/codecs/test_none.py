"""none: the identity, for baselines."""

import torch

from commpress.testing import structured
from commpress.testing.suite import LosslessCodecTests


class TestNone(LosslessCodecTests):
    name = "none"
    specs = ("none",)
    golden_file = __file__
    bad_configs = (("none:level=1", "level"),)
    golden_cases = (("none", "structured int32 (64,)", structured((64,), torch.int32)),)
