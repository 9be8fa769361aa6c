"""What the machine is, how busy it was, and the process settings that make timings on a shared CPU usable.

Importing this module does not import torch, so a script can call `prepare_environment` before torch loads
OpenMP (the wait policy is read once, when the OpenMP runtime starts):

    from benchmarks.common import machine
    machine.prepare_environment()          # before `import torch`
    import torch
    machine.set_threads(1)
    with machine.LoadMonitor() as load:
        ...                                # the benchmark
    info = machine.machine_info("cpu")     # CPU model, cores, versions, threads, GPU name
    info["load"] = load.summary()          # load average before, during (min/median/max) and after

API:

- `prepare_environment(offline=True)`: ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP workers sleep instead of spinning:
  on a CPU shared with other jobs a spinning worker waits for a descheduled sibling at every parallel region, which
  penalises methods by their op count rather than their work), ``HF_HUB_OFFLINE=1``, ``TOKENIZERS_PARALLELISM=false``.
  Only sets what the caller's environment has not set.
- `set_threads(n)`: ``torch.set_num_threads(n)`` and ``torch.set_num_interop_threads(1)`` (when still allowed);
  ``n=None`` leaves torch's default. Returns the thread count in effect.
- `machine_info(device)`: a JSON-ready dict: cpu (model name), cpu_count, cpus_usable (affinity), torch_threads,
  platform, python, torch/transformers/peft/accelerate/peft_softprompt_ext versions, device, gpu (name) and
  cuda (version) on CUDA, omp_wait_policy, omp_num_threads.
- `device_label(info)`: one human line, e.g. ``"CPU AMD EPYC 7B13 (2 cores, 1 torch thread)"`` or the GPU name.
- `LoadMonitor(interval_s=5.0)`: context manager sampling ``os.getloadavg()`` in a daemon thread; `summary()`
  returns ``{"start": [1, 5, 15 min], "end": [...], "during_1min": {"min", "median", "max", "n"}}``.
- `load_average()`: the current (1, 5, 15) load averages as a list, or None where the OS has none.
- `usable_cpus()`: the CPUs this process may run on.
- `steady_allocator()`: on glibc, keep freed memory in the process (``mallopt``: no mmap, no trim), so a training
  step reuses its pages instead of faulting ~100,000 fresh ones in (SmolLM2-135M, B=8, L=64, fp32: 98,000-111,000
  minor faults per LoRA step, varying step to step and with the allocator's history; 0 in steady state with it,
  except when fragmentation grows the heap once more). Returns what it set ({} where it is not glibc);
  `machine_info` reports it as ``allocator``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import statistics
import threading
import time
from typing import Any

__all__ = [
    "LoadMonitor",
    "device_label",
    "load_average",
    "machine_info",
    "prepare_environment",
    "set_threads",
    "steady_allocator",
    "usable_cpus",
]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_allocator: dict[str, int] = {}


def prepare_environment(offline: bool = True) -> None:
    """Set the process environment a benchmark needs; call before importing torch (see the module docstring)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op thread count (None: keep the default) and use one inter-op thread."""
    import torch

    if n is not None:
        torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran: keep what is there
        pass
    return torch.get_num_threads()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def steady_allocator() -> dict[str, int]:
    """Timings on CPU without page-fault noise: glibc hands blocks above its (adaptive) mmap threshold back to the
    OS on free, so every step faults them in again, at a cost that depends on the process's history. Call before
    the work; idempotent."""
    name = ctypes.util.find_library("c")
    if _allocator or name is None or platform.libc_ver()[0] != "glibc":
        return dict(_allocator)
    libc = ctypes.CDLL(name)
    settings = {"M_MMAP_MAX": (_M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 2**31 - 1)}
    for key, (param, value) in settings.items():
        if libc.mallopt(param, ctypes.c_int(value)) == 1:
            _allocator[key] = value
    return dict(_allocator)


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    import importlib.metadata as metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "accelerate", "peft_softprompt_ext"):
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(device: Any = "cpu") -> dict[str, Any]:
    """The machine and software a result came from (see the module docstring for the keys)."""
    import torch

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **_versions(),
        "device": str(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "allocator": dict(_allocator) or "default",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def device_label(info: dict[str, Any]) -> str:
    """One line naming the device of a `machine_info` dict."""
    if info.get("gpu"):
        return f"{info['gpu']} (CUDA {info.get('cuda')})"
    threads = info.get("torch_threads")
    return f"CPU {info.get('cpu')} ({info.get('cpus_usable')} cores, {threads} torch thread{'s' * (threads != 1)})"


class LoadMonitor:
    """Samples the 1-minute load average every `interval_s` seconds while the block runs."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.start: list[float] | None = None
        self.end: list[float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoadMonitor:
        self.start = load_average()
        if self.start is not None:
            self._thread = threading.Thread(target=self._run, name="LoadMonitor", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end = load_average()

    def summary(self) -> dict[str, Any]:
        """Load before, during and after the block (during: statistics of the 1-minute samples)."""
        during = self.samples or ([self.end[0]] if self.end else [])
        stats = None
        if during:
            stats = {
                "min": round(min(during), 2),
                "median": round(statistics.median(during), 2),
                "max": round(max(during), 2),
                "n": len(during),
            }
        return {"start": self.start, "end": self.end, "during_1min": stats, "finished_at": time.strftime("%F %T")}
