"""Ratios (round by round, against each kind's reference), the targets, and the headline ratios two runs compare."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.common import measure, report

from .config import AGREE, REFERENCES, TARGETS


def _samples(record: dict[str, Any], process: int | None = None) -> list[measure.Sample]:
    """The record's timed runs (those of one measuring process, or all of them in process order)."""
    runs = zip(record["times_s"], record["cpu_times_s"], _processes(record), strict=True)
    return [measure.Sample(w, c) for w, c, p in runs if process is None or p == process]


def _processes(record: dict[str, Any]) -> list[int]:
    return record.get("process") or [0] * len(record["times_s"])


def _paired(num: dict[str, Any], den: dict[str, Any], clock: str) -> tuple[measure.Spread | None, list[float]]:
    """Per-round ratios pooled over the measuring processes (rounds pair within a process), and each process's
    median: a shift between processes shows as medians that disagree."""
    pooled, medians = [], []
    for process in sorted(set(_processes(num))):
        values = measure.paired_ratios(_samples(num, process), _samples(den, process), clock)
        pooled += values
        medians.append(statistics.median(values) if values else None)
    return measure.Spread.of(pooled), medians


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def compare(mine: dict[str, Any], ref: dict[str, Any], throughput: bool, against: str) -> dict[str, Any]:
    """One ratio, mine over ref, round by round (throughput: ref time over mine), with its spread per clock (and
    each measuring process's median), the FLOP and op ratios, and memory ratios where both have them."""
    num, den = (ref, mine) if throughput else (mine, ref)
    (cpu, cpu_by_process), (wall, wall_by_process) = _paired(num, den, "cpu"), _paired(num, den, "wall")
    out: dict[str, Any] = {
        "kind": mine["kind"],
        "method": mine["method"],
        "P": mine["P"],
        "B": mine["B"],
        "L": mine["L"],
        "against": against,
        "throughput": throughput,
        "cpu": cpu,
        "wall": wall,
        "by_process": {"cpu": cpu_by_process, "wall": wall_by_process},
        "seconds": measure.spread(_samples(mine), "wall"),
        "flops": div(ref["flops"], mine["flops"]) if throughput else div(mine["flops"], ref["flops"]),
        "ops": mine["ops"],
        "ref_ops": ref["ops"],
    }
    for name in ("step_peak_bytes", "total_peak_bytes"):
        out[name] = mine.get(name)
        out[name.replace("_bytes", "_ratio")] = div(mine.get(name), ref.get(name))
    return out


def find(records: list[dict[str, Any]], **key: Any) -> dict[str, Any] | None:
    return next((r for r in records if all(r.get(k) == v for k, v in key.items())), None)


def ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every record against its reference (REFERENCES), and ours_shared against ours_concat where both ran."""
    out = []
    for record in records:
        ref_method, throughput = REFERENCES[record["kind"]]
        where = {"kind": record["kind"], "B": record["B"], "L": record["L"]}
        ref_p = record["P"] if record["kind"].startswith("mixed") else None
        ref = find(records, method=ref_method, P=ref_p, **where)
        if ref is not None:
            out.append(compare(record, ref, throughput, ref_method))
        concat = find(records, method="ours_concat", P=record["P"], **where)
        if record["method"] == "ours_shared" and concat is not None:
            out.append(compare(record, concat, throughput, "ours_concat"))
    return [r for r in out if r["method"] != r["against"]]


def judged_clock(results_or_device: Any) -> str:
    """Targets are judged by CPU time on CPU (steadier under contention) and by wall clock on a GPU."""
    device = results_or_device if isinstance(results_or_device, str) else results_or_device["settings"]["device"]
    return "cpu" if str(device).startswith("cpu") else "wall"


def _target_rows(r: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """(target name, TARGETS key, value source) for one ratio row: which targets it is evidence for."""
    ours = r["method"] == "ours_shared"
    rows = []
    if ours and r["kind"] in ("train", "train_gc") and r["against"] == "lora" and r["P"] == 20:
        rows.append((f"{r['kind']} ×LoRA{' (both checkpointed)' * (r['kind'] == 'train_gc')}", "train", None))
        if r["kind"] == "train_gc" and r["total_peak_ratio"] is not None:
            rows.append(("total peak memory ×LoRA, both checkpointed", "memory_gc", r["total_peak_ratio"]))
    if ours and r["against"] == "ours_concat":
        key = "vs_concat_rate" if r["throughput"] else "vs_concat"
        rows.append((f"{r['kind']}{' tokens/s' * r['throughput']} ×ours_concat", key, None))
    if ours and r["kind"] == "prefill" and r["against"] == "bare":
        rows.append(("prefill ×bare (compiled cache)", "prefill", None))
    if r["kind"].startswith("mixed") and r["method"] == "ours_shared_mixed":
        rows.append((f"{r['kind'].replace('_', ' ')} ×single-prompt (throughput)", "mixed", None))
    if r["kind"].startswith("system") and r["method"] == "ours_compiled":
        logits = "next-token logits" if r["kind"] == "system_last" else "all logits"
        rows.append((f"system prompt + slot, compiled ({logits}), ×bare user turn", "system", None))
    return rows


def check_targets(rows: list[dict[str, Any]], clock: str = "cpu") -> list[dict[str, Any]]:
    """The issue's targets wherever the grid has them (reported, never asserted). Time targets by the median of
    the per-round ratios of `clock`, the other clock beside it."""
    out = []
    for r in rows:
        for name, key, fixed in _target_rows(r):
            op, bound = TARGETS[key]
            value = fixed if fixed is not None else median_of(r[clock])
            other = None if fixed is not None else median_of(r["wall" if clock == "cpu" else "cpu"])
            met = None if value is None else (value <= bound if op == "<=" else value >= bound)
            out.append(
                {
                    "target": name,
                    "where": place(r),
                    "bound": f"{op} {bound}",
                    "value": value,
                    "other_clock": other,
                    "flops": r["flops"] if fixed is None else None,
                    "met": met,
                    "noisy": fixed is None and r[clock] is not None and r[clock].noisy(),
                    "by_process": None if fixed is not None else r.get("by_process", {}).get(clock),
                }
            )
    return out


def median_of(spread: measure.Spread | dict[str, Any] | None) -> float | None:
    if spread is None:
        return None
    return spread["median"] if isinstance(spread, dict) else spread.median


def place(r: dict[str, Any]) -> str:
    p = "" if r["P"] is None else f"P={r['P']}, "
    return f"{p}B={r['B']}, L={r['L']}"


def headline(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The ratios --compare checks: every target's ratio by each clock, keyed by target and place."""
    out: dict[str, float] = {}
    for r in rows:
        for name, _, fixed in _target_rows(r):
            if fixed is not None:
                out[f"{name} @ {place(r)}"] = fixed
                continue
            for clock in ("cpu", "wall"):
                if r[clock] is not None:
                    out[f"{name} @ {place(r)} [{clock}]"] = median_of(r[clock])
    return out


# ---------------------------------------------------------------------------------------------- comparing two runs


def agreement(a: dict[str, Any], b: dict[str, Any], tolerance: float = AGREE) -> tuple[str, bool]:
    """Markdown table of every headline ratio of two runs, their relative difference, and whether all agree."""
    keys = [k for k in a["headline"] if k in b["headline"]]
    body, ok = [], True
    for key in keys:
        x, y = a["headline"][key], b["headline"][key]
        diff = abs(x - y) / max(abs(x), 1e-12)
        ok &= diff <= tolerance
        body.append([key, f"{x:.3f}", f"{y:.3f}", f"{diff:.1%}", "yes" if diff <= tolerance else "NO"])
    table = report.md_table(["headline ratio", "run A", "run B", "|A-B|/A", f"within {tolerance:.0%}"], body, "lrrrl")
    return table, ok
