"""Independent pieces of a benchmark run in worker processes, for the runs whose output is scores, not timings.

On a small CPU, N single-threaded processes get more work done than one process with N threads: a 135M model's
matmuls at batch 8-32 don't scale across OpenMP threads, and every parallel region waits for its slowest thread
(SmolLM2-135M under bf16 autocast, 2 cores: two 1-thread processes ran 19 % more training steps, batch 8 x 60
tokens, and 14 % more eval batches, 32 x 40, per second than one 2-thread process). Workers are spawned (no forked
torch state); each sets its thread count before it works.

    results = workers.map_jobs(run_cell, [(a, b), (c, d)], jobs=2, threads=1)   # in the order given
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["default_jobs", "map_jobs", "threads_per_job"]

LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def default_jobs(device: str, cells: int, threads: int) -> int:
    """Worker processes for `cells` independent pieces on `threads` torch threads' worth of CPU: one 1-thread worker
    per thread (at most `cells`); 1 on a GPU."""
    if device.startswith("cuda"):
        return 1
    return max(1, min(threads, cells))


def threads_per_job(threads: int, jobs: int) -> int:
    """The torch threads each of `jobs` workers gets out of `threads`."""
    return max(1, threads // jobs)


def _start_worker(threads: int, quiet: Callable[[], None] | None) -> None:
    from benchmarks.common import machine

    machine.prepare_environment()
    machine.set_threads(threads)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if quiet is not None:
        quiet()


def map_jobs(
    fn: Callable[..., Any],
    arguments: Sequence[tuple],
    jobs: int,
    threads: int,
    quiet: Callable[[], None] | None = None,
) -> list[Any]:
    """`fn(*args)` for every `args` in `arguments`, results in that order. `jobs` <= 1 runs them here, in order;
    otherwise in `jobs` spawned processes with `threads` torch threads each, taking work in the order given (put
    the longest first). `fn` and its arguments must pickle (module-level functions, plain data)."""
    if jobs <= 1:
        return [fn(*args) for args in arguments]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(threads, quiet)) as pool:
        futures = [pool.submit(fn, *args) for args in arguments]
        return [f.result() for f in futures]
