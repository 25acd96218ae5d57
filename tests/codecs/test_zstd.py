"""zstd (through c-blosc2, byte-shuffled); the blosc2 format checks are in test_blosc2."""

import blosc2
import pytest
import torch

import commpress
from commpress.errors import ConfigError
from commpress.testing import gaussian, structured
from commpress.testing.suite import LosslessCodecTests


class TestZstd(LosslessCodecTests):
    name = "zstd"
    specs = ("zstd", "zstd:level=19", "zstd:shuffle=0")
    config_specs = ("zstd:level=1,shuffle=0",)
    bad_configs = (
        ("zstd:level=99", "99"),
        ("zstd:level=0", "1 <= level <= 22"),
        ("zstd:level=-5", "1 <= level <= 22"),
        ("zstd:level=2.5", "level"),
        ("zstd:shuffle=maybe", "shuffle"),
    )
    golden_file = __file__
    library_version = blosc2.VERSION_STRING
    golden_cases = (
        ("zstd", "structured int64 (3, 21)", structured((3, 21), torch.int64)),
        ("zstd", "gaussian bfloat16 (64,) seed 0", gaussian(64, torch.bfloat16)),
        (
            "zstd:level=19",
            "structured float8_e4m3fn (100,)",
            structured((100,), torch.float8_e4m3fn),
        ),
        ("zstd", "structured complex64 ()", structured((), torch.complex64)),
        ("zstd", "structured float32 (0,)", structured((0,), torch.float32)),
        # Large enough to come out compressed: a byte-shuffled chunk.
        ("zstd", "gaussian bfloat16 (1024,) seed 0", gaussian(1024, torch.bfloat16)),
    )


def test_levels_map_onto_blosc2_levels():
    # blosc2 runs zstd at 2 * clevel - 1 (clevel 1..8) or 22 (clevel 9).
    clevel = {
        c.level: c._params(4)["clevel"]
        for c in (commpress.get_codec(f"zstd:level={lv}") for lv in range(1, 23))
    }
    assert [clevel[lv] for lv in (1, 2, 3, 4, 5, 15, 16, 19, 22)] == [1, 2, 2, 3, 3, 8, 9, 9, 9]
    assert all(2 * clevel[lv] - 1 >= lv for lv in range(1, 16))


def test_canonical_specs():
    assert commpress.get_codec("zstd:level=3").spec == "zstd"
    assert commpress.get_codec("zstd:shuffle=false,level=9").spec == "zstd:level=9,shuffle=0"


def test_level_99_message_names_value_and_range():
    with pytest.raises(ConfigError) as info:
        commpress.get_codec("zstd:level=99")
    assert "99" in str(info.value) and "1 <= level <= 22" in str(info.value)


def test_bad_config_from_dict():
    with pytest.raises(ConfigError):
        commpress.get_codec({"id": "zstd", "level": 3.0})


def test_wrong_codec_on_decode_is_a_mismatch():
    packet = commpress.get_codec("zstd:level=5").encode(torch.zeros(8))
    with pytest.raises(commpress.CodecMismatchError, match="zstd:level=5"):
        commpress.get_codec("zstd").decode(packet)
