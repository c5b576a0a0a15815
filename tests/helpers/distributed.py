"""Multi-rank tests on one machine: `run_distributed_test` (after OLMo-core's helper of that name, in
src/olmo_core/testing/distributed.py) runs a function in world_size processes that share a process group.

The group meets at a TCPStore this process opens on a free port (port 0: the OS picks one, so tests running side by
side never collide); each rank's return value comes back pickled in full (tensors are copied, never shared memory
that dies with the rank), and a rank's exception comes back with its traceback.
"""

from __future__ import annotations

import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"
RAISE_GRACE_S = 5.0  # after a rank raised, how long the others may take to report theirs


class RankFailed(AssertionError):
    """A rank raised (its traceback is in the message), died without a word, or did not finish in time."""


def _run_rank(rank: int, world_size: int, backend: str, port: int, timeout_s: float, func: Callable, args: tuple,
              results) -> None:
    torch.set_num_threads(1)  # world_size ranks share the machine's cores
    try:
        store = dist.TCPStore(HOST, port, world_size + 1, is_master=False, timeout=timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            outcome = ("ok", func(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:
        outcome = ("error", traceback.format_exc())
    results.put((rank, pickle.dumps(outcome)))


def run_distributed_test(func: Callable[..., Any], world_size: int = 2, backend: str = "gloo", *,
                         func_args: tuple = (), timeout_s: float = 120.0) -> list[Any]:
    """Run `func(rank, world_size, *func_args)` in `world_size` spawned processes with a `backend` process group
    initialised, and return the ranks' return values in rank order. `func` must be a module-level function (spawned
    processes import it by name). Ranks that raise (every one that reports within RAISE_GRACE_S of the first, each
    with its remote traceback), a rank that dies, or ranks still running after `timeout_s` fail the test naming the
    rank; the other ranks are then killed, so none is left waiting in a collective."""
    context = mp.get_context("spawn")
    store = dist.TCPStore(HOST, 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    messages = context.Queue()
    processes = [
        context.Process(target=_run_rank, name=f"rank{rank}", daemon=True,
                        args=(rank, world_size, backend, store.port, timeout_s, func, func_args, messages))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    returned: dict[int, Any] = {}
    raised: dict[int, str] = {}  # rank -> traceback, in the order they arrived
    deadline = time.monotonic() + timeout_s
    grace_end = None
    try:
        while len(returned) + len(raised) < world_size:
            try:
                _receive(messages.get(timeout=0.2), returned, raised)
            except queue.Empty:
                if grace_end is None:
                    _check_progress(processes, messages, returned, raised, deadline, timeout_s)
            if raised and grace_end is None:
                # The rank that raised first is not always the first to report: its peers' collectives fail
                # ("Connection reset by peer") as soon as it tears its group down. Give every rank a moment to
                # report, then name all that raised, so the cause is in the message with its consequences.
                grace_end = time.monotonic() + RAISE_GRACE_S
            if grace_end is not None and time.monotonic() > grace_end:
                break
        if raised:
            raise RankFailed("\n".join(f"rank {rank} of {world_size} raised:\n{trace}"
                                        for rank, trace in raised.items()))
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [returned[rank] for rank in range(world_size)]


def _receive(message: tuple[int, bytes], returned: dict[int, Any], raised: dict[int, str]) -> None:
    rank, payload = message
    status, value = pickle.loads(payload)
    (raised if status == "error" else returned)[rank] = value


def _check_progress(processes, messages, returned: dict[int, Any], raised: dict[int, str], deadline: float,
                    timeout_s: float) -> None:
    """While no message comes: fail for a rank that exited without reporting, or once the deadline has passed."""
    world_size = len(processes)
    for rank, process in enumerate(processes):
        if rank not in returned and rank not in raised and process.exitcode is not None:
            try:  # its message may still be in flight
                _receive(messages.get(timeout=1.0), returned, raised)
                return
            except queue.Empty:
                raise RankFailed(f"rank {rank} of {world_size} exited with code {process.exitcode} without returning "
                                 "or raising (killed, or os._exit)") from None
    if time.monotonic() > deadline:
        pending = [rank for rank in range(world_size) if rank not in returned and rank not in raised]
        raise RankFailed(f"rank(s) {pending} of {world_size} did not finish within {timeout_s:g} s")
