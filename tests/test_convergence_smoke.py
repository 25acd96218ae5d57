"""Smoke test of the convergence study (benchmarks/bench_convergence.py) on a tiny config."""

from __future__ import annotations

import math

import torch

import commpress.bench.convergence as conv
from commpress.testing.dist import DistPool


def test_data_is_stdlib_text_and_batches_are_reproducible():
    cfg = conv.TINY
    train, held = conv.stdlib_text(cfg.train_bytes, cfg.heldout_bytes)
    assert train.dtype == torch.uint8 and train.numel() == cfg.train_bytes
    assert held.numel() > 0
    assert b"import" in bytes(train[:20000].tolist())
    x1, y1 = conv.batch_at(train, cfg, step=3, rank=1)
    x2, y2 = conv.batch_at(train, cfg, step=3, rank=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (cfg.batch, cfg.context)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next byte
    assert not torch.equal(conv.batch_at(train, cfg, 3, 0)[0], x1)  # ranks see different data


def test_tiny_training_on_two_ranks_is_reproducible_and_codecs_stay_close():
    with DistPool(2) as pool:
        fp32 = pool.run(conv.train, "fp32", conv.TINY)
        again = pool.run(conv.train, "fp32", conv.TINY)[0]
        int8 = pool.run(conv.train, "int8", conv.TINY)[0]
        ef_sign = pool.run(conv.train, "ef-sign", conv.TINY)[0]
    assert fp32[0] == fp32[1]  # every rank reports the same row
    ref = fp32[0]
    assert again["curve"] == ref["curve"]  # same seed, same data order
    for row in (ref, int8, ef_sign):
        assert len(row["curve"]) == conv.TINY.steps
        assert math.isfinite(row["final_train_loss"]) and math.isfinite(row["heldout_loss"])
        assert row["step_ms"] > 0
    assert ref["curve"][-1] < ref["curve"][0]  # it learns
    assert abs(int8["final_train_loss"] / ref["final_train_loss"] - 1) < 0.05


def test_an_unknown_method_is_a_row_not_a_crash():
    codec, hook = conv.run_methods(["no_such_codec", "torch:nope"], conv.TINY, link="none")
    assert codec["status"].startswith("error: ") and "no_such_codec" in codec["status"]
    assert hook["status"].startswith("error: unknown torch hook")


def test_a_dead_run_is_reported_with_its_abort_message():
    # What torch's powerSGD_hook leaves on stderr when gloo aborts the process.
    output = (
        "terminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
        "  what():  [enforce fail at pair.cc:456] op.preamble.length <= op.nbytes. 6144 vs "
        "1536. Received data size doesn't match expected size.\n"
        "torch.multiprocessing.spawn.ProcessExitedException: process 1 terminated with SIGABRT\n"
    )
    message = conv._error_line(output)
    assert message.startswith("process aborted: gloo::EnforceNotMet: op.preamble")
    assert "doesn't match" in message
