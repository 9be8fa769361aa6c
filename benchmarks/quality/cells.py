"""One (task, seed) cell of the quality benchmark: every chosen method on one seed's split, and the settings that
define a run. A module of its own so worker processes (`common/workers.py`) can import what they run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..common import models
from . import methods as M
from .defaults import LORA_RECIPE, OURS_DEFAULT, PEFT_DEFAULTS_RECIPE
from .tasks import RANK, TASKS, Formatter, load_task

logger = logging.getLogger("bench_quality")


@dataclass
class Settings:
    """Everything that defines a run; stored in the JSON so every number traces back to its settings."""

    tasks: list[str]
    seeds: list[int]
    methods: list[str]
    model: str | None
    device: str
    amp: str | None
    steps: int
    batch_size: int
    eval_batch_size: int
    n_train: int
    n_dev: int
    n_test: int
    max_text_tokens: int
    few_shot_k: dict[str, int | None]
    few_shot_candidates: dict[str, list[int]]
    data_path: str
    quick: bool = False
    ours: dict[str, Any] = field(default_factory=dict)
    jobs: int = 1  # worker processes, each running whole (task, seed) cells (`common/workers.py`)
    threads_per_job: int | None = None


def run_method(name: str, run: M.Run, s: Settings) -> M.MethodResult | None:
    """One method on one task and seed; None where it does not apply (one example per class on a generative task)."""
    ours = OURS_DEFAULT
    runners = {
        "zero_shot": lambda: M.zero_shot(run),
        "few_shot_per_class": lambda: _per_class(run),
        "few_shot_best": lambda: M.few_shot_best(
            run, s.few_shot_candidates[run.task.spec.name], s.few_shot_k.get(run.task.spec.name)
        ),
        "ours_default": lambda: M.soft(run, "ours_default", ours, keep="decoded_nearest" in s.methods),
        "decoded_nearest": lambda: M.decoded_nearest(run, "ours_default") if "ours_default" in run.kept else None,
        "pez_hard_prompt": lambda: M.soft(run, "pez_hard_prompt", replace(ours, projected=True)),
        "ours_prepend": lambda: M.soft(run, "ours_prepend", replace(ours, placement="prepend")),
        "peft_pt_defaults": lambda: M.peft_prompt_tuning(run, "peft_pt_defaults", PEFT_DEFAULTS_RECIPE, "random", ours),
        "peft_pt_tuned": lambda: M.peft_prompt_tuning(run, "peft_pt_tuned", ours.recipe, _peft_init(ours), ours),
        "lora": lambda: M.lora(run, LORA_RECIPE),
    }
    return runners[name]()


def _per_class(run: M.Run) -> M.MethodResult | None:
    if run.kind != RANK:
        return None
    return M.few_shot(run, len(run.task.spec.labels), "few_shot_per_class")


def _peft_init(spec: M.SoftSpec) -> str:
    """PEFT's closest init to ours: text (same text), sample_vocab, or random."""
    return {"text": "text", "vocab": "sample_vocab"}.get(spec.init, "random")


# Methods that need another's trained model in the same process (`run.kept`): they run in its unit.
NEEDS = {"decoded_nearest": "ours_default"}
TRAINED = ("ours_default", "pez_hard_prompt", "ours_prepend", "peft_pt_defaults", "peft_pt_tuned", "lora")


def units(methods: list[str]) -> list[tuple[str, ...]]:
    """The methods of one (task, seed) cell as independent pieces of work, so that workers share a run evenly
    (whole cells leave one worker idle for a third of it): each method alone, with the methods that need it
    (`NEEDS`). Every method loads a fresh base and seeds itself, so its results don't depend on its company."""
    grouped = {m: [m] for m in methods if NEEDS.get(m) not in methods}
    for m in methods:
        if NEEDS.get(m) in methods:
            grouped[NEEDS[m]].append(m)
    return [tuple(group) for group in grouped.values()]


def unit_order(work: list[tuple[str, int, tuple[str, ...]]]) -> list[tuple[str, int, tuple[str, ...]]]:
    """Longest first (how workers should take them): generation tasks, then trained methods, then the rest."""
    return sorted(work, key=lambda w: (TASKS[w[0]].kind == RANK, w[2][0] not in TRAINED))


def run_cell(
    s: Settings, task_name: str, seed: int, path: str, methods: tuple[str, ...] | None = None
) -> list[M.MethodResult]:
    """`methods` (default: all of `s.methods`) on one task at one seed, in that order (a worker's unit of work: it
    loads its own tokenizer)."""
    s = replace(s, methods=list(methods or s.methods))
    run = build_run(s, task_name, seed, models.load_tokenizer(path), path)
    results = []
    for name in s.methods:
        start, cpu = time.perf_counter(), time.process_time()
        result = run_method(name, run, s)
        if result is not None:
            result.cpu_seconds = time.process_time() - cpu
            results.append(result)
            logger.info(
                "%s seed %d %s: %.4f (%.0f s)", task_name, seed, name, result.score, time.perf_counter() - start
            )
    run.kept.clear()
    return results


def build_run(s: Settings, task_name: str, seed: int, tokenizer: Any, path: str) -> M.Run:
    """The `Run` of one task at one seed under `s`: its seeded splits, the budget, the model's context length."""
    formatter = Formatter(tokenizer, s.max_text_tokens)
    sizes = {"n_train": s.n_train, "n_dev": s.n_dev, "n_test": s.n_test}
    task = load_task(task_name, seed, sizes, formatter, s.data_path)
    budget = M.Budget(s.steps, s.batch_size, s.eval_batch_size)
    max_positions = getattr(models_config(path), "max_position_embeddings", 2048)
    return M.Run(task, tokenizer, formatter, path, s.device, budget, max_positions, amp=s.amp)


def models_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)
