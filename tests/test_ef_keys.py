"""Automatic error-feedback keys: stable across a move of the code, one per tensor in a loop."""

from __future__ import annotations

import torch

from commpress.testing import DistPool


def _loop_over_layers(rank, world_size, steps, set_to_none):
    import commpress.distributed as cdist
    from commpress.policy import using

    cdist.reset_error_feedback()
    with using(min_bytes=0):
        _train(cdist, steps, set_to_none)
    return list(cdist.error_feedback("sign").state_dict()["residuals"])


def _train(cdist, steps, set_to_none):
    params = [torch.nn.Parameter(torch.zeros(4096)) for _ in range(3)]
    for step in range(steps):
        for i, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.full((4096,), float(i + 1 + step))
            else:
                p.grad.fill_(i + 1 + step)
        for p in params:  # one call site, three tensors of one shape
            cdist.all_reduce(p.grad, codec="sign")
        for p in params:
            if set_to_none:
                p.grad = None


def test_one_residual_per_tensor_of_a_loop_stable_across_steps_and_paths():
    with DistPool(2) as pool:
        for set_to_none in (True, False):
            for keys in pool.run(_loop_over_layers, 3, set_to_none):
                assert len(keys) == 3, keys  # three streams, not one shared, not one per step
                sites = {k[4] for k in keys}
                assert sites == {"test_ef_keys:_train+9"}, sites
                assert sorted(k[-1] for k in keys) == [0, 1, 2]
                # no absolute path: a checkpoint loads in another checkout
                assert not any("/" in str(part) for k in keys for part in k)
