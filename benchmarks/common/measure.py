"""Measuring: time (wall and CPU), spreads and paired ratios, peak memory, FLOPs and op counts, live bytes.

Timing on a shared machine: compare methods by RATIOS measured in the same rounds. `interleaved` runs every
callable once per round, rotating the order each round (so no method always runs first or right after the same
neighbour), and `paired_ratio` divides the two methods' times round by round, so a slow minute slows both sides of
each ratio. Its `Spread` (min / median / max over the rounds) says how far to trust it; a ratio whose rounds
disagree by more than `NOISY` (10 %) of its median is flagged noisy. Each `Sample` carries wall-clock seconds and
process CPU seconds (`time.process_time`: all threads of this process, not the time spent waiting to be scheduled).

    samples = measure.interleaved([run_lora, run_ours], rounds=7, warmup=1)
    ratio = measure.paired_ratio(samples[1], samples[0], clock="cpu")      # ours / LoRA per round
    print(ratio.median, ratio.min, ratio.max, ratio.noisy())

API:

- `Sample(wall, cpu)`; `timed(fn, device)` -> Sample of one call (CUDA synchronised on both sides).
- `interleaved(fns, rounds, device="cpu", warmup=0, budget_s=None, min_rounds=1, on_run=None, prepare=None)` -> one
  list of Samples per callable. ``budget_s``: no new round once the timed rounds took this long (never fewer than
  ``min_rounds``). ``on_run`` is called after every run (progress bars); ``prepare[i]`` runs untimed before every
  run of ``fns[i]``.
- `Spread.of(values)`: min / median / max / n; ``rel_range`` = (max - min) / median; ``noisy(threshold=NOISY)``;
  ``to_dict()``. `spread(samples, clock)` of a task's own times; `paired_ratio(num, den, clock)` round-wise.
- `step_peak_bytes(fn, device)` -> (fn's result, peak bytes allocated above the level at the start). CUDA:
  ``max_memory_allocated``. CPU: torch.profiler allocator events (``profile_memory=True``) replayed in time order;
  unlike RSS it ignores what glibc keeps and what else lives in the process; it misses oneDNN scratch and Python
  objects (small).
- `PeakMemory(device, interval_s=0.02)`: context manager, ``.peak`` = bytes above the level at entry: CUDA allocator
  peak, or on CPU the RSS sampled every ``interval_s`` (coarse; for long blocks such as a training loop).
- `count_work(fn)` -> (FLOPs by torch.utils.flop_counter, with the CPU flash-attention kernel added; aten ops
  dispatched). Deterministic: the structural cost, whatever the machine's load.
- `tensor_bytes(tensors)` (distinct storages counted once), `persistent_bytes(model, optimizer)` (parameters,
  buffers and optimizer state).
- `seeded(seed)`: context manager seeding python, numpy (if present) and torch, restoring torch's CPU RNG after.
- `profile_table(fn, device, row_limit=25, sort_by="self_cpu_time_total")`: torch.profiler table of one call.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "NOISY",
    "PeakMemory",
    "Sample",
    "Spread",
    "count_work",
    "interleaved",
    "paired_ratio",
    "paired_ratios",
    "persistent_bytes",
    "profile_table",
    "seeded",
    "spread",
    "step_peak_bytes",
    "sync",
    "tensor_bytes",
    "timed",
]

NOISY = 0.10  # a ratio whose rounds span more than this fraction of its median is flagged


@dataclass(frozen=True)
class Sample:
    """One timed call: wall-clock seconds and process CPU seconds (all threads)."""

    wall: float
    cpu: float

    def clock(self, name: str) -> float:
        return self.wall if name == "wall" else self.cpu


def sync(device: Any) -> None:
    """Wait for queued GPU work so a timer brackets the work itself, not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any = "cpu") -> Sample:
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return Sample(time.perf_counter() - wall, time.process_time() - cpu)


def interleaved(
    fns: Sequence[Callable[[], Any]],
    rounds: int,
    device: Any = "cpu",
    warmup: int = 0,
    budget_s: float | None = None,
    min_rounds: int = 1,
    on_run: Callable[[], None] | None = None,
    prepare: Sequence[Callable[[], Any] | None] | None = None,
) -> list[list[Sample]]:
    """`warmup` untimed runs of each callable, then up to `rounds` timed rounds, each running every callable once
    in an order rotated by one place per round. Returns the Samples of each callable, in round order.
    `prepare[i]` (optional) runs untimed before every run of `fns[i]` (e.g. switching a shared model's mode)."""
    hooks = list(prepare) if prepare is not None else [None] * len(fns)

    def run(i: int) -> None:
        if hooks[i] is not None:
            hooks[i]()

    for i, fn in enumerate(fns):
        for _ in range(warmup):
            run(i)
            fn()
            if on_run:
                on_run()
    samples: list[list[Sample]] = [[] for _ in fns]
    spent = 0.0
    n = len(fns)
    for r in range(rounds):
        if budget_s is not None and r >= min_rounds and spent >= budget_s:
            break
        for k in range(n):
            i = (r + k) % n
            run(i)
            sample = timed(fns[i], device)
            samples[i].append(sample)
            spent += sample.wall
            if on_run:
                on_run()
    return samples


@dataclass(frozen=True)
class Spread:
    """min / median / max of a few values (times, or per-round ratios)."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread | None:
        values = [v for v in values if v is not None]
        if not values:
            return None
        return cls(min(values), statistics.median(values), max(values), len(values))

    @property
    def rel_range(self) -> float:
        return (self.max - self.min) / self.median if self.median else float("inf")

    def noisy(self, threshold: float = NOISY) -> bool:
        return self.n > 1 and self.rel_range > threshold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rel_range": self.rel_range, "noisy": self.noisy()}


def spread(samples: Sequence[Sample], clock: str = "wall") -> Spread | None:
    return Spread.of(s.clock(clock) for s in samples)


def paired_ratios(num: Sequence[Sample], den: Sequence[Sample], clock: str = "wall") -> list[float]:
    """num / den round by round (the two were timed in the same rounds)."""
    return [a.clock(clock) / b.clock(clock) for a, b in zip(num, den, strict=True) if b.clock(clock) > 0]


def paired_ratio(num: Sequence[Sample], den: Sequence[Sample], clock: str = "wall") -> Spread | None:
    """`paired_ratios` as a Spread over the rounds."""
    return Spread.of(paired_ratios(num, den, clock))


# ------------------------------------------------------------------------------------------------------------ memory


def step_peak_bytes(fn: Callable[[], Any], device: Any = "cpu") -> tuple[Any, int]:
    """`fn()`'s result and the peak bytes allocated above the level at its start (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:  # frees of blocks allocated before the step are not reported: they can't lower it
        running += nbytes
        peak = max(peak, running)
    return result, peak


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or RSS sampled every `interval_s` on CPU."""

    def __init__(self, device: Any = "cpu", interval_s: float = 0.02) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, name="PeakMemory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss - self._base)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss - self._base)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages (wrappers that share one base model count it once)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def persistent_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(tensors)


# -------------------------------------------------------------------------------------------------------------- work


def _op_counter() -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        """Counts aten ops dispatched: on CPU a step's fixed cost grows with its op count, not its FLOPs."""

        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def _register_cpu_sdpa_flops() -> None:
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU flash kernel."""
    from torch.utils import flop_counter

    ops = torch.ops.aten
    forward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if backward is not None:

        @flop_counter.register_flop_formula(backward)
        def _backward(grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *a: Any, **k: Any) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def count_work(fn: Callable[[], Any]) -> tuple[int, int]:
    """(FLOPs, aten ops) of one call of `fn`."""
    from torch.utils import flop_counter

    _register_cpu_sdpa_flops()
    flops = flop_counter.FlopCounterMode(display=False)
    counter = _op_counter()
    with flops, counter:
        fn()
    return flops.get_total_flops(), counter.ops


# ----------------------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch for the block; torch's CPU RNG state is restored afterwards."""
    state = torch.random.get_rng_state()
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def profile_table(
    fn: Callable[[], Any], device: Any = "cpu", row_limit: int = 25, sort_by: str = "self_cpu_time_total"
) -> str:
    """torch.profiler's key_averages table of one call of `fn` (warm it up first)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=60)
