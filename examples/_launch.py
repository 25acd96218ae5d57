"""Shared launcher for the examples: torchrun if present, else local gloo ranks.

Under ``torchrun`` (``RANK`` in the environment) the function runs once, on
this rank. Launched plainly, ``launch`` starts ``world_size`` CPU processes
with a gloo process group each, so every example runs on a laptop.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    rank: int, world_size: int, init_method: str | None, fn: Callable[..., Any], args: Any
) -> None:
    torch.set_num_threads(1)
    if init_method is None:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        fn(dist.get_rank(), dist.get_world_size(), *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Run ``fn(rank, world_size, *args)`` on every rank, with a gloo group initialized."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, fn, args)
    else:
        init = f"tcp://127.0.0.1:{_free_port()}"
        # fork where the platform has it: the ranks start at once instead of importing
        # torch again (nothing here has started threads or a process group yet)
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(
            _run, args=(world_size, init, fn, args), nprocs=world_size, start_method=method
        )
