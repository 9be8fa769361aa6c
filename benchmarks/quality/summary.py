"""The machine-readable summary (one entry per task: seeds, and per method the mean / sd of the test score and the
trainable parameters), the goal check, the markdown tables and the plot."""

from __future__ import annotations

import statistics
from typing import Any

from ..common import report

# The goal, for ONE configuration chosen in advance (ours_default), on the means over the seeds.
GOAL = {"of_lora": 0.95, "fewer_params_than_lora": 30.0, "of_few_shot_best": 1.5, "pez_gain_kept": 0.5}
OURS = "ours_default"

DESCRIPTIONS = {
    "zero_shot": "zero-shot: instruction + example",
    "few_shot_per_class": "few-shot, one solved example per class",
    "few_shot_best": "few-shot, best k",
    "ours_default": "ours, default config",
    "decoded_nearest": "ours_default decoded to its cosine-nearest tokens (hard prompt)",
    "pez_hard_prompt": "PEZ: ours trained through the nearest-token projection, used as its hard prompt",
    "ours_prepend": "ours, default config, in front of everything instead of in the system turn",
    "peft_pt_defaults": "PEFT PromptTuning at its defaults (random N(0,1) init, lr 1e-4)",
    "peft_pt_tuned": "PEFT PromptTuning tuned (our default's init and recipe)",
    "lora": "LoRA r8 on q,v",
}


def _sd(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def method_entry(rows: list[Any]) -> dict[str, Any]:
    rows = sorted(rows, key=lambda r: r.seed)
    scores = [r.score for r in rows]
    first = rows[0]
    return {
        "description": DESCRIPTIONS.get(first.method, first.method),
        "mean": statistics.fmean(scores),
        "sd": _sd(scores),
        "scores": scores,
        "seeds": [r.seed for r in rows],
        "trainable_params": first.trainable_params,
        "inference_params": first.inference_params,
        "train_seconds_mean": statistics.fmean(r.train_seconds for r in rows),
        "eval_seconds_mean": statistics.fmean(r.eval_seconds for r in rows),
        "config": first.config,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _gain_kept(hard: float, ours: float, zero: float) -> float | None:
    return None if ours == zero else (hard - zero) / (ours - zero)


def per_seed(rows: list[Any], method: str) -> dict[int, float]:
    return {r.seed: r.score for r in rows if r.method == method}


def goal_check(methods: dict[str, Any], rows: list[Any]) -> dict[str, Any]:
    """Each criterion on the means, with its per-seed values for the spread; None where a row is missing."""
    mean = {m: e["mean"] for m, e in methods.items()}
    ours, lora, fsb, zero = (mean.get(k) for k in (OURS, "lora", "few_shot_best", "zero_shot"))
    checks: dict[str, Any] = {}
    if ours is None:
        return {"met": False, "checks": checks, "note": f"{OURS} not run"}
    checks["of_lora"] = _ratio(ours, lora)
    if lora is not None:
        checks["fewer_params_than_lora"] = methods["lora"]["trainable_params"] / methods[OURS]["trainable_params"]
    checks["of_few_shot_best"] = _ratio(ours, fsb)
    if zero is not None and "pez_hard_prompt" in mean:
        checks["pez_gain_kept"] = _gain_kept(mean["pez_hard_prompt"], ours, zero)
    if zero is not None and "decoded_nearest" in mean:
        checks["decoded_gain_kept"] = _gain_kept(mean["decoded_nearest"], ours, zero)
    spread = _per_seed_checks(rows)
    met = {k: (checks.get(k) is not None and checks[k] >= v) for k, v in GOAL.items()}
    return {"met": all(met.values()), "criteria": GOAL, "checks": checks, "met_by_criterion": met, "per_seed": spread}


def _per_seed_checks(rows: list[Any]) -> dict[str, dict[int, float | None]]:
    by = {m: per_seed(rows, m) for m in (OURS, "lora", "few_shot_best", "zero_shot", "pez_hard_prompt")}
    out: dict[str, dict[int, float | None]] = {"of_lora": {}, "of_few_shot_best": {}, "pez_gain_kept": {}}
    for seed, ours in by[OURS].items():
        out["of_lora"][seed] = _ratio(ours, by["lora"].get(seed))
        out["of_few_shot_best"][seed] = _ratio(ours, by["few_shot_best"].get(seed))
        zero, pez = by["zero_shot"].get(seed), by["pez_hard_prompt"].get(seed)
        out["pez_gain_kept"][seed] = None if zero is None or pez is None else _gain_kept(pez, ours, zero)
    return out


def summarize(results: list[Any], tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`tasks`: per task name, what the entry says about the task (title, metric, n_test, majority...)."""
    summary = {}
    for name, meta in tasks.items():
        rows = [r for r in results if r.task == name]
        order = list(dict.fromkeys(r.method for r in rows))
        methods = {m: method_entry([r for r in rows if r.method == m]) for m in order}
        summary[name] = {
            **meta,
            "seeds": sorted({r.seed for r in rows}),
            "methods": methods,
            "goal": goal_check(methods, rows),
        }
    return summary


# --------------------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _score_cell(entry: dict[str, Any]) -> str:
    sd = "" if entry["sd"] is None else f" ± {_pct(entry['sd'])}"
    seeds = " / ".join(_pct(s) for s in entry["scores"])
    return f"{_pct(entry['mean'])}{sd} ({seeds})"


def task_table(entry: dict[str, Any]) -> str:
    methods = entry["methods"]
    lora = methods.get("lora", {}).get("trainable_params")
    rows = []
    for name, m in methods.items():
        params = m["trainable_params"]
        fewer = f"{lora / params:.0f}x" if lora and params and name != "lora" else "—"
        train = f"{m['train_seconds_mean']:.0f}" if m["train_seconds_mean"] else "—"
        rows.append(
            [
                f"`{name}`",
                m["description"],
                _score_cell(m),
                f"{params:,}",
                fewer,
                train,
                f"{m['eval_seconds_mean']:.0f}",
            ]
        )
    headers = [
        "method",
        "what",
        "test score % mean ± sd (per seed)",
        "trainable",
        "fewer than LoRA",
        "train s",
        "eval s",
    ]
    return report.md_table(headers, rows, align="llrrrrr")


def goal_lines(entry: dict[str, Any]) -> list[str]:
    goal = entry["goal"]
    checks, met = goal.get("checks", {}), goal.get("met_by_criterion", {})
    if not met:
        return [f"Goal: not assessable ({goal.get('note', 'rows missing')})."]
    spread = goal.get("per_seed", {})

    def seeds(key: str) -> str:
        values = [v for v in spread.get(key, {}).values() if v is not None]
        return f" (per seed {min(values):.2f}–{max(values):.2f})" if values else ""

    labels = {
        "of_lora": ("of LoRA's score", ">= 0.95"),
        "fewer_params_than_lora": ("fewer trainable parameters than LoRA", ">= 30x"),
        "of_few_shot_best": ("x the best few-shot prompt", ">= 1.5"),
        "pez_gain_kept": ("of ours' gain over zero-shot kept by the PEZ hard prompt", ">= 0.5"),
    }
    lines = [f"Goal for `{OURS}` (means over seeds): **{'met' if goal['met'] else 'not met'}**."]
    for key, (what, bar) in labels.items():
        value = checks.get(key)
        shown = "—" if value is None else f"{value:.2f}"
        lines.append(f"- {shown} {what} (goal {bar}){seeds(key)}: {'met' if met.get(key) else 'not met'}")
    if checks.get("decoded_gain_kept") is not None:
        lines.append(f"- the nearest-token decode of `{OURS}` keeps {checks['decoded_gain_kept']:.2f} of its gain")
    return lines


def markdown(summary: dict[str, Any], header: list[str]) -> str:
    parts = header[:]
    for name, entry in summary.items():
        parts += ["", f"### {name}: {entry['title']}", "", f"Score: {entry['metric']}. {entry['note']}", ""]
        parts += [task_table(entry), ""]
        parts += goal_lines(entry)
        samples = entry.get("samples")
        if samples:
            parts += ["", f"Examples (`{OURS}`, seed {entry['seeds'][0]}, first test rows):", ""]
            parts += [f"- `{s['input'][:80]}` -> `{s['output']}` (gold: {', '.join(s['gold'])})" for s in samples]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- plot


def plot(summary: dict[str, Any], path: Any) -> None:
    fig, axes = report.figure(1, len(summary), width=7 * len(summary), height_per_row=5)
    for ax, (name, entry) in zip(axes[0], summary.items(), strict=True):
        methods = list(entry["methods"])
        means = [100 * entry["methods"][m]["mean"] for m in methods]
        sds = [100 * (entry["methods"][m]["sd"] or 0) for m in methods]
        ax.bar(range(len(methods)), means, yerr=sds, capsize=3, color="tab:blue")
        for i, m in enumerate(methods):
            for s in entry["methods"][m]["scores"]:
                ax.plot(i, 100 * s, "k.", markersize=4)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("test score (%)")
        ax.set_title(f"{name}: mean ± sd over seeds {entry['seeds']} (dots: seeds)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    report.save_figure(fig, path)
