"""Error feedback: residual memory per key, checkpoints, and the running-sum property."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import commpress
from commpress import ErrorFeedback
from commpress.codec import Codec
from commpress.errors import CodecMismatchError, ConfigError
from commpress.testing import gaussian


@dataclass(frozen=True, repr=False)
class ScaledSign(Codec):
    """Reference 1-bit codec for these tests: ``sign(x) * mean(|x|)`` (biased, lossy)."""

    codec_id: ClassVar[str] = "test_scaled_sign"

    def _encode(self, x):
        scale = x.float().abs().mean().reshape(1) if x.numel() else torch.zeros(1)
        return (torch.sign(x).to(torch.int8), scale)

    def _decode(self, payload, numel, dtype):
        return (payload[0].float() * payload[1]).to(dtype)


def _residual(ef: ErrorFeedback, key) -> torch.Tensor:
    return ef.state_dict()["residuals"][key]


# ------------------------------------------------------------------ residual semantics
def test_first_call_has_no_residual():
    ef = ErrorFeedback("bf16")
    x = gaussian(100)
    assert torch.equal(ef.compensate(x, "w"), x)
    assert len(ef) == 0


def test_residual_is_what_the_codec_dropped():
    ef = ErrorFeedback("bf16")
    codec = ef.codec
    x, y = gaussian(100, seed=1), gaussian(100, seed=2)
    packet = ef.encode(x, "w")
    decoded = codec.decode(packet)
    assert torch.equal(decoded, codec.roundtrip(x))
    r = _residual(ef, "w")
    assert torch.equal(r, x - decoded) and r.abs().max() > 0
    # The next input of the same key carries the residual along.
    assert torch.equal(ef.compensate(y, "w"), y + r)
    packet = ef.encode(y, "w")
    assert torch.equal(codec.decode(packet), codec.roundtrip(y + r))
    assert torch.equal(_residual(ef, "w"), (y + r) - codec.decode(packet))


def test_keys_are_independent():
    ef = ErrorFeedback("bf16")
    ef.encode(gaussian(10, seed=1), "a")
    ef.encode(gaussian(20, seed=2), 7)
    ef.encode(gaussian(20, seed=3), ("bucket", 0))
    assert len(ef) == 3
    assert _residual(ef, "a").shape == (10,) and _residual(ef, 7).shape == (20,)


def test_lossless_codec_leaves_no_error():
    ef = ErrorFeedback("zstd")
    for seed in range(3):
        x = gaussian(50, seed=seed)
        assert torch.equal(ef.codec.decode(ef.encode(x, "k")), x)
        assert torch.count_nonzero(_residual(ef, "k")) == 0


def test_input_dtype_is_kept_and_residual_is_float32():
    ef = ErrorFeedback("bf16")
    x = gaussian((4, 8), torch.float16)
    packet = ef.encode(x, "h")
    assert packet.dtype == torch.float16 and packet.shape == (4, 8)
    assert ef.codec.decode(packet).dtype == torch.float16
    assert _residual(ef, "h").dtype == torch.float32


def test_shape_change_under_one_key_is_refused():
    ef = ErrorFeedback("bf16")
    ef.encode(gaussian(10), "w")
    with pytest.raises(ConfigError, match="'w'.*shape"):
        ef.encode(gaussian(11), "w")


def test_non_finite_inputs_do_not_poison_the_residual():
    ef = ErrorFeedback("bf16")
    x = gaussian(10)
    x[3] = float("nan")
    x[4] = float("inf")
    decoded = ef.codec.decode(ef.encode(x, "w"))
    assert torch.isnan(decoded[3]) and torch.isinf(decoded[4])
    r = _residual(ef, "w")
    assert torch.isfinite(r).all() and r[3] == 0 and r[4] == 0


def test_reset():
    ef = ErrorFeedback("bf16")
    for key in ("a", "b"):
        ef.encode(gaussian(10), key)
    ef.reset("a")
    ef.reset("never-seen")
    assert len(ef) == 1 and "b" in ef.state_dict()["residuals"]
    x = gaussian(10, seed=9)
    assert torch.equal(ef.compensate(x, "a"), x)
    ef.reset()
    assert len(ef) == 0
    assert repr(ef) == "ErrorFeedback('bf16', keys=0)"


# ------------------------------------------------------------------ checkpoints
def test_state_dict_round_trip_continues_identically():
    a, b = ErrorFeedback("bf16"), ErrorFeedback("bf16")
    for step in range(3):
        for key in ("w1", "w2"):
            a.encode(gaussian(64, seed=step * 10 + len(key)), key)
    state = a.state_dict()
    assert state["codec"] == "bf16"
    assert all(t.device.type == "cpu" for t in state["residuals"].values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    for key in ("w1", "w2"):
        x = gaussian(64, seed=100)
        pa, pb = a.encode(x, key), b.encode(x, key)
        assert torch.equal(pa.payload[0], pb.payload[0])
        assert torch.equal(_residual(a, key), _residual(b, key))


def test_state_dict_is_a_copy():
    ef = ErrorFeedback("bf16")
    ef.encode(gaussian(8), "w")
    state = ef.state_dict()
    state["residuals"]["w"].fill_(123.0)
    assert _residual(ef, "w").abs().max() < 1
    other = ErrorFeedback("bf16")
    other.load_state_dict(state)
    state["residuals"]["w"].fill_(0.0)
    assert torch.all(_residual(other, "w") == 123.0)


def test_state_from_another_codec_is_refused():
    ef = ErrorFeedback("bf16")
    ef.encode(gaussian(8), "w")
    other = ErrorFeedback("fp16")
    with pytest.raises(CodecMismatchError) as info:
        other.load_state_dict(ef.state_dict())
    assert "'bf16'" in str(info.value) and "'fp16'" in str(info.value)
    assert len(other) == 0


@pytest.mark.parametrize("state", [{}, {"codec": "bf16"}, {"residuals": {}}, "bf16", None])
def test_malformed_state_is_refused(state):
    with pytest.raises(ConfigError):
        ErrorFeedback("bf16").load_state_dict(state)


# ------------------------------------------------------------------ the point of it all
def _running_sum_gap(codec: Codec | str, feedback: bool, steps: int = 60) -> tuple[float, float]:
    """``|sum inputs - sum decoded|`` after ``steps`` steps, and one input's norm."""
    ef = ErrorFeedback(codec)
    total_in = torch.zeros(2000, dtype=torch.float64)
    total_out = torch.zeros(2000, dtype=torch.float64)
    for step in range(steps):
        g = gaussian(2000, seed=step) + 0.3 * torch.linspace(-1, 1, 2000)
        packet = ef.encode(g, "w") if feedback else ef.codec.encode(g)
        total_in += g.double()
        total_out += ef.codec.decode(packet).double()
        if feedback:
            # The running sums differ by exactly the current residual.
            assert torch.allclose(total_in - total_out, _residual(ef, "w").double(), atol=1e-3)
    return float((total_in - total_out).norm()), float(g.norm())


@pytest.mark.parametrize(
    "codec",
    [
        pytest.param(ScaledSign(), id="scaled-sign"),
        pytest.param("sign", id="sign"),
    ],
)
def test_running_sum_of_decoded_tracks_running_sum_of_inputs(codec):
    with_ef, step_norm = _running_sum_gap(codec, feedback=True)
    without_ef, _ = _running_sum_gap(codec, feedback=False)
    # With error feedback the gap is one residual, bounded by about one step's size;
    # without it the bias of a 1-bit codec piles up step after step.
    assert with_ef < 2 * step_norm, (with_ef, step_norm)
    assert with_ef < 0.2 * without_ef, (with_ef, without_ef)


@pytest.mark.parametrize(
    "residuals, needle",
    [
        ([1, 2], "must be a dict"),
        (None, "must be a dict"),
        ({"a": [1.0]}, "must be a floating tensor, got list"),
        ({"a": torch.tensor([1, 2])}, "must be a floating tensor, got torch.int64"),
        ({"a": torch.tensor([float("nan")])}, "NaN or Inf"),
    ],
)
def test_load_state_dict_rejects_malformed_residuals_clearly(residuals, needle):
    ef = commpress.ErrorFeedback("sign")
    with pytest.raises(commpress.ConfigError, match=needle):
        ef.load_state_dict({"codec": "sign", "residuals": residuals})
    assert len(ef) == 0  # nothing half-loaded
