"""lz4 (through c-blosc2, bit-shuffled); the blosc2 format checks are in test_blosc2."""

import blosc2
import pytest
import torch

import commpress
from commpress.errors import ConfigError
from commpress.testing import gaussian, structured
from commpress.testing.suite import LosslessCodecTests


class TestLZ4(LosslessCodecTests):
    name = "lz4"
    specs = ("lz4", "lz4:acceleration=16")
    config_specs = ("lz4:shuffle=0",)
    bad_configs = (
        ("lz4:acceleration=0", "1 <= acceleration <= 65537"),
        ("lz4:acceleration=70000", "70000"),
        ("lz4:shuffle=2", "shuffle"),
    )
    golden_file = __file__
    library_version = blosc2.VERSION_STRING
    golden_cases = (
        ("lz4", "structured int32 (64,)", structured((64,), torch.int32)),
        ("lz4", "gaussian float32 (48,) seed 0", gaussian(48, torch.float32)),
        ("lz4:shuffle=0", "structured bfloat16 (8, 8)", structured((8, 8), torch.bfloat16)),
        ("lz4", "structured bool (37,)", structured((37,), torch.bool)),
        # Large enough to come out compressed: a bit-shuffled chunk.
        ("lz4", "gaussian float32 (512,) seed 0", gaussian(512, torch.float32)),
    )


def test_acceleration_maps_onto_blosc2_levels():
    # blosc2 passes acceleration 10 - clevel to LZ4_compress_fast.
    for acc in (1, 2, 9, 10, 16, 65537):
        clevel = commpress.get_codec(f"lz4:acceleration={acc}")._params(4)["clevel"]
        assert 10 - clevel == min(acc, 9)


def test_canonical_specs():
    assert commpress.get_codec({"id": "lz4", "shuffle": 1}) == commpress.get_codec("lz4")
    assert commpress.get_codec("lz4").config() == {"id": "lz4", "acceleration": 1, "shuffle": True}


def test_bad_config_from_dict():
    with pytest.raises(ConfigError):
        commpress.get_codec({"id": "lz4", "acceleration": True})
