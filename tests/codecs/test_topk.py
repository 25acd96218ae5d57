"""topk: the k largest magnitudes, values and int32 indices."""

import pytest

import commpress
from commpress.codec import Packet, PacketMeta
from commpress.codecs.sparse import TopK
from commpress.errors import ConfigError, WireError
from commpress.testing import gaussian
from commpress.testing.suite import LossyCodecTests, check_documented_nonfinite, check_known_example


class TestTopK(LossyCodecTests):
    name = "topk"
    specs = ("topk", "topk:ratio=0.3")
    golden_specs = ("topk", "topk:ratio=0.25")
    golden_file = __file__
    payload_bytes = 10 * (4 + 4)
    wants_error_feedback = True
    bad_configs = (
        ("topk:ratio=1.5", "ratio=1.5"),
        ("topk:ratio=0", "ratio=0"),
        ("topk:ratio=-0.1", "ratio=-0.1"),
        ("topk:ratio=nan", "ratio=nan"),
        ("topk:k=5", "'k'"),
    )


def test_small_known_example():
    check_known_example("topk:ratio=0.5", [0.1, -5.0, 2.0, 0.3], [0.0, -5.0, 2.0, 0.0])


def test_documented_nonfinite_values():
    check_documented_nonfinite("topk", ["nan", "inf", "-inf"])


def test_keep_count_reads_ratio_as_written():
    topk = commpress.get_codec("topk:ratio=0.07")
    assert [topk.k(n) for n in (0, 1, 100, 101, 10**6)] == [0, 1, 7, 8, 70000]
    assert commpress.get_codec("topk:ratio=1").k(5) == 5


def test_canonical_config():
    assert commpress.get_codec("topk:ratio=1").config() == {"id": "topk", "ratio": 1.0}


def test_bad_field_values_in_constructor():
    with pytest.raises(ConfigError, match="ratio=True"):
        TopK(ratio=True)


def test_marks_unsent_elements_nan_when_nonfinite_values_overflow_k():
    codec = commpress.get_codec("topk:ratio=0.1")
    x = gaussian(100, seed=1)
    x[:20] = float("nan")  # 20 NaN, only 10 sent
    decoded = codec.roundtrip(x)
    assert decoded.isnan().all()
    x[:20] = 0.0
    x[0] = float("nan")
    decoded = codec.roundtrip(x)
    assert decoded.isnan().sum() == 1 and decoded.isnan()[0]


def test_rejects_out_of_range_indices():
    codec = commpress.get_codec("topk:ratio=0.5")
    packet = codec.encode(gaussian(10))
    values, idx = packet.payload
    bad = Packet((values, idx + 100), PacketMeta(packet.shape, packet.dtype, packet.meta.spec))
    with pytest.raises(WireError, match="outside"):
        codec.decode(bad)
