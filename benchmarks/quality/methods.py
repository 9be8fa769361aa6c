"""The methods compared, each run on one task at one seed (`Run`) and returning a `MethodResult`.

Hard prompts (zero-shot, few-shot, decoded, PEZ) are evaluated through a soft-prompt adapter whose prompt is
replaced by the hard tokens (`decode.hard_prompt`): the same tokens, but their keys/values are computed once
and reused for every batch (the compiled prompt cache), so a long few-shot context costs its attention only.
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..common.measure import PeakMemory
from . import inits
from .engine import (
    EvalSpec,
    Recipe,
    Requests,
    Scored,
    TrainSpec,
    adapter_bytes,
    float32_logits,
    requests,
    score,
    train,
    trainable_params,
)
from .tasks import RANK, Formatter, Layout, TaskData, demos

logger = logging.getLogger("bench_quality")

INIT_TEXTS = ("instruction", "labels")
PLACEMENTS = ("prepend", "system")


@dataclass(frozen=True)
class SoftSpec:
    """One soft-prompt configuration: a row of the sweep, or `ours_default`. `init_text` says what text init
    starts from: the task instruction or the class labels (most frequent first); `class_labels` init puts one
    label per virtual token (`inits.py`). `projected`: PEZ training (the forward sees the nearest tokens)."""

    num_virtual_tokens: int = 20
    init: str = "text"
    init_text: str = "instruction"
    reparameterization: str | None = None
    placement: str = "prepend"
    projected: bool = False
    recipe: Recipe = field(default_factory=Recipe)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


@dataclass
class MethodResult:
    method: str
    task: str
    seed: int
    score: float
    trainable_params: int = 0
    inference_params: int = 0
    adapter_bytes: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time of the whole method (all threads): load-independent-ish cost
    peak_memory_bytes: int = 0
    losses: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    correct: str = ""  # per test example, "1"/"0", in test order (paired comparisons between methods)


@dataclass
class Budget:
    steps: int
    batch_size: int
    eval_batch_size: int
    cache_tokens: int = 16384  # eval rows x prefix length at most: bounds the expanded prefix cache's memory


@dataclass
class Run:
    """One task at one seed: its data, the tokenizer, where the model comes from, the budget."""

    task: TaskData
    tokenizer: Any
    formatter: Formatter
    model_path: str
    device: str
    budget: Budget
    max_positions: int
    progress: bool = False
    amp: str | None = None  # "bf16": autocast (see engine.autocast)
    kept: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.task.spec.kind

    @property
    def plain(self) -> Layout:
        return self.formatter.layout()

    def eval_spec(self, prefix_len: int = 0, tokenizer: Any = None) -> EvalSpec:
        batch = self.budget.eval_batch_size
        if prefix_len:
            batch = max(1, min(batch, self.budget.cache_tokens // prefix_len))
        return EvalSpec(batch, self.device, tokenizer or self.tokenizer, self.progress, self.amp)

    def train_spec(self) -> TrainSpec:
        b = self.budget
        pad = self.tokenizer.pad_token_id
        return TrainSpec(b.steps, b.batch_size, self.task.seed, self.device, pad, self.progress, self.amp)

    def load_base(self) -> Any:
        """A fresh float32 base per method, so no method sees another's leftovers."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        if self.amp:
            float32_logits(model)
        return model.to(self.device).eval()

    def result(self, method: str, scored: Scored, **kwargs: Any) -> MethodResult:
        extra = kwargs.pop("extra", {})
        if scored.outputs is not None:
            extra["sample_outputs"] = [
                {"input": r.example.input, "gold": list(r.example.accepted()), "output": o}
                for r, o in list(zip(self.task.test, scored.outputs, strict=True))[:8]
            ]
        correct = "".join("1" if c else "0" for c in scored.correct)
        return MethodResult(
            method, self.task.spec.name, self.task.seed, scored.score, extra=extra, correct=correct, **kwargs
        )


def ours_model(base: Any, config: Any) -> Any:
    """`get_peft_model` for our adapter, its capability probe run now, in float32: the probe compares execution
    paths numerically and runs on first use, which may be inside bf16 autocast, where it misjudges the model
    (and generation then falls back to one row at a time)."""
    from peft import get_peft_model

    model = get_peft_model(base, config)
    with torch.autocast(device_type=base.device.type, enabled=False):
        _ = model.capabilities
    return model


def _free(*models: Any) -> None:
    del models
    gc.collect()


# --------------------------------------------------------------------------- hard prompts


def hard_prefix_model(run: Run, length: int) -> Any:
    """A soft-prompt adapter of `length` virtual tokens, only ever used under `decode.hard_prompt`."""
    from peft_softprompt_ext import SoftPromptConfig

    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=length, init="random")
    return ours_model(run.load_base(), config)


def eval_hard(run: Run, layout: Layout, rows: list[Any], desc: str) -> tuple[Scored, float]:
    """Score `rows` with `layout.prefix` as a fixed hard prompt (run once, cached) and `layout.suffix` after."""
    from peft_softprompt_ext.decode import hard_prompt

    if not layout.prefix:
        raise ValueError("a hard prompt needs at least one token before the example")
    model = hard_prefix_model(run, len(layout.prefix))
    data = requests(rows, [], layout.suffix)
    start = time.perf_counter()
    with hard_prompt(model, layout.prefix):
        scored = score(model, data, run.task, run.eval_spec(len(layout.prefix)), desc)
    seconds = time.perf_counter() - start
    _free(model)
    return scored, seconds


def zero_shot(run: Run) -> MethodResult:
    layout = run.formatter.layout(instruction=run.task.spec.instruction)
    scored, seconds = eval_hard(run, layout, run.task.test, "zero_shot")
    return run.result(
        "zero_shot",
        scored,
        eval_seconds=seconds,
        config={"instruction": run.task.spec.instruction, "prompt_tokens": len(layout.prefix)},
    )


def few_shot_layout(run: Run, k: int) -> Layout:
    return run.formatter.layout(instruction=run.task.spec.instruction, demos=demos(run.task, k, run.task.seed))


def fits(run: Run, k: int) -> bool:
    """Whether k demos, the longest test request and its answer fit the model's context."""
    layout = few_shot_layout(run, k)
    longest = max(len(r.text) for r in run.task.test) + len(layout.suffix) + run.task.max_new_tokens + 1
    return len(layout.prefix) + longest <= run.max_positions


def few_shot(run: Run, k: int, method: str, selection: dict[str, Any] | None = None) -> MethodResult:
    layout = few_shot_layout(run, k)
    scored, seconds = eval_hard(run, layout, run.task.test, method)
    config = {"k": k, "instruction": run.task.spec.instruction, "prompt_tokens": len(layout.prefix)}
    if selection:
        config["selection"] = selection
    return run.result(method, scored, eval_seconds=seconds, config=config)


def few_shot_best(run: Run, candidates: list[int], fixed_k: int | None = None) -> MethodResult:
    """The k (among `candidates` that fit the context) with the best dev score, then scored on test; or
    `fixed_k` (chosen beforehand, e.g. by the sweep) without a dev search."""
    if fixed_k is not None:
        return few_shot(run, fixed_k, "few_shot_best", {"k": fixed_k, "how": "fixed (--few-shot-k)"})
    usable = [k for k in candidates if fits(run, k)]
    if not usable or not run.task.dev:
        raise ValueError("few_shot_best needs a dev split and a candidate k that fits the context")
    curve = {}
    for k in usable:
        scored, _ = eval_hard(run, few_shot_layout(run, k), run.task.dev, f"few_shot dev k={k}")
        curve[k] = scored.score
        logger.info("%s seed %d: few-shot k=%d dev %.4f", run.task.spec.name, run.task.seed, k, scored.score)
    best = max(usable, key=lambda k: (curve[k], -k))
    selection = {"how": f"best dev score of {len(run.task.dev)} examples", "dev_curve": curve, "k": best}
    return few_shot(run, best, "few_shot_best", selection)


# --------------------------------------------------------------------------- soft prompts


def soft_config(run: Run, spec: SoftSpec, tokenizer: Any) -> Any:
    from peft_softprompt_ext import SoftPromptConfig

    init_text = None
    if spec.init == inits.NAME:
        init_text = "\n".join(run.task.labels)
    elif spec.init == "text":
        init_text = run.task.spec.instruction if spec.init_text == "instruction" else ", ".join(run.task.labels)
    return SoftPromptConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=spec.num_virtual_tokens,
        init=spec.init,
        init_text=init_text,
        tokenizer=tokenizer,
        init_seed=run.task.seed,
        reparameterization=spec.reparameterization,
        slots=[spec.num_virtual_tokens] if spec.placement == "system" else None,
    )


@contextmanager
def projection(model: Any, spec: SoftSpec, tokenizer: Any) -> Iterator[None]:
    if not spec.projected:
        with nullcontext():
            yield
        return
    from peft_softprompt_ext.decode import projected_prompt

    with projected_prompt(model, metric="cosine", tokenizer=tokenizer):
        yield


def build_soft(run: Run, spec: SoftSpec) -> tuple[Any, Any, Layout]:
    """(model, tokenizer, layout): a system-turn prompt gets its own tokenizer copy with the slot token."""
    from peft_softprompt_ext import slots

    tokenizer = run.tokenizer
    if spec.placement == "system":
        tokenizer = copy.deepcopy(run.tokenizer)
    torch.manual_seed(run.task.seed)
    model = ours_model(run.load_base(), soft_config(run, spec, tokenizer))
    layout = run.plain
    if spec.placement == "system":
        slots.add_slot_tokens(tokenizer, model)
        layout = Formatter(tokenizer, run.formatter.max_text_tokens).layout(system=slots.slot_text(model))
    return model, tokenizer, layout


def trained(run: Run, method: str, model: Any, data: Requests, recipe: Recipe, context: Any = None) -> dict:
    """Train `model`; the measurements every trained row reports."""
    n = trainable_params(model)
    start = time.perf_counter()
    with PeakMemory(run.device) as peak, context or nullcontext():
        losses = train(model, data, run.kind, recipe, run.train_spec(), method)
    seconds = time.perf_counter() - start
    return {
        "trainable_params": n,
        "train_seconds": seconds,
        "peak_memory_bytes": peak.peak,
        "losses": losses,
        "adapter_bytes": adapter_bytes(model),
    }


def soft(run: Run, method: str, spec: SoftSpec, keep: bool = False) -> MethodResult:
    """Train one soft prompt and score it; PEZ (`spec.projected`) is scored as the hard prompt it projects to."""
    from peft_softprompt_ext.decode import hard_prompt

    model, tokenizer, layout = build_soft(run, spec)
    data = requests(run.task.train, layout.prefix, layout.suffix)
    measured = trained(run, method, model, data, spec.recipe, projection(model, spec, tokenizer))
    test = requests(run.task.test, layout.prefix, layout.suffix)
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    if spec.projected:
        decoded = model.decode_prompt(run.tokenizer, metric="cosine", top_k=1)
        extra.update(text=decoded.text, token_ids=decoded.top1_ids)
        with hard_prompt(model, decoded.top1_ids):
            scored = score(model, test, run.task, run.eval_spec(tokenizer=tokenizer), method)
    else:
        scored = score(model, test, run.task, run.eval_spec(tokenizer=tokenizer), method)
    seconds = time.perf_counter() - start
    encoder = model.prompt_encoder[model.active_adapter]
    config = spec.to_dict()
    result = run.result(
        method,
        scored,
        inference_params=0 if spec.projected else encoder.num_virtual_tokens * encoder.token_dim,
        eval_seconds=seconds,
        config=config,
        extra=extra,
        **measured,
    )
    if keep:
        run.kept[method] = (model, layout)
    else:
        _free(model)
    return result


def decoded_nearest(run: Run, source: str) -> MethodResult:
    """The cosine-nearest token of each virtual token of `source`'s trained prompt, put where it was."""
    from peft_softprompt_ext.decode import hard_prompt

    model, layout = run.kept.pop(source)
    decoded = model.decode_prompt(run.tokenizer, metric="cosine", top_k=1)
    test = requests(run.task.test, layout.prefix, layout.suffix)
    start = time.perf_counter()
    with hard_prompt(model, decoded.top1_ids):
        scored = score(model, test, run.task, run.eval_spec(), "decoded_nearest")
    seconds = time.perf_counter() - start
    _free(model)
    return run.result(
        "decoded_nearest",
        scored,
        eval_seconds=seconds,
        config={"source": source, "metric": "cosine"},
        extra={"text": decoded.text, "token_ids": decoded.top1_ids},
    )


# --------------------------------------------------------------------------- other adapters


def peft_prompt_tuning(run: Run, method: str, recipe: Recipe, init: str, spec: SoftSpec) -> MethodResult:
    """PEFT's own PromptTuning, its prompt before the (left-padded) input. `init`: "random" (PEFT's default,
    N(0,1) via nn.Embedding), "text" (our default's init text) or "sample_vocab"."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    kwargs: dict[str, Any] = {"prompt_tuning_init": PromptTuningInit.RANDOM}
    if init == "text":
        text = soft_config(run, replace(spec, init="text"), run.tokenizer).init_text
        kwargs = {
            "prompt_tuning_init": PromptTuningInit.TEXT,
            "prompt_tuning_init_text": text,
            "tokenizer_name_or_path": run.model_path,
        }
    elif init == "sample_vocab":
        kwargs = {"prompt_tuning_init": PromptTuningInit.SAMPLE_VOCAB}
    torch.manual_seed(run.task.seed)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.num_virtual_tokens, **kwargs)
    model = get_peft_model(run.load_base(), config)
    layout = run.plain
    data = requests(run.task.train, layout.prefix, layout.suffix)
    measured = trained(run, method, model, data, recipe)
    scored, seconds = _score_timed(run, model, requests(run.task.test, layout.prefix, layout.suffix), method)
    _free(model)
    cfg = {"num_virtual_tokens": spec.num_virtual_tokens, "init": init, "recipe": recipe.to_dict()}
    return run.result(
        method, scored, inference_params=measured["trainable_params"], eval_seconds=seconds, config=cfg, **measured
    )


def lora(run: Run, recipe: Recipe, rank: int = 8) -> MethodResult:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(run.task.seed)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    model = get_peft_model(run.load_base(), config)
    layout = run.plain
    measured = trained(run, "lora", model, requests(run.task.train, layout.prefix, layout.suffix), recipe)
    scored, seconds = _score_timed(run, model, requests(run.task.test, layout.prefix, layout.suffix), "lora")
    _free(model)
    cfg = {"r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"], "recipe": recipe.to_dict()}
    return run.result(
        "lora", scored, inference_params=measured["trainable_params"], eval_seconds=seconds, config=cfg, **measured
    )


def _score_timed(run: Run, model: Any, data: Requests, desc: str) -> tuple[Scored, float]:
    start = time.perf_counter()
    scored = score(model, data, run.task, run.eval_spec(), desc)
    return scored, time.perf_counter() - start


def is_rank(run: Run) -> bool:
    return run.kind == RANK
