"""randomk: k elements chosen by a seed every rank shares; indices never sent."""

import pytest
import torch

import commpress
from commpress.codecs.sparse import RandomK, reset_draws
from commpress.errors import ConfigError
from commpress.testing import gaussian
from commpress.testing.suite import LossyCodecTests
from commpress.wire import pack, unpack


class TestRandomK(LossyCodecTests):
    name = "randomk"
    specs = ("randomk", "randomk:ratio=0.3,seed=7,unbiased=1")
    golden_specs = ("randomk", "randomk:ratio=0.25,seed=5")
    golden_file = __file__
    payload_bytes = 10 * 4 + 16
    wants_error_feedback = True
    bad_configs = (
        ("randomk:ratio=0", "ratio=0"),
        ("randomk:ratio=1.5", "ratio=1.5"),
        ("randomk:seed=-1", "seed=-1"),
    )


def test_canonical_spec():
    assert commpress.get_codec({"id": "randomk", "ratio": 0.5, "seed": 3}).spec == (
        "randomk:ratio=0.5,seed=3"
    )


def test_bad_field_values_in_constructor():
    with pytest.raises(ConfigError, match="unbiased=None"):
        RandomK(unbiased=None)


def test_marks_unsent_elements_nan_when_input_is_not_finite():
    codec = commpress.get_codec("randomk:ratio=0.1")
    x = gaussian(100, seed=1)
    clean = codec.roundtrip(x)
    assert (clean == 0).sum() == 90
    x[17] = float("inf")
    decoded = codec.roundtrip(x)
    assert (decoded.isnan() | (decoded == x)).all()
    assert decoded.isnan().sum() == 90


def test_sends_no_indices_and_regenerates_them():
    codec = commpress.get_codec("randomk:ratio=0.05,seed=3")
    x = gaussian(1000, seed=2)
    packet = unpack(pack(codec.encode(x)), codec)
    values, state = packet.payload
    assert values.shape == (50,) and state.dtype == torch.int64 and state.shape == (2,)
    assert packet.nbytes == 50 * 4 + 16  # values and two state words only
    idx = codec.indices(state[:1], 1000)
    assert idx.unique().numel() == 50 and 0 <= int(idx.min()) and int(idx.max()) < 1000
    assert torch.equal(values, x[idx])
    # A receiver with its own (equal) codec rebuilds the same tensor.
    decoded = commpress.get_codec("randomk:seed=3,ratio=0.05").decode(packet)
    expected = torch.zeros(1000)
    expected[idx] = x[idx]
    assert torch.equal(decoded, expected)


def test_draws_differ_per_call_and_reset_repeats_them():
    codec = commpress.get_codec("randomk:ratio=0.01,seed=12")
    x = gaussian(5000, seed=3)
    reset_draws()
    first = [codec.encode(x) for _ in range(3)]
    draws = [int(p.payload[1][0]) for p in first]
    assert draws == [0, 1, 2]
    subsets = [set(codec.indices(p.payload[1][:1], 5000).tolist()) for p in first]
    assert subsets[0] != subsets[1] != subsets[2]
    reset_draws()
    again = codec.encode(x)
    assert torch.equal(again.payload[0], first[0].payload[0])
    other_seed = commpress.get_codec("randomk:ratio=0.01,seed=13").encode(x)
    assert not torch.equal(other_seed.payload[0], again.payload[0])


def test_covers_elements_uniformly_over_draws():
    codec = commpress.get_codec("randomk:ratio=0.1,seed=1")
    n, draws = 100, 2000
    counts = torch.zeros(n)
    for d in range(draws):
        counts[codec.indices(torch.tensor([d]), n)] += 1
    # Binomial(2000, 0.1): mean 200, sd 13.4.
    assert counts.sum() == 10 * draws
    assert ((counts - 200).abs() < 6 * 13.5).all(), counts


def test_unbiased_scales_sent_values():
    codec = commpress.get_codec("randomk:ratio=0.25,unbiased=1")
    x = gaussian(64, seed=5)
    packet = codec.encode(x)
    decoded = codec.decode(packet)
    idx = codec.indices(packet.payload[1][:1], 64)
    assert torch.allclose(decoded[idx], x[idx] * 4)
    assert (decoded != 0).sum() == 16
