"""Markdown tables, the plot and the README section of a bench_speed run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import machine, measure, readme, report

from .config import FLOP_TOLERANCE, METHODS, REFERENCES, SECTION, Settings
from .summary import div, find, judged_clock, median_of


def _spread(r: dict[str, Any] | None, clock: str) -> str:
    return "—" if r is None else report.fmt_spread(r[clock])


def _flop_match(r: dict[str, Any], clock: str) -> str:
    """time ratio / FLOP ratio, flagged when off by more than FLOP_TOLERANCE."""
    value = div(median_of(r[clock]), r["flops"])
    if value is None:
        return "—"
    return f"{value:.2f}" + (" ✗" if abs(value - 1) > FLOP_TOLERANCE else "")


def _ratio_for(rows: list[dict[str, Any]], kind: str, method: str, p: Any, b: int, length: int, against: str) -> Any:
    return find(rows, kind=kind, method=method, P=p, B=b, L=length, against=against)


def training_table(results: dict[str, Any], clock: str) -> str:
    rows = results["ratios"]
    other = "wall" if clock == "cpu" else "cpu"
    body = []
    for r in (r for r in rows if r["kind"] == "train" and r["against"] == "lora"):
        gc = _ratio_for(rows, "train_gc", r["method"], r["P"], r["B"], r["L"], "lora")
        body.append(
            [
                r["method"],
                report.fmt(r["P"]),
                str(r["B"]),
                str(r["L"]),
                report.fmt(median_of(r["seconds"]), ".3f"),
                _spread(r, clock),
                _spread(r, other),
                report.fmt(r["flops"]),
                _flop_match(r, clock),
                f"{r['ops']:,} / {r['ref_ops']:,}",
                report.fmt(_mb(r["total_peak_bytes"]), ".0f") + f" ({report.fmt(r['total_peak_ratio'])})",
                _spread(gc, clock),
                report.fmt(gc and gc["flops"]),
                "—"
                if gc is None
                else report.fmt(_mb(gc["total_peak_bytes"]), ".0f") + f" ({report.fmt(gc['total_peak_ratio'])})",
            ]
        )
    headers = [
        "method", "P", "B", "L", "step s", f"×LoRA ({clock})", f"×LoRA ({other})", "×LoRA FLOPs", "time/FLOPs",
        "aten ops (LoRA)", "total peak MB (×LoRA)", f"checkpointed ×LoRA ({clock})", "ckpt FLOPs", "ckpt total peak MB (×LoRA)",
    ]  # fmt: skip
    return report.md_table(headers, body, "lrrrrrrrrrrrrr")


def inference_table(results: dict[str, Any], clock: str) -> str:
    rows = results["ratios"]
    other = "wall" if clock == "cpu" else "cpu"
    body = []
    for r in (r for r in rows if r["kind"] == "prefill" and r["against"] == "bare"):
        gen = _ratio_for(rows, "generate", r["method"], r["P"], r["B"], r["L"], "bare")
        body.append(
            [
                r["method"],
                report.fmt(r["P"]),
                str(r["B"]),
                str(r["L"]),
                report.fmt(median_of(r["seconds"]) * 1e3, ".1f"),
                _spread(r, clock),
                _spread(r, other),
                report.fmt(r["flops"]),
                _flop_match(r, clock),
                f"{r['ops']:,} / {r['ref_ops']:,}",
                _spread(gen, clock),
                _spread(gen, other),
            ]
        )
    headers = [
        "method", "P", "B", "L", "prefill ms", f"×bare ({clock})", f"×bare ({other})", "×bare FLOPs", "time/FLOPs",
        "aten ops (bare)", f"generate tok/s ×bare ({clock})", f"generate ×bare ({other})",
    ]  # fmt: skip
    return report.md_table(headers, body, "lrrrrrrrrrrr")


def simple_table(rows: list[dict[str, Any]], clock: str, select: Callable[[dict[str, Any]], bool], label: str) -> str:
    other = "wall" if clock == "cpu" else "cpu"
    body = [
        [
            r["kind"],
            r["method"],
            report.fmt(r["P"]),
            str(r["B"]),
            str(r["L"]),
            r["against"],
            _spread(r, clock),
            _spread(r, other),
            report.fmt(r["flops"]),
            _flop_match(r, clock),
        ]
        for r in rows
        if select(r)
    ]
    headers = [
        "kind",
        "method",
        "P",
        "B",
        "L",
        "against",
        f"{label} ({clock})",
        f"{label} ({other})",
        "FLOPs",
        "time/FLOPs",
    ]
    return report.md_table(headers, body, "lllrrlrrrr")


def targets_table(results: dict[str, Any], clock: str) -> str:
    body = [
        [
            f"{t['target']} {t['bound']}",
            t["where"],
            report.fmt(t["value"], ".3f") + (" ⚠" if t["noisy"] else ""),
            report.fmt(t["other_clock"], ".3f"),
            " / ".join(report.fmt(m, ".3f") for m in t.get("by_process") or []) or "—",
            report.fmt(t["flops"], ".3f"),
            "—" if t["met"] is None else ("yes" if t["met"] else "NO"),
        ]
        for t in results["targets"]
    ]
    headers = ["target", "where", f"value ({clock})", "other clock", "per process", "FLOP ratio", "met"]
    return report.md_table(headers, body, "llrrrrl")


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def markdown(results: dict[str, Any]) -> str:
    s, rows = results["settings"], results["ratios"]
    clock = judged_clock(results)
    lines = ["# bench_speed results", ""]
    lines += report.provenance(
        model=f"{results['model']}, {results['model_parameters'] / 1e6:.2f}M parameters, {s['dtype']}",
        data=results["inputs"],
        steps=f"grid P={s['prompt_lengths']}, B={s['batch_sizes']}, L={s['seq_lengths']}; {s['warmup']} warm-up run "
        f"per task (instrumented: FLOPs, ops, memory), then {s['min_rounds']}-{s['rounds']} interleaved rounds per "
        f"group (no new round after {s['max_group_seconds']} s of timed runs) in each of {s.get('jobs', 1)} measuring "
        f"process(es), rounds pooled; wall time {results['wall_seconds']:.0f} s",
        seed=s["seed"],
        machine=results["machine"],
        load=results["load"],
        extra=[
            f"- allocator: {results['machine'].get('allocator', 'default')} (glibc mallopt: freed memory stays "
            "in the process)",
            f"- ratios: median (min–max) over rounds of per-round ratios; per process: each measuring process's "
            f"median; ⚠ = rounds span > {measure.NOISY:.0%} of "
            f"the median; targets judged by {clock} time; time/FLOPs = time ratio over FLOP ratio (✗: off by more "
            f"than {FLOP_TOLERANCE:.0%}); train = zero_grad + forward + backward + AdamW (lr {s['lr']}); LoRA "
            f"r={s['lora_r']} on {results['lora_targets']}; checkpointed = gradient checkpointing (non-reentrant) "
            f"on both sides; generate = greedy, exactly {s['new_tokens']} new tokens per row",
        ],
    )
    lines += [
        "",
        "## Training",
        "",
        training_table(results, clock),
        "",
        "## Inference",
        "",
        inference_table(results, clock),
    ]
    concat = simple_table(rows, clock, lambda r: r["against"] == "ours_concat", "×ours_concat")
    lines += ["", "## Shared prompt KV against concatenation", "", concat]
    mixed = [r for r in rows if r["kind"].startswith("mixed")]
    if mixed:
        lines += ["", f"## Mixed-prompt batches ({s['mixed_adapters']} adapters, throughput ×single-prompt)", ""]
        lines.append(simple_table(mixed, clock, lambda r: True, "×single"))
    system = [r for r in rows if r["kind"].startswith("system")]
    if system:
        lines += [
            "",
            f"## System prompt + slot ({s['system_tokens']} system tokens incl. template, {s['slot_tokens']} soft "
            f"tokens, {s['user_tokens']}-token user turn; prefill ×bare prefill of the user turn alone)",
            "",
            "kind system: every position's logits (the forward's contract, as in the prefill rows); system_last: "
            "`logits_to_keep=1`, the next-token logits a request's prefill needs. bare_hard_system: the bare model "
            "on the same request without the soft tokens (what an uncached hard system prompt costs); "
            "ours_recomputed: the compiled caches dropped before every request.",
            "",
            simple_table(system, clock, lambda r: True, "×bare user turn"),
        ]
    lines += ["", "## Targets (ours_shared; reported, never asserted)", "", targets_table(results, clock)]
    return "\n".join(lines) + "\n"


METHOD_ORDER = {m: i for i, m in enumerate((*METHODS, "bare_hard_system", "ours_compiled", "ours_recomputed"))}
PLOT_TARGETS = {"train": 1.0, "train_gc": 1.0, "prefill": 1.05, "system": 1.05, "mixed_prefill": 0.9}
PLOT_TARGETS["system_last"] = 1.05
PLOT_TARGETS["mixed_generate"] = 0.9


def _panel(rows: list[dict[str, Any]], clock: str) -> tuple[list[str], dict, dict, dict]:
    """x labels (B, L), and per series (method, P) the median, min and max of `clock` at each label."""
    shapes = sorted({(r["B"], r["L"]) for r in rows})
    names = sorted({(r["method"], r["P"] or 0) for r in rows}, key=lambda n: (METHOD_ORDER.get(n[0], 99), n[1]))
    series: dict[str, list[float]] = {}
    low: dict[str, list[float]] = {}
    high: dict[str, list[float]] = {}
    for method, p in names:
        label = method + (f" P={p}" if p else "")
        found = [find(rows, method=method, P=p or None, B=b, L=length) for b, length in shapes]
        spreads = [r[clock] if r is not None else None for r in found]
        series[label] = [x.median if x else float("nan") for x in spreads]
        low[label] = [x.min if x else float("nan") for x in spreads]
        high[label] = [x.max if x else float("nan") for x in spreads]
    return [f"B={b} L={length}" for b, length in shapes], series, low, high


def plot(results: dict[str, Any], path: Path) -> None:
    """Bars: median ratio by the judged clock, whiskers: min–max over rounds; one panel per kind."""
    clock = judged_clock(results)
    kinds = [k for k in REFERENCES if any(r["kind"] == k for r in results["ratios"])]
    fig, axes = report.figure((len(kinds) + 1) // 2, 2)
    for ax, kind in zip(axes.flat, kinds, strict=False):
        reference, throughput = REFERENCES[kind]
        rows = [r for r in results["ratios"] if r["kind"] == kind and r["against"] == reference]
        labels, series, low, high = _panel(rows, clock)
        title = f"{kind} ×{reference} ({clock} time; {'higher' if throughput else 'lower'} is better)"
        report.grouped_bars(ax, labels, series, low, high, target=PLOT_TARGETS.get(kind), title=title)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(kinds) :]:
        ax.set_visible(False)
    m = results["machine"]
    fig.suptitle(f"bench_speed: {results['model'].split(' (')[0]} on {machine.device_label(m)}", fontsize=11)
    report.save_figure(fig, path)


README_NOTES = """Speed and memory of soft prompts against the bare model, LoRA (r 8 on q,v) and PEFT's prompt tuning
(`benchmarks/bench_speed.py`; the method and the profiles behind the numbers: next section). Every number is a ratio
of two things timed in the same interleaved rounds of one run (the order rotates each round), given as median
(min–max) of the per-round ratios by process CPU time (judged on CPU) and by wall clock, beside its FLOP ratio; ⚠
flags a ratio whose rounds spread over more than 10 % of its median. Torch runs on one thread on CPU, in one
measuring process per core (`--jobs`), whose rounds are pooled; each process's median is given too.

    python benchmarks/bench_speed.py                     # full grid: P 20, 100; B 1, 8; L 64, 256 (writes this section)
    python benchmarks/bench_speed.py --quick --name speed_quick_g && \\
    python benchmarks/bench_speed.py --quick --name speed_quick_h && \\
    python benchmarks/bench_speed.py --compare benchmarks/results/speed_quick_g.json benchmarks/results/speed_quick_h.json
    bash benchmarks/gpu.sh                               # when a GPU is lent: results/gpu/, "bench_speed on GPU" below"""


def readme_body(results: dict[str, Any], command: str) -> str:
    """The README's bench_speed section: what it measures, the commands, this run's targets, a pointer to the tables."""
    name = results["settings"]["name"]
    device = machine.device_label(results["machine"])
    load = (results["load"].get("during_1min") or {}).get("median")
    return "\n".join(
        [
            README_NOTES,
            "",
            f"Last run: `{command}`, {results['wall_seconds'] / 60:.0f} min on {device}, median 1-min load "
            f"{report.fmt(load, '.1f')}. Full tables: [results/{name}.md](results/{name}.md), raw numbers "
            f"`results/{name}.json`, plot `results/{name}.png`.",
            "",
            targets_table(results, judged_clock(results)),
        ]
    )


def write_outputs(results: dict[str, Any], s: Settings, command: str) -> dict[str, Path]:
    out = Path(s.out_dir)
    paths = {
        "json": report.write_json(out / f"{s.name}.json", results),
        "md": report.write_text(out / f"{s.name}.md", markdown(results)),
    }
    if s.plot:
        plot(results, out / f"{s.name}.png")
        paths["png"] = out / f"{s.name}.png"
    if s.readme and not s.quick and s.model is None:
        heading = SECTION if s.device == "cpu" else f"{SECTION} on GPU"
        readme.update_section(heading, readme_body(results, command))
        paths["readme"] = readme.README
    return paths
