"""tests/helpers/distributed.py: ranks share a gloo group and return in rank order; a rank's exception, death or
hang fails the test naming it (the exception with its traceback) instead of hanging the suite."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from helpers.distributed import RankFailed, run_distributed_test


def _sum_ranks(rank: int, world_size: int, offset: int) -> tuple[int, int, float]:
    value = torch.tensor([float(rank + offset)])
    dist.all_reduce(value)
    return rank, dist.get_world_size(), value.item()


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes: the helper must stop it


def _exit_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)
    time.sleep(60)


def test_ranks_share_a_group_and_return_in_rank_order():
    assert run_distributed_test(_sum_ranks, world_size=2, func_args=(10,)) == [(0, 2, 21.0), (1, 2, 21.0)]


def _hang_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(60)


def test_a_ranks_exception_fails_with_its_traceback():
    started = time.monotonic()
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 raised:.*_fail_on_rank_one.*planted failure on rank 1"):
        run_distributed_test(_fail_on_rank_one, timeout_s=180)
    # Rank 0, blocked in a barrier, was killed, not waited for until the timeout. Half the timeout, not a few
    # seconds: spawning two ranks that import torch took 42 s on a machine at load 14 (the drift check's run).
    assert time.monotonic() - started < 90


def _fail_on_both_ranks_rank_one_later(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(1.0)  # the cause reports after its consequence, as when a peer's collective fails first
        raise ValueError("planted cause on rank 1")
    raise RuntimeError("planted consequence on rank 0")


def test_every_rank_that_raised_is_named_not_only_the_first_to_report():
    with pytest.raises(RankFailed) as failure:
        run_distributed_test(_fail_on_both_ranks_rank_one_later, timeout_s=60)
    message = str(failure.value)
    assert "rank 0 of 2 raised:" in message and "planted consequence on rank 0" in message
    assert "rank 1 of 2 raised:" in message and "planted cause on rank 1" in message


def test_a_rank_that_dies_silently_is_named():
    with pytest.raises(RankFailed, match="rank 1 of 2 exited with code 3 without returning or raising"):
        run_distributed_test(_exit_on_rank_one, timeout_s=60)


def test_ranks_past_the_timeout_are_named():
    started = time.monotonic()
    # Rank 1 at least (rank 0 too if spawning took the whole time on a loaded machine).
    with pytest.raises(RankFailed, match=r"rank\(s\) \[(0, )?1\] of 2 did not finish within 10 s"):
        run_distributed_test(_hang_on_rank_one, timeout_s=10)
    assert time.monotonic() - started < 30
