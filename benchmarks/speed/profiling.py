"""torch.profiler tables of several methods side by side: the top ops by self CPU time, per step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import machine, measure, models, report

from .config import PROMPT_METHODS, Settings
from .work import Batch, generate, make_batch, prefill, train_step
from .zoo import Zoo, build_zoo


def _profile_jobs(zoo: Zoo, kind: str, methods: list[str], p: int, batch: Batch, s: Settings) -> dict[str, tuple]:
    """method -> (prepare, step): the untimed switch of the shared models, and the profiled work."""
    pad = models.pad_token_id(zoo.base.config, zoo.tokenizer)
    jobs: dict[str, tuple[Callable, Callable]] = {}
    for method in methods:
        gc = kind == "train_gc"
        key = (method, p if method in PROMPT_METHODS else None)
        net = zoo.model(*key)
        if kind in ("train", "train_gc"):
            step = lambda n=net, o=zoo.optimizers[key]: train_step(n, o, batch)  # noqa: E731
        elif kind == "prefill":
            step = lambda n=net: prefill(n, batch)  # noqa: E731
        else:
            step = lambda n=net: generate(n, batch, s.new_tokens, pad)  # noqa: E731
        jobs[method] = (lambda m=method, g=gc: zoo.configure(m, checkpointing=g), step)
    return jobs


def _profiled(step: Callable, activities: list, device: str) -> dict[str, tuple[float, int]]:
    """op -> (self ms, calls) of one profiled call of `step`: CPU time on CPU, the device's time on a GPU."""
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=activities) as prof:
        step()
        measure.sync(device)
    attr = "self_cpu_time_total" if device.startswith("cpu") else "self_device_time_total"
    return {e.key: (getattr(e, attr) / 1e3, e.count) for e in prof.key_averages() if getattr(e, attr) > 0}


def profile(spec: str, s: Settings, repeats: int = 5, top: int = 15) -> str:
    """`KIND:METHOD[,METHOD...]:P:B:L` (KIND: train | train_gc | prefill | generate): the top ops by self CPU time
    of each method side by side: per op the median over `repeats` profiled runs, interleaved across the methods
    (after two warm-ups each, the first of which pays one-offs such as the architecture probe)."""
    from torch.profiler import ProfilerActivity

    kind, methods, p, b, length = spec.split(":")
    p, b, length, names = int(p), int(b), int(length), methods.split(",")
    s.prompt_lengths, s.methods, s.mixed_adapters, s.system_tokens = [p], names, 0, 0
    machine.steady_allocator()  # as in the timed runs: no step faults its activations' pages in afresh
    threads = machine.set_threads(s.threads)
    zoo = build_zoo(models.load_causal_lm(s.model, s.dtype, s.device), s)
    for net in (*zoo.wrappers(), zoo.base):
        net.train(kind.startswith("train"))
    batch = make_batch(zoo.base.config, b, length, s.seed, s.device)
    jobs = _profile_jobs(zoo, kind, names, p, batch, s)
    runs: dict[str, list[dict[str, tuple[float, int]]]] = {m: [] for m in names}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.startswith("cuda") else [])
    with torch.set_grad_enabled(kind.startswith("train")):
        for prepare, step in jobs.values():
            prepare()
            step()
            step()
        for _ in range(repeats):
            for method, (prepare, step) in jobs.items():
                prepare()
                runs[method].append(_profiled(step, activities, s.device))
    zoo.configure("bare")
    title = (
        f"# profile {spec}: self {'CPU' if s.device.startswith('cpu') else 'device'} ms per step (calls), median "
        f"of {repeats} interleaved runs "
        f"({threads} thread(s), {s.device}, {s.dtype})"
    )
    return title + "\n\n" + profile_table(runs, names, top) + "\n"


def profile_table(runs: dict[str, list[dict[str, tuple[float, int]]]], names: list[str], top: int) -> str:
    """Per op and method the median self time over the runs; the total row is the median of the runs' totals."""
    import statistics

    def ms(method: str, op: str) -> float:
        return statistics.median(r.get(op, (0.0, 0))[0] for r in runs[method])

    ops = sorted({op for rs in runs.values() for r in rs for op in r}, key=lambda op: -max(ms(m, op) for m in names))
    rows = []
    for op in ops[:top]:
        rows.append([op] + [f"{ms(m, op):.1f} ({runs[m][0].get(op, (0, 0))[1]})" for m in names])
    totals = [statistics.median(sum(v[0] for v in r.values()) for r in runs[m]) for m in names]
    rows.append(["**total**"] + [f"**{t:.1f}**" for t in totals])
    return report.md_table(["op (self ms, calls)", *names], rows, "l" + "r" * len(names))
