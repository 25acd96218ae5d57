"""Issue 12, below the face: hostile wire buffers end in a `CommpressError` before the
decoder allocates past the decode bound, and spec strings outside the grammar are refused
with a message that names the problem.

The property-based fuzz at the end runs ``COMMPRESS_FUZZ_EXAMPLES`` examples per test
(200 by default, as in CI); see "Failure modes" in docs/collectives.md for a longer run.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import commpress
from commpress import wire
from commpress.codec import CODE_DTYPES, Packet, PacketMeta
from commpress.errors import CommpressError, ConfigError, WireError
from commpress.testing import gaussian
from commpress.wire import packet as packet_module
from commpress.wire.pipeline import PIPELINE_MAGIC, PIPELINE_WORDS, PipelineHeader

#: One spec per codec family the decode bound must hold for.
FAMILIES = [
    "none",
    "fp16",
    "bf16",
    "fp8",
    "fp8_e5m2",
    "int8",
    "int4",
    "int2",
    "sign",
    "topk:ratio=1e-09",
    "randomk:ratio=1e-09",
    "lz4",
    "zstd",
    "powersgd:rank=1",
    "int8+zstd",
]


def _encoded(spec: str, shape: tuple[int, ...] = (4, 8)) -> tuple[commpress.Codec, Packet]:
    codec = commpress.get_codec(spec)
    return codec, codec.encode(gaussian(shape, torch.float32, seed=1))


def _reframed(
    codec: commpress.Codec,
    packet: Packet,
    shape: tuple[int, ...],
    payload: tuple[torch.Tensor, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The wire buffer of ``packet``'s sections (or ``payload``) under another header."""
    meta = PacketMeta(torch.Size(shape), dtype, codec.spec, codec.config_hash)
    return wire.pack(Packet(packet.payload if payload is None else payload, meta))


def _unpack_decode(buf: torch.Tensor, codec: commpress.Codec | None, **kw) -> torch.Tensor:
    packet = wire.unpack(buf, codec, **kw)
    return commpress.get_codec(packet.meta.spec).decode(packet)


# ------------------------------------------------------------ foreign exceptions
@pytest.mark.parametrize("expected", [False, True], ids=["header codec", "expected codec"])
def test_chain_index_section_of_the_wrong_dtype_is_a_wire_error(expected):
    # Was TypeError (slice indices must be integers) in codecs/chain.py.
    codec, packet = _encoded("int8+zstd")
    payload = (packet.payload[0].double(), *packet.payload[1:])
    buf = _reframed(codec, packet, tuple(packet.shape), payload)
    with pytest.raises(WireError, match="int64 index section"):
        _unpack_decode(buf, codec if expected else None)


@pytest.mark.parametrize("spec", FAMILIES)
@pytest.mark.parametrize("expected", [False, True], ids=["header codec", "expected codec"])
def test_zero_element_shape_whose_strides_overflow_is_a_wire_error(spec, expected):
    # 0 elements, but torch's strides multiply 2 * 2**62: was RuntimeError in view().
    codec, packet = _encoded(spec, (0,))
    buf = _reframed(codec, packet, (0, 2, 2**62, 0))
    with pytest.raises(WireError, match="absurdly large"):
        _unpack_decode(buf, codec if expected else None)


def test_pipeline_header_with_overflowing_strides_is_a_wire_error():
    dims = [0, 2, 2**62] + [0] * (PIPELINE_WORDS - 6)
    words = torch.tensor([PIPELINE_MAGIC, 8, 3, *dims], dtype=torch.int64)
    with pytest.raises(WireError, match="malformed"):
        PipelineHeader.from_tensor(words)


# ------------------------------------------------------------ the decode bound
@pytest.mark.parametrize("spec", FAMILIES)
def test_a_small_buffer_cannot_declare_a_big_output_when_the_header_names_the_codec(
    spec, monkeypatch
):
    codec, packet = _encoded(spec)
    buf = _reframed(codec, packet, (2**28,))  # 1 GiB of float32 from a few hundred bytes

    def no_decode(*args, **kwargs):
        raise AssertionError("the decoder ran; the bound must refuse the buffer before")

    monkeypatch.setattr(type(codec), "_decode", no_decode)
    monkeypatch.setattr(type(codec), "_decode_into", no_decode)
    with pytest.raises(WireError, match="decode limit") as info:
        wire.unpack(buf)
    assert f"{buf.numel()} bytes" in str(info.value) and "1073741824 bytes" in str(info.value)


def test_the_88_byte_topk_buffer_of_the_issue():
    codec, packet = _encoded("topk:ratio=1e-09", (1,))
    buf = _reframed(codec, packet, (2**28,))
    assert buf.numel() == 88
    with pytest.raises(WireError, match="1024x the buffer"):
        wire.unpack(buf)


@pytest.mark.parametrize("spec", FAMILIES)
def test_the_explicit_cap_holds_with_the_expected_codec(spec):
    codec, packet = _encoded(spec)
    buf = _reframed(codec, packet, (2**26,))  # 256 MiB of float32
    with pytest.raises(WireError, match="max_decode_bytes"):
        wire.unpack(buf, codec, max_decode_bytes=64 << 20)


def test_the_default_cap_and_its_environment_override(monkeypatch):
    codec, packet = _encoded("topk:ratio=1e-09", (1,))
    buf = _reframed(codec, packet, (2**33,))  # 32 GiB of float32, over the 16 GiB default
    assert packet_module.default_max_decode_bytes() == packet_module.MAX_DECODE_BYTES == 1 << 34
    with pytest.raises(WireError, match="over the decode limit of 17179869184 bytes"):
        wire.unpack(buf, codec)
    monkeypatch.setenv("COMMPRESS_MAX_DECODE_BYTES", "1MiB")
    with pytest.raises(WireError, match="decode limit of 1048576 bytes"):
        wire.unpack(_reframed(codec, packet, (2**19,)), codec)
    monkeypatch.setenv("COMMPRESS_MAX_DECODE_BYTES", "lots")
    with pytest.raises(ConfigError, match="COMMPRESS_MAX_DECODE_BYTES='lots'"):
        wire.unpack(buf, codec)
    with pytest.raises(ConfigError, match="max_decode_bytes must be an int"):
        wire.unpack(buf, codec, max_decode_bytes=1.5)  # type: ignore[arg-type]


def test_a_legitimate_expansion_past_the_factor_needs_the_expected_codec():
    zstd = commpress.get_codec("zstd")
    x = torch.zeros(4 << 20)  # 16 MiB of zeros: a few hundred bytes of blosc2 chunks
    buf = wire.pack(zstd.encode(x))
    assert buf.numel() * packet_module.MAX_EXPANSION + packet_module.EXPANSION_SLACK < 16 << 20
    with pytest.raises(WireError, match="pass the expected codec"):
        wire.unpack(buf)
    assert torch.equal(zstd.decode(wire.unpack(buf, zstd)), x)


@pytest.mark.parametrize("spec", FAMILIES)
def test_honest_buffers_decode_within_the_bound(spec):
    codec, packet = _encoded(spec, (64, 32))
    buf = wire.pack(packet)
    out = _unpack_decode(buf, None)
    limit = packet_module.MAX_EXPANSION * buf.numel() + packet_module.EXPANSION_SLACK
    assert out.shape == (64, 32) and out.numel() * out.element_size() <= limit


@pytest.mark.parametrize("spec", ["topk:ratio=1e-09", "randomk:ratio=1e-09"])
def test_sparse_buffers_must_carry_the_k_their_ratio_gives(spec):
    # Within the bound (512 KiB), but k = ceil(1e-9 * 2**17) is 1 value, not 2: refused by
    # the codec's exact section check before it allocates the output.
    codec, packet = _encoded(spec, (4,))
    values, rest = packet.payload
    buf = _reframed(codec, packet, (2**17,), (torch.cat([values, values]), rest))
    with pytest.raises(WireError, match="malformed packet"):
        _unpack_decode(buf, None)


# ------------------------------------------------------------ spec strings
@pytest.mark.parametrize("spec", [" int8", "int8 ", "int8: block=128", "int8:block =128", "a\tb"])
def test_specs_with_whitespace_are_refused(spec):
    with pytest.raises(ConfigError, match="contains whitespace") as info:
        commpress.get_codec(spec)
    assert repr(spec) in str(info.value)
    assert repr("".join(spec.split())) in str(info.value)


@pytest.mark.parametrize("raw", ["yes", "no", "on", "off", "True", "2", ""])
def test_boolean_codec_parameters_take_0_1_true_false_only(raw):
    spec = f"int8:stochastic={raw}"
    with pytest.raises(ConfigError) as info:
        commpress.get_codec(spec)
    if raw:
        assert "stochastic='" + raw + "' is not a valid bool" in str(info.value)
        assert "0, 1, true, false" in str(info.value)
    with pytest.raises(ConfigError):
        commpress.get_codec({"id": "int8", "stochastic": raw})


@pytest.mark.parametrize(
    "raw, value", [("1", True), ("true", True), ("0", False), ("false", False)]
)
def test_boolean_codec_parameters_in_the_grammar(raw, value):
    assert commpress.get_codec(f"int8:stochastic={raw}").stochastic is value


# ------------------------------------------------------------ property-based fuzz
FUZZ = settings(
    max_examples=int(os.environ.get("COMMPRESS_FUZZ_EXAMPLES", "200")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: The fuzz decodes under this cap, so that a decoder that ignored the bound would show as
#: an output over it rather than exhaust the machine.
FUZZ_CAP = 64 << 20
FUZZ_SPECS = [*FAMILIES, "topk:ratio=0.5", "randomk:ratio=0.5,unbiased=1", "bf16+lz4", "fp8+zstd"]
DIMS = st.one_of(
    st.integers(0, 70), st.sampled_from([2**20, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1])
)
WIRE_DTYPES = sorted(CODE_DTYPES.values(), key=str)


def _retype(section: torch.Tensor, dtype: torch.dtype, cut: int) -> torch.Tensor:
    raw = section.contiguous().view(torch.uint8)
    raw = raw[: max(0, raw.numel() - cut)]
    return raw[: raw.numel() - raw.numel() % dtype.itemsize].clone().view(dtype)


@FUZZ
@given(
    spec=st.sampled_from(FUZZ_SPECS),
    data_shape=st.lists(st.integers(0, 9), max_size=3),
    header_shape=st.none() | st.lists(DIMS, max_size=4),
    header_dtype=st.sampled_from(WIRE_DTYPES),
    edits=st.lists(
        st.tuples(st.integers(0, 7), st.sampled_from(WIRE_DTYPES), st.integers(0, 9)), max_size=3
    ),
    drop=st.integers(0, 3),
    expected=st.booleans(),
)
def test_fuzz_reframed_packets_raise_only_commpress_errors(
    spec, data_shape, header_shape, header_dtype, edits, drop, expected
):
    """Honest sections under a hostile header: retyped, cut, dropped, any shape and dtype."""
    codec = commpress.get_codec(spec)
    packet = codec.encode(gaussian(tuple(data_shape), torch.float32, seed=len(data_shape)))
    payload = list(packet.payload)
    for which, dtype, cut in edits:
        if payload:
            i = which % len(payload)
            payload[i] = _retype(payload[i], dtype, cut)
    payload = payload[: max(0, len(payload) - drop % 2)] if drop else payload
    shape = tuple(packet.shape) if header_shape is None else tuple(header_shape)
    meta = PacketMeta(torch.Size(shape), header_dtype, codec.spec, codec.config_hash)
    try:
        buf = wire.pack(Packet(tuple(payload), meta))
    except WireError:
        return
    try:
        out = _unpack_decode(buf, codec if expected else None, max_decode_bytes=FUZZ_CAP)
    except CommpressError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("decoded")
    limit = FUZZ_CAP
    if not expected:
        limit = min(
            limit, packet_module.MAX_EXPANSION * buf.numel() + packet_module.EXPANSION_SLACK
        )
    assert out.shape == shape and out.dtype == header_dtype
    assert out.numel() * out.element_size() <= limit


@FUZZ
@given(
    spec=st.sampled_from(FUZZ_SPECS),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    expected=st.booleans(),
)
def test_fuzz_flipped_bytes_raise_only_commpress_errors(spec, edits, expected):
    codec = commpress.get_codec(spec)
    raw = bytearray(wire.pack(codec.encode(gaussian((5, 13), torch.float32, seed=3))).numpy())
    for pos, value in edits:
        raw[pos % len(raw)] = value
    buf = torch.frombuffer(raw, dtype=torch.uint8)
    try:
        out = _unpack_decode(buf, codec if expected else None, max_decode_bytes=FUZZ_CAP)
    except CommpressError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("decoded")
    assert out.numel() * out.element_size() <= FUZZ_CAP


# ------------------------------------------------------- ranks that disagree
def _uneven_chunks(rank: int, world: int, chunk_bytes: list[int], spec: str) -> str:
    import torch

    import commpress.distributed as cdist
    from commpress.engine import Engine, set_engine
    from commpress.errors import CommpressError

    set_engine(Engine(chunk_bytes=chunk_bytes[rank]))
    try:
        cdist.all_reduce(torch.randn(4 << 20), codec=spec)  # 16 MiB
        return "no error"
    except CommpressError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        set_engine(None)


@pytest.mark.parametrize(
    "chunk_bytes, spec",
    [([1 << 20, 0], "int8"), ([1 << 20, 2 << 20], "int8"), ([0, 1 << 20], "bf16")],
    ids=["chunked-vs-whole", "two-chunk-sizes", "bf16-direct"],
)
def test_ranks_that_cut_a_call_differently_raise_on_every_rank(gloo2, chunk_bytes, spec):
    """Engines with different chunk_bytes used to abort the process in gloo (SIGABRT on
    one rank); the descriptor now carries the chunking and every rank raises."""
    for got in gloo2.run(_uneven_chunks, chunk_bytes, spec):
        assert got.startswith("CollectiveError") and "chunk" in got, got


# ------------------------------------------------------ unclear or missing errors
def _argument_errors(rank: int, world: int) -> dict[str, str]:
    import warnings

    import torch
    import torch.distributed as dist

    import commpress.distributed as cdist
    from commpress.errors import CommpressError
    from commpress.policy import Policy, using

    got: dict[str, str] = {}
    try:
        cdist.all_reduce(torch.ones(8), op="sum", codec="int8")
    except TypeError as exc:
        got["op"] = str(exc)
    with using(Policy(min_bytes=0)):
        for who in ("both", "rank0"):
            on_meta = who == "both" or rank == 0
            t = torch.empty(1000, device="meta") if on_meta else torch.ones(1000)
            try:
                cdist.all_reduce(t, codec="int8")
                got[who] = "no error"
            except CommpressError as exc:
                got[who] = f"{type(exc).__name__}: {exc}"
    only_rank0 = dist.new_group([0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = cdist.all_reduce(torch.ones(8), group=only_rank0, async_op=True, codec="int8")
    if rank == 1:
        got["outside"] = f"{handle} " + "; ".join(str(w.message) for w in caught)
    dist.barrier()
    return got


def test_bad_op_meta_tensors_and_foreign_groups_are_told_like_torch(gloo2):
    for rank, got in enumerate(gloo2.run(_argument_errors)):
        assert "ReduceOp" in got["op"] and "'sum'" in got["op"], got
        assert "meta tensor" in got["both"], got  # blamed before anything is sent
        # Only rank 0 passed a meta tensor: it says so, its peer learns it was rejected.
        assert got["rank0"].startswith("CollectiveError"), got
        if rank == 0:
            assert "meta tensor" in got["rank0"], got
        else:
            assert "rank(s) [0]" in got["rank0"], got
            assert got["outside"].startswith("None ") and "does not belong" in got["outside"]


# ------------------------------------------------------ bad input on one rank only
def _one_bad_rank(rank: int, world: int, case: str) -> str:
    import torch

    import commpress.distributed as cdist
    from commpress.errors import CommpressError

    bad = rank == world - 1
    n = 3 * 2 * 4096  # 96 KiB (over the default min_bytes), divisible by world sizes 2 and 3
    x = torch.randn(n)
    try:
        if case == "output-too-small":
            cdist.all_gather_into_tensor(
                torch.empty(world * n - (8 if bad else 0)), x, codec="int8"
            )
        elif case == "output-dtype":
            out = torch.empty(world * n, dtype=torch.float64 if bad else torch.float32)
            cdist.all_gather_into_tensor(out, x, codec="int8")
        elif case == "short-list":
            cdist.all_gather([torch.empty(n) for _ in range(world - bad)], x, codec="int8")
        elif case == "entry-shape":
            outs = [torch.empty(n) for _ in range(world)]
            if bad:
                outs[0] = torch.empty(n + 5)
            cdist.all_gather(outs, x, codec="int8")
        elif case == "reduce-scatter-output":
            cdist.reduce_scatter_tensor(torch.empty(n // world + 3 * bad), x, codec="int8")
        elif case == "split-sizes":
            splits = [n // world] * world
            if bad:
                splits[0] += 7
            cdist.all_to_all_single(torch.empty(n), x, input_split_sizes=splits, codec="int8")
        return "no error"
    except CommpressError as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize(
    "case, problem",
    [
        ("output-too-small", "output_tensor has"),
        ("output-dtype", "torch.float64"),
        ("short-list", "tensor_list must hold"),
        ("reduce-scatter-output", "must hold world_size"),
        ("split-sizes", "input_split_sizes="),
    ],
)
def test_bad_input_on_one_rank_is_named_with_its_problem_on_every_rank(gloo, case, problem):
    """The bad rank raises its argument error; every peer raises at once too, naming the
    rank and what was wrong there (it used to learn only that the rank rejected)."""
    results = gloo.run(_one_bad_rank, case)
    world = len(results)
    assert results[-1].startswith("CollectiveError") and problem in results[-1], results[-1]
    for got in results[:-1]:
        assert got.startswith("CollectiveError"), got
        assert f"rank(s) [{world - 1}]" in got and f"rank {world - 1}: " in got, got
        assert problem in got, got


def test_a_wrong_entry_for_another_rank_fails_on_that_rank_only(gloo):
    """A list all_gather may gather pieces of different sizes, so an entry shaped unlike
    its rank's piece is found when the pieces' sizes are known (after the descriptors):
    the bad rank raises naming the entry's rank and both sizes; its peers, whose
    arguments were right, complete (every rank made the same collectives)."""
    results = gloo.run(_one_bad_rank, "entry-shape")
    assert results[-1].startswith("CollectiveError"), results[-1]
    assert "from rank 0 where 24581 were expected" in results[-1], results[-1]
    assert results[:-1] == ["no error"] * (len(results) - 1)
