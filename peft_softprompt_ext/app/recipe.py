"""The training loop behind ``softprompt train``: load a causal LM, evaluate, tune a soft prompt, evaluate, save.

Kept apart from the CLI so it can be called (and tested) without argparse. Two kinds of task:

- the built-in example task (WordNet noun supersenses, `data.wordnet_splits`): 26 one-word classes, scored by
  *label ranking*: the class whose first token gets the highest next-token logit wins (one forward per example).
  The hard-prompt baseline is the zero-shot model given an instruction that names every class; the soft prompt
  *replaces* that instruction, so the comparison is "hand-written instruction vs learned prompt".
- user data (JSONL with ``input``/``output``): scored by *exact match* of the greedy continuation (whitespace
  stripped) and by mean answer loss. The optional instruction is part of the input both before and after.

Training minimises the causal LM loss on the answer tokens only (followed by the EOS token so that generation
stops). Examples are drawn without replacement, reshuffled each epoch, from a seeded RNG.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers.optimization import Adafactor

from .. import adapter_dir, slots
from .. import cache as kv
from ..architecture import probe
from ..config import SoftPromptConfig
from ..constants import MAX_VIRTUAL_TOKENS, TRAINING_INFO_NAME
from . import data
from .common import CliError, load_model, resolve_device, versions
from .data import Example

logger = logging.getLogger(__name__)

BUILTIN_TASK = "supersense"
PLACEMENTS = ("prepend", "system")  # where the soft prompt goes: before everything, or a slot in the system turn
# name -> (label, constructor(params, lr, weight_decay)); Adafactor as Lester et al. ran it (no parameter scaling,
# no relative step)
OPTIMIZERS: dict[str, tuple[str, Any]] = {
    "adamw": ("AdamW", lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd)),
    "adafactor": (
        "Adafactor",
        lambda params, lr, wd: Adafactor(
            params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=wd
        ),
    ),
}
# name -> (what it does, lr factor after the warm-up as a function of the share of those steps done)
SCHEDULES: dict[str, tuple[str, Any]] = {
    "linear": ("linear decay to 0", lambda done: max(0.0, 1.0 - done)),
    "constant": ("constant", lambda done: 1.0),
    "cosine": ("cosine decay to 0", lambda done: 0.5 * (1 + math.cos(math.pi * done))),
}
WARMUP = 0.1  # share of the steps with a linear lr ramp
DATA_FEW_SHOT = 4  # solved examples in the few-shot baseline of --data (the built-in task: one per class)
BUILTIN_INIT_TEXT = "Classify the noun into its WordNet category, such as animal, artifact or person:"
DEFAULT_INIT_TEXT = "Read the input and reply with the expected output:"


@dataclass
class TrainSettings:
    """Everything ``softprompt train`` can set; the defaults are the zero-argument demo."""

    out: str
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    data: str | None = None  # None: the built-in supersense task
    eval_data: str | None = None
    instruction: str | None = None
    num_tokens: int = 20
    init: str = "text"
    init_text: str | None = None
    lr: float = 0.1  # the lever sweep's best (benchmarks/README.md, "bench_quality: lever sweep")
    steps: int = 40
    batch_size: int = 8
    eval_size: int = 100
    max_input_tokens: int = 64
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True
    placement: str = "prepend"  # "prepend": before everything; "system": a slot in the chat template's system turn
    optimizer: str = "adamw"
    schedule: str = "linear"
    few_shot: int | None = None  # solved examples in the few-shot baseline; None: the task's default; 0: none

    def validate(self) -> None:
        """Raise CliError naming the first bad option, and check --out, before any model is loaded."""
        for name in ("num_tokens", "steps", "batch_size", "eval_size", "max_input_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CliError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.num_tokens > MAX_VIRTUAL_TOKENS:
            raise CliError(f"--num-tokens must be at most {MAX_VIRTUAL_TOKENS}, got {self.num_tokens}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CliError(f"--lr must be a positive number, got {self.lr}")
        if self.eval_data and not self.data:
            raise CliError("--eval-data needs --data (the built-in task has its own held-out split)")
        for name, allowed in (("placement", PLACEMENTS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise CliError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.few_shot is not None and (isinstance(self.few_shot, bool) or self.few_shot < 0):
            raise CliError(f"--few-shot must be 0 or more, got {self.few_shot!r}")
        self.check_out()

    def check_out(self) -> None:
        """--out must be writable, and either missing/empty or (with --overwrite) an adapter directory."""
        try:
            if not self.out.strip():
                raise CliError("--out is an empty path (an empty $OUT would name the working directory)")
            if self.overwrite:
                adapter_dir.check_replaceable(self.out, "--out")
            elif os.path.isdir(self.out) and os.listdir(self.out):
                raise CliError(f"--out {self.out} exists and is not an empty directory; pass --overwrite to replace it")
            adapter_dir.check_writable(self.out, "--out")
        except ValueError as err:
            raise CliError(str(err)) from None


@dataclass
class Task:
    """Training and held-out examples plus how to prompt and score them."""

    name: str
    train: list[Example]
    eval: list[Example]
    instruction: str | None  # in the input while training, at eval of the soft prompt and in `generate`
    baseline_instruction: str | None  # in the input of the zero-shot hard-prompt baseline
    labels: tuple[str, ...] | None  # set: score by label ranking; None: exact match of greedy generation
    init_text: str
    demos: list[Example] = field(default_factory=list)  # solved training examples of the few-shot baseline


@dataclass
class EvalResult:
    """One evaluation: accuracy (label ranking or exact match) and mean answer loss where computed."""

    metric: str
    accuracy: float
    n: int
    loss: float | None = None
    prompt_tokens: int | None = None  # tokens of (hard) instruction or virtual tokens each request carries


@dataclass
class TrainResult:
    """What a run produced: where the adapter went and the before/after numbers."""

    adapter_dir: str
    task: str
    before: EvalResult
    after: EvalResult
    train_seconds: float
    losses: list[float] = field(default_factory=list)
    few_shot: EvalResult | None = None  # the hard-prompt baseline with solved examples in the context
    few_shot_k: int = 0  # how many


# --------------------------------------------------------------------------- data


def builtin_task(seed: int, n_train: int, n_eval: int, few_shot: int | None = None) -> Task:
    """WordNet noun supersenses: held-out examples carved first, so they don't move with the step count."""
    available = data.supersense_pool_size()
    if n_train + n_eval > available:
        raise CliError(
            f"--steps x --batch-size = {n_train} training examples plus --eval-size {n_eval} exceed the {available} "
            "distinct WordNet nouns of the built-in task: lower --steps or --batch-size"
        )
    splits = data.wordnet_splits("supersense", seed=seed, n_train=n_train, n_dev=0, n_test=n_eval)
    k = len(data.SUPERSENSE_LABELS) if few_shot is None else few_shot
    return Task(
        name=BUILTIN_TASK,
        train=splits["train"],
        eval=splits["test"],
        instruction=None,
        baseline_instruction=data.supersense_instruction(),
        labels=data.SUPERSENSE_LABELS,
        init_text=BUILTIN_INIT_TEXT,
        demos=data.few_shot_demos(splits["train"], k, seed, data.SUPERSENSE_LABELS),
    )


def jsonl_task(
    path: str, eval_path: str | None, instruction: str | None, eval_size: int, seed: int, few_shot: int | None = None
) -> Task:
    """User data; without ``eval_path`` up to ``eval_size`` examples (at most a fifth) are held out."""
    examples = data.load_jsonl(path)
    if eval_path:
        train, held_out = examples, data.load_jsonl(eval_path)
    else:
        if len(examples) < 2:
            raise ValueError(f"{path}: need at least 2 examples to hold some out for evaluation (or pass --eval-data)")
        shuffled = examples[:]
        random.Random(seed).shuffle(shuffled)
        n_eval = max(1, min(eval_size, len(shuffled) // 5))
        held_out, train = shuffled[:n_eval], shuffled[n_eval:]
    return Task(
        name=os.path.basename(path),
        train=train,
        eval=held_out[:eval_size],
        instruction=instruction,
        baseline_instruction=instruction,
        labels=None,
        init_text=instruction or DEFAULT_INIT_TEXT,
        demos=data.few_shot_demos(train, DATA_FEW_SHOT if few_shot is None else few_shot, seed),
    )


@dataclass(frozen=True)
class Prompting:
    """How an example becomes a request: the instruction before it, the system turn (a slot's text for a soft
    prompt placed there) and the input length cut."""

    instruction: str | None
    max_input_tokens: int
    system: str | None = None
    demos: tuple[Example, ...] = ()  # few-shot: solved examples as earlier chat turns

    def cut(self, tokenizer: Any, text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[: self.max_input_tokens]) if len(ids) > self.max_input_tokens else text

    def ids(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of the formatted request; an over-long input (and demo) is cut (from its end) first."""
        demos = [(self.cut(tokenizer, ex.input), ex.output) for ex in self.demos]
        formatted = data.format_example(tokenizer, self.cut(tokenizer, text), self.instruction, self.system, demos)
        return tokenizer(formatted, add_special_tokens=False)["input_ids"]


def target_ids(tokenizer: Any, output: str) -> list[int]:
    """The answer's ids followed by EOS, so a tuned prompt also teaches the model where to stop."""
    ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask: the last position is every row's last real token (the soft prompt model is
    padding invariant, so pads cost only compute)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def training_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless seeded batches of example indices, each epoch a fresh permutation."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(n))
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch


# --------------------------------------------------------------------------- evaluation


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _common_prefix(rows: Sequence[list[int]]) -> int:
    """Length of the longest shared prefix, leaving every row at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(max(n, 0)):
        if any(r[i] != first[i] for r in rows):
            return i
    return max(n, 0)


@torch.no_grad()
def _last_logits(model: Any, rows: list[list[int]], pad_id: int, batch_size: int, progress: bool) -> torch.Tensor:
    """Next-token logits after each row. A prefix shared by every row (a hard instruction, the chat template's
    system turn) is run once and its KV cache reused for all batches, the way the soft prompt's is."""
    device = next(model.parameters()).device
    base = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    use_prefix = not hasattr(model, "peft_config") and probe(model, model.get_input_embeddings()).prefix_kv
    shared = _common_prefix(rows) if use_prefix else 0
    prefix_cache = None
    if shared:
        embeds = model.get_input_embeddings()(torch.tensor(rows[0][:shared], device=device))
        prefix_cache = kv.prompt_cache(base, embeds)
    out = []
    for chunk in tqdm(list(_chunks(rows, batch_size)), desc="eval", leave=False, disable=not progress):
        ids, mask = left_pad([r[shared:] for r in chunk], pad_id, device)
        if prefix_cache is None:
            logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            full_mask = torch.cat([mask.new_ones(len(chunk), shared), mask], dim=1)
            logits = base(
                input_ids=ids,
                attention_mask=full_mask,
                position_ids=kv.input_positions(mask, shared),
                **{kv.cache_kwarg(base): kv.for_batch(prefix_cache, len(chunk))},
                use_cache=True,
            ).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


def evaluate_ranking(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    prompting: Prompting,
    labels: tuple[str, ...],
    batch_size: int,
    progress: bool = False,
) -> EvalResult:
    """Accuracy of picking the label whose first token scores highest right after the request."""
    label_ids = data.label_token_ids(tokenizer, labels, prefix="")
    rows = [prompting.ids(tokenizer, ex.input) for ex in examples]
    logits = _last_logits(model, rows, tokenizer.pad_token_id, batch_size, progress)
    scores = logits[:, label_ids]
    gold = torch.tensor([labels.index(ex.output) for ex in examples])
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(label_ids)[gold]).item()
    accuracy = (scores.argmax(-1) == gold).float().mean().item()
    return EvalResult("label-ranking accuracy", accuracy, len(examples), loss)


@torch.no_grad()
def evaluate_generation(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    prompting: Prompting,
    batch_size: int,
    progress: bool = False,
) -> EvalResult:
    """Exact match (stripped) of greedy generation, plus mean answer loss (teacher forced)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    hits, losses = 0, []
    for chunk in tqdm(list(_chunks(examples, batch_size)), desc="eval", leave=False, disable=not progress):
        rows = [prompting.ids(tokenizer, ex.input) for ex in chunk]
        targets = [target_ids(tokenizer, ex.output) for ex in chunk]
        ids, mask = left_pad(rows, pad, device)
        new = max(len(t) for t in targets) + 2
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        hits += sum(text.strip() == ex.output.strip() for text, ex in zip(texts, chunk, strict=True))
        ids, mask, labels = _lm_batch(rows, targets, pad, device)
        losses.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
    return EvalResult("exact-match accuracy", hits / len(examples), len(examples), sum(losses) / len(losses))


def _lm_batch(
    prompts: Sequence[list[int]], targets: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt+answer rows with labels on the answer tokens only."""
    rows = [p + t for p, t in zip(prompts, targets, strict=True)]
    ids, mask = left_pad(rows, pad_id, device)
    labels = torch.full_like(ids, -100)
    for i, t in enumerate(targets):
        labels[i, ids.shape[1] - len(t) :] = torch.tensor(t, device=device)
    return ids, mask, labels


def evaluate(model: Any, tokenizer: Any, task: Task, prompting: Prompting, progress: bool) -> EvalResult:
    if task.labels is not None:
        return evaluate_ranking(model, tokenizer, task.eval, prompting, task.labels, 16, progress)
    return evaluate_generation(model, tokenizer, task.eval, prompting, 8, progress)


# --------------------------------------------------------------------------- model


# --------------------------------------------------------------------------- training


def build_task(settings: TrainSettings) -> Task:
    s = settings
    if s.data:
        return jsonl_task(s.data, s.eval_data, s.instruction, s.eval_size, s.seed, s.few_shot)
    return builtin_task(s.seed, s.steps * s.batch_size, s.eval_size, s.few_shot)


def make_optimizer(
    params: list[torch.nn.Parameter],
    optimizer: str,
    lr: float,
    schedule: str,
    steps: int,
    warmup: float = WARMUP,
    weight_decay: float = 0.0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and lr schedule of a soft prompt (OPTIMIZERS, SCHEDULES): a linear warm-up over `warmup` of the
    steps, then `schedule`. Weight decay defaults to 0: decaying a prompt pulls it off the embedding manifold."""
    opt: torch.optim.Optimizer = OPTIMIZERS[optimizer][1](params, lr, weight_decay)
    after = SCHEDULES[schedule][1]
    ramp = max(1, round(steps * warmup)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return after((step - ramp) / max(1, steps - ramp))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_text(settings: TrainSettings) -> str:
    name, after = OPTIMIZERS[settings.optimizer][0], SCHEDULES[settings.schedule][0]
    return f"{name}, lr {settings.lr}, linear warm-up over the first {WARMUP:.0%} of steps then {after}, grad-norm clip 1.0"


def card_info(
    task: Task, settings: TrainSettings, before: EvalResult, after: EvalResult, seconds: float, few: EvalResult | None
) -> dict:
    """What the model card reports about this run (card.py renders it)."""
    data_name = "WordNet 3.0 noun supersenses (Debian wordnet-base)" if task.labels else task.name
    return {
        "training": {
            "recipe": "softprompt train (peft-softprompt-ext)",
            "data": f"{data_name}: {len(task.train)} examples",
            "steps": settings.steps,
            "batch size": settings.batch_size,
            "optimizer": optimizer_text(settings),
            "init": settings.init,
            "seed": settings.seed,
            "train time (s)": round(seconds, 1),
        },
        "evaluation": [
            {"name": "before (hard prompt)", "metric": before.metric, "score": before.accuracy, "n": before.n},
            *(
                [
                    {
                        "name": f"few-shot ({len(task.demos)} examples)",
                        "metric": few.metric,
                        "score": few.accuracy,
                        "n": few.n,
                    }
                ]
                if few is not None
                else []
            ),
            {"name": "after (soft prompt)", "metric": after.metric, "score": after.accuracy, "n": after.n},
        ],
    }


def baselines(model: Any, tokenizer: Any, task: Task, settings: TrainSettings) -> tuple[EvalResult, EvalResult | None]:
    """The hard prompts the soft prompt is compared with: zero-shot (the instruction alone) and few-shot (the
    instruction and `task.demos` as earlier chat turns; None without demos)."""
    zero = Prompting(task.baseline_instruction, settings.max_input_tokens)
    before = evaluate(model, tokenizer, task, zero, settings.progress)
    if task.baseline_instruction:
        before.prompt_tokens = len(tokenizer(task.baseline_instruction, add_special_tokens=False)["input_ids"])
    if not task.demos:
        return before, None
    shots = replace(zero, demos=tuple(task.demos))
    few = evaluate(model, tokenizer, task, shots, settings.progress)
    first = task.eval[0].input
    few.prompt_tokens = len(shots.ids(tokenizer, first)) - len(zero.ids(tokenizer, first)) + (before.prompt_tokens or 0)
    return before, few


def train(settings: TrainSettings, log: Any = print) -> TrainResult:
    """Run a whole ``softprompt train``; ``log`` receives the human-readable lines (the CLI passes ``print``).

    Nothing is written until training has finished: the adapter goes to a hidden sibling directory that is renamed
    into place, so an interrupted run (Ctrl-C) leaves no half-written adapter.
    """
    settings.validate()
    device = resolve_device(settings.device)
    task = build_task(settings)  # data errors surface before the (slower) model load
    model, tokenizer, model_path = load_model(settings.model, device)
    log(f"model: {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {device})")
    log(f"task: {task.name}: {len(task.train)} training examples, {len(task.eval)} held out")

    torch.manual_seed(settings.seed)
    before, few = baselines(model, tokenizer, task, settings)

    init_text = settings.init_text or task.init_text
    config = SoftPromptConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=settings.num_tokens,
        init=settings.init,
        init_text=init_text if settings.init == "text" else None,
        tokenizer_name_or_path=model_path,
        init_seed=settings.seed,
        slots=[settings.num_tokens] if settings.placement == "system" else None,
    )
    peft_model = get_peft_model(model, config)
    system = None
    if config.slots:
        slots.add_slot_tokens(tokenizer, peft_model)
        system = slots.slot_text(peft_model)
    prompting = Prompting(task.instruction, settings.max_input_tokens, system)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, schedule = make_optimizer(params, settings.optimizer, settings.lr, settings.schedule, settings.steps)
    prompts = [prompting.ids(tokenizer, ex.input) for ex in task.train]
    targets = [target_ids(tokenizer, ex.output) for ex in task.train]
    batches = training_batches(len(task.train), settings.batch_size, settings.seed)

    peft_model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="train", disable=not settings.progress)
    for _ in bar:
        index = next(batches)
        ids, mask, labels = _lm_batch(
            [prompts[i] for i in index], [targets[i] for i in index], tokenizer.pad_token_id, device
        )
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - start
    peft_model.eval()

    after = evaluate(peft_model, tokenizer, task, prompting, settings.progress)
    after.prompt_tokens = settings.num_tokens

    info = {
        "versions": versions(),
        "task": task.name,
        "instruction": task.instruction,
        "base_model": model_path,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("progress", "overwrite")},
        "before": asdict(before),
        "few_shot": None if few is None else {**asdict(few), "k": len(task.demos)},
        "after": asdict(after),
        "train_seconds": round(train_seconds, 2),
        "final_loss": losses[-1] if losses else None,
    }
    peft_model.model_card_info = card_info(task, settings, before, after, train_seconds, few)
    with adapter_dir.writing(settings.out, "replace" if settings.overwrite else "create") as tmp:
        peft_model.save_pretrained(tmp)
        adapter_dir.write_json(tmp, TRAINING_INFO_NAME, info)
    out = os.path.abspath(settings.out)
    logger.info("Saved adapter to %s", out)
    return TrainResult(out, task.name, before, after, train_seconds, losses, few, len(task.demos))
