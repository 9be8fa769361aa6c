"""Reporting: number formatting, markdown tables, provenance lines, atomic JSON/text files, plot helpers.

    lines = report.provenance(model=name, data="random ids", steps="7 rounds", seed=0, machine=info, load=load)
    table = report.md_table(["method", "x LoRA"], [["ours", report.fmt_spread(spread)]], align="lr")
    report.write_json(out / "speed.json", results)

API:

- `fmt(value, spec=".2f", missing="—")`: floats by ``spec``, None as ``missing``, anything else by ``str``.
- `fmt_bytes(n)`: ``"51.2 KB"`` style (binary units).
- `fmt_spread(spread, spec=".2f", flag=True)`: ``"1.03 (0.99–1.07)"`` from a `measure.Spread` (or its dict);
  a noisy spread gets a trailing ``" ⚠"`` when ``flag``.
- `fmt_load(values)`: ``"(0.5, 1.2, 2.0)"`` for a load-average triple, ``"n/a"`` for None.
- `md_table(headers, rows, align=None)` -> markdown table text; ``align`` one char per column (l, r, c).
- `provenance(model, data, steps, seed, machine, load=None, extra=())` -> markdown bullet lines naming the model,
  data, steps, seed, machine (CPU model, cores, torch threads, versions, device) and load during the run.
- `write_json(path, data)` and `write_text(path, text)`: write to a temporary file, then rename over (readers never
  see half a file). `write_json` converts objects with a ``to_dict()`` (e.g. `measure.Spread`), other dataclasses,
  Paths and sets; anything else by ``str``.
- `figure(rows, cols, width=15, height_per_row=4.3)` -> (fig, axes array), on the Agg backend.
- `grouped_bars(ax, labels, series, low=None, high=None, target=None, title="", parity=1.0)`: one bar group per
  label, one bar per series name (``series[name]`` a list of values, NaN for none), min/max whiskers from
  ``low[name]``/``high[name]``, a black line at ``parity`` and a dashed red one at ``target``.
- `save_figure(fig, path, dpi=110)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "figure",
    "fmt",
    "fmt_bytes",
    "fmt_load",
    "fmt_spread",
    "grouped_bars",
    "md_table",
    "provenance",
    "save_figure",
    "write_json",
    "write_text",
]


def fmt(value: Any, spec: str = ".2f", missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_spread(spread: Any, spec: str = ".2f", flag: bool = True) -> str:
    if spread is None:
        return "—"
    get = spread.get if isinstance(spread, Mapping) else lambda k: getattr(spread, k)
    text = f"{format(get('median'), spec)} ({format(get('min'), spec)}–{format(get('max'), spec)})"
    noisy = get("noisy") if isinstance(spread, Mapping) else spread.noisy()
    return text + (" ⚠" if flag and noisy else "")


def fmt_load(values: Sequence[float] | None) -> str:
    return "n/a" if values is None else "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    align = align or "l" * len(headers)
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(
    model: str,
    data: str,
    steps: str,
    seed: int | str,
    machine: Mapping[str, Any],
    load: Mapping[str, Any] | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """Markdown bullets naming everything a number depends on (see the module docstring)."""
    from .machine import device_label

    m = machine
    lines = [
        f"- model: {model}",
        f"- data: {data}",
        f"- steps: {steps}; seed {seed}",
        f"- machine: {device_label(m)}; {m.get('cpu_count')} logical CPUs; torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, peft {m.get('peft')}, accelerate {m.get('accelerate')}; "
        f"OMP_WAIT_POLICY={m.get('omp_wait_policy')}, OMP_NUM_THREADS={m.get('omp_num_threads')}",
    ]
    if load:
        during = load.get("during_1min") or {}
        lines.append(
            f"- load average (1, 5, 15 min): start {fmt_load(load.get('start'))}, end {fmt_load(load.get('end'))}; "
            f"1-min load during the run min {fmt(during.get('min'), '.1f')}, median {fmt(during.get('median'), '.1f')}, "
            f"max {fmt(during.get('max'), '.1f')} ({during.get('n', 0)} samples)"
        )
    return lines + list(extra)


def _default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (Path, set, frozenset)):
        return str(value) if isinstance(value, Path) else sorted(value)
    return str(value)


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=_default) + "\n")


# ------------------------------------------------------------------------------------------------------------- plots


def figure(rows: int, cols: int, width: float = 15, height_per_row: float = 4.3) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width, height_per_row * rows), squeeze=False)
    return fig, axes


def grouped_bars(
    ax: Any,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    low: Mapping[str, Sequence[float]] | None = None,
    high: Mapping[str, Sequence[float]] | None = None,
    target: float | None = None,
    title: str = "",
    parity: float | None = 1.0,
) -> None:
    names = [n for n, values in series.items() if any(v == v for v in values)]
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = list(series[name])
        positions = [x + (i - (len(names) - 1) / 2) * width for x in range(len(labels))]
        errors = None
        if low is not None and high is not None and name in low:
            errors = [
                [max(v - lo, 0) if v == v and lo == lo else 0 for v, lo in zip(values, low[name], strict=True)],
                [max(hi - v, 0) if v == v and hi == hi else 0 for v, hi in zip(values, high[name], strict=True)],
            ]
        ax.bar(positions, values, width, label=name, yerr=errors, capsize=2)
    if parity is not None:
        ax.axhline(parity, color="black", linewidth=0.8)
    if target is not None:
        ax.axhline(target, color="red", linestyle="--", linewidth=0.8, label=f"target {target:g}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(title, fontsize=10)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
