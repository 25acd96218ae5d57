"""``codec="auto"`` re-calibrates when observed times drift from the model, on every rank
at the same call (multi-process gloo, world 2 and 3; nothing here is timed).

Each test replaces the observed seconds the call driver reports (`commpress.auto.observe`
as bound in `commpress.distributed.call`) with a multiple of the key's modelled seconds,
so that drift, or its absence, does not depend on how busy the machine is.
"""

from __future__ import annotations

import torch

import commpress.distributed as cdist
import commpress.distributed.call as call_module
from commpress import auto, calibration
from commpress.policy import Policy, using

EVERY = 8  # auto.DRIFT_EVERY here: 4 all_reduce and 4 all_gather calls a window
CALLS = 48  # iterations: 96 auto calls on the group


def _faked(scale: float):
    """``observe`` reporting ``scale`` x the decision's modelled seconds (at its bucket,
    or at half of it for a scale below 1, where the fast side of the check looks)."""
    real = auto.observe

    def observe(decision, seconds):
        track = auto._tracks.get(id(decision))
        if track is not None:
            real(decision, scale * (track.high_s if scale >= 1 else track.low_s))

    return observe


def _body(rank, world, scales, min_s, busy):
    """``CALLS`` auto calls (all_reduce and all_gather, 4 KiB and 1 KiB) with rank ``r``
    observing ``scales[r]`` x the model and ``auto.DRIFT_MIN_S = min_s``; returns what
    each rank re-calibrated and decided, and how many link measurements it made.

    ``busy``: an async int8 all-reduce is in flight on the group's engine queue while
    each iteration's auto calls are made (so a check goes behind it on a rank whose
    queue is still busy, straight to the backend on one whose queue is idle)."""
    saved = auto.DRIFT_EVERY, auto.DRIFT_MIN_S, call_module.observe
    auto.reset()
    auto.DRIFT_EVERY = EVERY
    auto.DRIFT_MIN_S = min_s
    call_module.observe = _faked(scales[rank])
    links = calibration.stats["link_measurements"]
    try:
        with using(Policy(codec="auto", min_bytes=0)):
            for i in range(CALLS):
                x = torch.full((1 << 10,), float(rank + i))
                cdist.all_reduce(x)
                assert torch.equal(x, torch.full_like(x, sum(r + i for r in range(world))))
                queued = torch.ones(1 << 16)  # the checks fall on the all_gathers
                work = cdist.all_reduce(queued, codec="int8", async_op=True) if busy else None
                out = torch.empty(world * 256)
                cdist.all_gather_into_tensor(out, torch.full((256,), float(rank)))
                if work is not None:
                    work.wait()
                    assert torch.allclose(queued, torch.full_like(queued, world), rtol=1e-2)
        recal = [
            (r.group, r.call, round(r.slow, 6), round(r.fast, 6)) for r in auto.recalibrations()
        ]
        decided = [(c.op, c.bucket, c.codec, c.algorithm) for c in auto.decisions()]
        return recal, decided, calibration.stats["link_measurements"] - links
    finally:
        auto.reset()
        auto.DRIFT_EVERY, auto.DRIFT_MIN_S, call_module.observe = saved


def _run(gloo, scales, min_s=0.0, busy=False):
    results = gloo.run(_body, scales, min_s, busy)
    recal, decided, _ = results[0]
    for other in results[1:]:
        assert other[:2] == (recal, decided), (results[0], other)  # same calls, same figures
    return results


def test_drift_on_every_rank_recalibrates_every_rank_at_the_same_call(gloo):
    scales = [3.0 + r for r in range(gloo.world_size)]
    results = _run(gloo, scales)
    recal, decided, links = results[0]
    # The check queued at call EVERY is read at call 2 * EVERY: the first re-calibration.
    assert recal and recal[0][1] == 2 * EVERY, recal
    # MIN over the ranks: the rank that drifted least sets the figure.
    assert recal[0][2] == 3.0 and recal[0][3] == 1.0, recal
    assert all(n == 1 + len(recal) for _, _, n in results)  # each one measured the link
    # The drift persists (the fake scales the new model too): each re-calibration that
    # the next check finds drifting still doubles the interval.
    assert [r[1] for r in recal] == [2 * EVERY, 4 * EVERY, 8 * EVERY], recal
    assert {op for op, *_ in decided} == {"all_reduce", "all_gather_into_tensor"}


def test_checks_keep_their_order_behind_queued_compressed_calls(gloo):
    scales = [3.0 + r for r in range(gloo.world_size)]
    recal, _, _ = _run(gloo, scales, busy=True)[0]  # _run: the same on every rank
    assert [r[1] for r in recal] == [2 * EVERY, 4 * EVERY, 8 * EVERY], recal


def test_faster_than_modelled_recalibrates_too(gloo):
    recal, _, _ = _run(gloo, [0.25] * gloo.world_size)[0]
    assert recal and recal[0][1] == 2 * EVERY and recal[0][3] == 4.0, recal


def test_no_drift_no_recalibration(gloo):
    for recal, _, links in _run(gloo, [1.0] * gloo.world_size):
        assert recal == [] and links == 1


def test_drift_within_the_factor_is_not_drift(gloo):
    for recal, _, links in _run(gloo, [0.9 * auto.DRIFT_FACTOR] * gloo.world_size):
        assert recal == [] and links == 1


def test_one_rank_waiting_for_a_late_peer_is_not_drift(gloo):
    # Only rank 0 sees its calls take 10x the model (what waiting for a late peer looks
    # like); the others do not, so the link is not slower: no rank re-calibrates.
    scales = [10.0] + [1.0] * (gloo.world_size - 1)
    for recal, _, links in _run(gloo, scales):
        assert recal == [] and links == 1


def test_keys_modelled_below_drift_min_s_do_not_count(gloo):
    # A key modelled below DRIFT_MIN_S is timed by the call's own fixed cost, which the
    # link model leaves out: its 5x is not drift. (Every key here is below 1e9 s.)
    for recal, _, links in _run(gloo, [5.0] * gloo.world_size, 1e9):
        assert recal == [] and links == 1
