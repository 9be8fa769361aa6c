"""The lever sweep: which soft-prompt settings `ours_default` uses, and the baselines' own knobs (LoRA's lr, few-shot
k), chosen by DEV score (never test) at the default run's budget.

Every row is one exact configuration, trained and scored on the dev split of each task at each sweep seed. Levers
(Lester et al. 2021 and the design notes): learning rate (AdamW), Adafactor at lr 0.3, init (vocab sample,
matched random, instruction text, class-label text, one label per token), prompt length at the >= 30x parameter
budget (P <= 26 on SmolLM2: LoRA r8 q,v has 460,800 parameters), lr schedule and warmup, residual
reparameterisation, where the prompt sits (before the chat template, or a slot in its system turn), bf16 autocast vs
float32; then LoRA's lr and few-shot k.

Rows are merged into ``<out-dir>/<name>.json`` by (task, seed, row), so the sweep can run in pieces
(``--sweep-levers lr,init``) and a rerun replaces its rows; the table is rebuilt from every row on file.

    python benchmarks/bench_quality.py --sweep                         # every lever, seed 0, both tasks
    python benchmarks/bench_quality.py --sweep --sweep-levers lr --task supersense --seeds 0,1
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..common import cli, models, readme, report, workers
from . import cells
from . import methods as M
from .defaults import FEW_SHOT_CANDIDATES, LORA_RECIPE, OURS_DEFAULT
from .engine import Recipe

logger = logging.getLogger("bench_quality")
SECTION = "## bench_quality: lever sweep"
# PEZ moves the continuous prompt and projects it on the nearest token every step: SmolLM2's embedding coordinates
# have sd 0.14, so AdamW at our soft prompt's lr 0.1 jumps to unrelated tokens each step (the default run's PEZ loss
# stayed near 11, 11.1 -> 10.8, while ours fell to 2.4); the lever reaches down to steps of 1 % of that scale.
PEZ_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)


def _recipe(**changes: Any) -> Recipe:
    return replace(OURS_DEFAULT.recipe, **changes)


def soft_rows() -> dict[str, list[tuple[str, M.SoftSpec]]]:
    """Lever -> [(row name, config)]; every row differs from OURS_DEFAULT in the named settings only."""
    d = OURS_DEFAULT
    return {
        "lr": [(f"lr={lr:g}", replace(d, recipe=_recipe(lr=lr))) for lr in (0.01, 0.03, 0.1, 0.3, 1.0)],
        "optimizer": [
            (
                "adafactor lr=0.3 constant (Lester)",
                replace(d, recipe=_recipe(optimizer="adafactor", lr=0.3, schedule="constant", warmup=0.0)),
            ),
            ("adafactor lr=0.3 linear", replace(d, recipe=_recipe(optimizer="adafactor", lr=0.3))),
        ],
        "init": [
            ("init=vocab", replace(d, init="vocab")),
            ("init=random", replace(d, init="random")),
            ("init=text (instruction)", replace(d, init="text", init_text="instruction")),
            ("init=text (class labels)", replace(d, init="text", init_text="labels")),
            ("init=class_labels (one per token)", replace(d, init="class_labels")),
        ],
        "length": [(f"P={p}", replace(d, num_virtual_tokens=p)) for p in (5, 10, 20, 26, 50)],
        "schedule": [
            ("schedule=linear warmup=0.1", replace(d, recipe=_recipe(schedule="linear", warmup=0.1))),
            ("schedule=cosine warmup=0.1", replace(d, recipe=_recipe(schedule="cosine", warmup=0.1))),
            ("schedule=constant warmup=0.1", replace(d, recipe=_recipe(schedule="constant", warmup=0.1))),
            ("schedule=linear warmup=0", replace(d, recipe=_recipe(schedule="linear", warmup=0.0))),
        ],
        "reparam": [("residual (bottleneck 128)", replace(d, reparameterization="residual"))],
        "placement": [
            ("placement=prepend (before the chat template)", replace(d, placement="prepend")),
            ("placement=system (a slot in the system turn)", replace(d, placement="system")),
        ],
        "pez_lr": [(f"PEZ lr={lr:g}", replace(d, projected=True, recipe=_recipe(lr=lr))) for lr in PEZ_LRS],
    }


LEVERS = (*soft_rows(), "amp", "lora_lr", "few_shot_k", "steps")
STEP_FACTORS = (1, 2, 4)  # the "steps" lever: ours_default and LoRA at this many times the budget's steps


def dev_run(s: Any, task_name: str, seed: int, tokenizer: Any, path: str) -> M.Run:
    """A Run whose 'test' split is the dev split: the sweep never reads test."""
    run = cells.build_run(s, task_name, seed, tokenizer, path)
    return replace(run, task=replace(run.task, test=run.task.dev, dev=[]))


def lever_rows(lever: str, run: M.Run) -> list[tuple[str, dict[str, Any], Any]]:
    """(row name, config, thunk) triples of one lever; equal configs give equal results (reused, not rerun)."""
    soft = soft_rows()
    if lever in soft:
        return [
            (name, {"soft": spec.to_dict()}, lambda spec=spec, name=name: M.soft(run, name, spec))
            for name, spec in soft[lever]
        ]
    if lever == "amp":
        return [
            (
                "ours float32",
                {"soft": OURS_DEFAULT.to_dict(), "amp": None},
                lambda: M.soft(_fp32(run), "ours fp32", OURS_DEFAULT),
            ),
            ("ours bf16 autocast", {"soft": OURS_DEFAULT.to_dict()}, lambda: M.soft(run, "ours bf16", OURS_DEFAULT)),
            ("LoRA float32", {"lora": LORA_RECIPE.to_dict(), "amp": None}, lambda: M.lora(_fp32(run), LORA_RECIPE)),
            ("LoRA bf16 autocast", {"lora": LORA_RECIPE.to_dict()}, lambda: M.lora(run, LORA_RECIPE)),
        ]
    if lever == "lora_lr":
        recipes = [replace(LORA_RECIPE, lr=lr) for lr in (3e-4, 1e-3, 3e-3, 1e-2)]
        return [(f"LoRA lr={r.lr:g}", {"lora": r.to_dict()}, lambda r=r: M.lora(run, r)) for r in recipes]
    if lever == "few_shot_k":
        ks = [k for k in FEW_SHOT_CANDIDATES[run.task.spec.name] if M.fits(run, k)]
        return [(f"few-shot k={k}", {"few_shot": k}, lambda k=k: M.few_shot(run, k, f"few_shot_k{k}")) for k in ks]
    if lever == "steps":
        return steps_rows(run)
    raise ValueError(f"unknown lever {lever!r}; levers: {', '.join(LEVERS)}")


def steps_rows(run: M.Run) -> list[tuple[str, dict[str, Any], Any]]:
    """ours_default and LoRA at the budget's steps and at more (what a bigger budget buys: the curve behind the
    goal). The 1x rows carry the plain configs' keys, so they reuse the lr / lora_lr rows where those ran."""
    rows = []
    for factor in STEP_FACTORS:
        longer = replace(run, budget=replace(run.budget, steps=factor * run.budget.steps), kept={})
        steps = longer.budget.steps
        extra = {} if factor == 1 else {"steps": steps}
        rows.append(
            (
                f"ours {steps} steps",
                {"soft": OURS_DEFAULT.to_dict(), **extra},
                lambda r=longer: M.soft(r, "ours", OURS_DEFAULT),
            )
        )
        rows.append(
            (f"LoRA {steps} steps", {"lora": LORA_RECIPE.to_dict(), **extra}, lambda r=longer: M.lora(r, LORA_RECIPE))
        )
    return rows


def _fp32(run: M.Run) -> M.Run:
    return replace(run, amp=None, kept={})


def row_record(lever: str, name: str, key: str, result: M.MethodResult, seconds: float) -> dict[str, Any]:
    return {
        "task": result.task,
        "seed": result.seed,
        "lever": lever,
        "row": name,
        "key": key,
        "dev_score": result.score,
        "trainable_params": result.trainable_params,
        "config": result.config,
        "train_seconds": result.train_seconds,
        "seconds": seconds,
        "final_loss": statistics.fmean(result.losses[-10:]) if result.losses else None,
    }


class SweepFile:
    """The sweep's JSON: rows keyed by (task, seed, lever, row). Every finished row is merged in at once, under a
    lock beside the file (workers add rows concurrently), with an atomic write: an interrupted sweep keeps every
    row it finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = FileLock(str(path) + ".lock")

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {"rows": [], "runs": []}

    @staticmethod
    def _id(r: dict[str, Any]) -> tuple:
        return (r["task"], r["seed"], r["lever"], r["row"])

    def _update(self, change: Any) -> None:
        with self.lock:
            data = self.data
            change(data)
            report.write_json(self.path, data)

    def add_run(self, meta: dict[str, Any]) -> None:
        self._update(lambda data: data["runs"].append(meta))

    def add(self, record: dict[str, Any]) -> None:
        def merge(data: dict[str, Any]) -> None:
            data["rows"] = [r for r in data["rows"] if self._id(r) != self._id(record)] + [record]

        self._update(merge)


def table(data: dict[str, Any]) -> str:
    """One line per (task, lever, row): the mean dev score over the seeds on file, and each seed's."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in data["rows"]:
        groups.setdefault((r["task"], r["lever"], r["row"]), []).append(r)
    order = {lever: i for i, lever in enumerate(LEVERS)}
    lines = []
    for task, lever, row in sorted(groups, key=lambda k: (k[0], order.get(k[1], 99))):
        rs = sorted(groups[(task, lever, row)], key=lambda r: r["seed"])
        mean = statistics.fmean(r["dev_score"] for r in rs)
        seeds = " / ".join(f"{100 * r['dev_score']:.1f}" for r in rs)
        params = f"{rs[0]['trainable_params']:,}" if rs[0]["trainable_params"] else "0"
        lines.append(
            [task, lever, row, f"{100 * mean:.1f}", f"{seeds} (seeds {','.join(str(r['seed']) for r in rs)})", params]
        )
    return report.md_table(["task", "lever", "row", "dev score %", "per seed", "trainable"], lines, align="lllrrr")


def main(args: Any, s: Any, threads: int) -> int:
    levers = [x for x in (args.sweep_levers or ",".join(LEVERS)).split(",") if x]
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise SystemExit(f"unknown levers {sorted(unknown)}; levers: {', '.join(LEVERS)}")
    path = models.model_path(s.model)
    out = Path(args.out_dir) / f"{args.name or ('quality_sweep_quick' if s.quick else 'quality_sweep')}.json"
    meta = {"command": cli.command_line("benchmarks/bench_quality.py", None), "settings": asdict(s), "levers": levers}
    sweep_file = SweepFile(out)
    sweep_file.add_run(meta)
    pairs = [(task_name, seed) for task_name in s.tasks for seed in (s.seeds if args.seeds else [0])]
    jobs = args.jobs or workers.default_jobs(s.device, len(pairs), threads)
    known = [] if args.rerun else sweep_file.data["rows"]
    work = [(s, task_name, seed, path, levers, known, out) for task_name, seed in pairs]
    workers.map_jobs(sweep_cell, work, jobs, workers.threads_per_job(threads, jobs), cli.quiet_libraries)
    text = table(sweep_file.data)
    report.write_text(out.with_suffix(".md"), text + "\n")
    print(text)
    if args.readme and not s.quick:
        readme.update_section(SECTION, SWEEP_NOTES + "\n\n" + text)
    return 0


def sweep_cell(s: Any, task_name: str, seed: int, path: str, levers: list[str], known: list[dict], out: Path) -> None:
    """Every lever's rows on one task and seed (a worker's unit), each added to the sweep file `out` as it
    finishes; a row whose exact configuration is in `known` (or done earlier here) for this task and seed is copied,
    not rerun."""
    run = dev_run(s, task_name, seed, models.load_tokenizer(path), path)
    sweep_file, done = SweepFile(out), list(known)
    for lever in levers:
        for name, config, thunk in lever_rows(lever, run):
            key = json.dumps({"amp": run.amp, **config}, sort_keys=True)
            same = [r for r in done if (r["task"], r["seed"], r.get("key")) == (task_name, seed, key)]
            if same:
                record = {
                    **same[0],
                    "lever": lever,
                    "row": name,
                    "reused_from": f"{same[0]['lever']} / {same[0]['row']}",
                }
            else:
                t0 = time.perf_counter()
                result = thunk()
                record = row_record(lever, name, key, result, time.perf_counter() - t0)
                logger.info("sweep %s seed %d %s / %s: dev %.4f", task_name, seed, lever, name, result.score)
            sweep_file.add(record)
            done.append(record)


SWEEP_NOTES = """Rows differ from `ours_default` (see `benchmarks/quality/defaults.py`) in the named setting only; scores are
DEV accuracy / exact match (the default run's test sets are never read), at the default run's budget."""
