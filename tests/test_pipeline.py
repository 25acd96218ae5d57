"""Pipeline send/recv of activations and gradients between 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

import commpress
from commpress import pipeline as pp
from commpress.errors import ConfigError, WireError
from commpress.testing import DistPool
from commpress.wire.pipeline import PIPELINE_WORDS, PipelineHeader


@pytest.fixture(scope="module")
def pool():
    with DistPool(2) as p:
        yield p


def _activation(shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(shape))
    return (torch.randn(shape, generator=g) * 3).to(dtype)


CASES = [
    ((4, 8, 128), torch.float32, "fp8"),
    ((16, 256), torch.bfloat16, "int8"),
    ((3, 5, 7), torch.float32, "none"),
    ((0, 64), torch.float32, "fp8"),
    ((10,), torch.int64, "fp8"),  # integer data travels losslessly whatever the codec
]


def _exchange(rank, world):
    from commpress.policy import using

    got = []
    with using(min_bytes=0):
        for shape, dtype, codec in CASES:
            t = _activation(shape, dtype) if dtype != torch.int64 else torch.arange(10)
            if rank == 0:
                pp.send_activation(t, 1, codec=codec)  # forward: activation
                got.append(pp.recv_activation(1, codec=codec))  # backward: its gradient
            else:
                h = pp.recv_activation(0, codec=codec)
                got.append(h)
                pp.send_activation(h * 2 if h.is_floating_point() else h, 0, codec=codec)
        # async: both sides post at once, in the order a 1F1B schedule does
        out = torch.empty(8, 128)
        peer = 1 - rank
        recv = pp.irecv_activation(peer, out=out, codec="fp8")
        send = pp.isend_activation(_activation((8, 128)) + rank, peer, codec="fp8")
        send.wait()
        recv.wait()
        got.append(recv.result()[0])
    return got


def test_send_recv_shapes_dtypes_and_bounds(pool):
    got0, got1 = pool.run(_exchange)
    for i, (shape, dtype, codec) in enumerate(CASES):
        c = commpress.get_codec(codec)
        sent = _activation(shape, dtype) if dtype != torch.int64 else torch.arange(10)
        assert got1[i].shape == torch.Size(shape) and got1[i].dtype == dtype
        assert got0[i].shape == torch.Size(shape) and got0[i].dtype == dtype
        if not dtype.is_floating_point:
            assert torch.equal(got1[i], sent) and torch.equal(got0[i], sent)
            continue
        first = (got1[i].float() - sent.float()).abs()
        assert (first <= c.error_bound(sent) + 1e-6).all(), (shape, codec)
        second = (got0[i].float() - 2 * got1[i].float()).abs()
        assert (second <= c.error_bound(2 * got1[i]) + 1e-6).all(), (shape, codec)
    fp8 = commpress.get_codec("fp8")
    for rank, got in ((0, got0), (1, got1)):
        sent = _activation((8, 128)) + (1 - rank)
        assert ((got[-1] - sent).abs() <= fp8.error_bound(sent) + 1e-6).all()


def _mismatch(rank, world):
    try:
        if rank == 0:
            pp.send_activation(torch.randn(4, 4), 1, codec="none")
            return None
        # same byte size as what is sent: the payload matches, the header check must catch it
        pp.irecv_activation(0, out=torch.empty(2, 8), codec="none").wait()
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_receiver_with_wrong_out_gets_a_clear_error(pool):
    res = pool.run(_mismatch)
    assert "(4, 4)" in res[1] and "(2, 8)" in res[1]


def test_too_many_dimensions_raise_before_sending():
    with pytest.raises(ConfigError, match="dimensions"):
        PipelineHeader.for_tensor(torch.zeros([1] * (pp.MAX_NDIM + 1)))


@pytest.mark.parametrize(
    "shape, dtype", [((4, 8, 128), torch.float32), ((0, 64), torch.bfloat16), ((), torch.int64)]
)
def test_pipeline_header_round_trip(shape, dtype):
    header = PipelineHeader.for_tensor(torch.zeros(shape, dtype=dtype))
    words = header.to_tensor(torch.device("cpu"))
    assert words.dtype == torch.int64 and words.shape == (PIPELINE_WORDS,)
    assert PipelineHeader.empty(torch.device("cpu")).shape == words.shape
    assert PipelineHeader.from_tensor(words) == header
    assert header.shape == torch.Size(shape) and header.dtype == dtype


@pytest.mark.parametrize(
    "word, value, message",
    [
        (0, 7, "not a commpress pipeline header"),
        (1, 200, "dtype code"),
        (2, pp.MAX_NDIM + 1, "ndim"),
        (2, -1, "ndim"),
        (3, -4, "dims"),
        (7, 1, "dims"),  # a dim past ndim
        (4, 1 << 40, "dims"),  # 4 * 2**40 * 128 elements: never allocated
    ],
)
def test_malformed_pipeline_headers_raise_wire_error(word, value, message):
    words = PipelineHeader.for_tensor(torch.zeros(4, 8, 128)).to_tensor(torch.device("cpu"))
    words[word] = value
    with pytest.raises(WireError, match=message):
        PipelineHeader.from_tensor(words)
    for bad in (words[:-1], words.int()):
        with pytest.raises(WireError, match="int64 words"):
            PipelineHeader.from_tensor(bad)
