"""Training and scoring, shared by every method: one seeded batch order, one loss, one scorer per task kind.

- Training batches: seeded, length-grouped (shuffle, sort within windows of 32 batches, shuffle the batches), the
  same for every method at a seed. Loss: cross-entropy on the answer only: the class's first token at the last
  position (ranking), or the answer's tokens and EOS (generation). Optimizer, lr, schedule, warmup, weight decay
  and gradient clipping come from a `Recipe`.
- Scoring: ranking takes the argmax over the class tokens' logits at the last position; generation runs greedy
  `model.generate` and compares the decoded text by `data.exact_match`. A row stops generating once its text can no
  longer match (`CannotMatch`), like lm-eval's `until`: the scores are those of full-length generation, the
  wasted decoding steps are gone. Batches are length-sorted; every model sees left-padded rows (our soft prompt's
  output does not depend on padding; PEFT's prompt tuning puts its prompt before the pads).
"""

from __future__ import annotations

import contextlib
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from peft_softprompt_ext.app import recipe as app_recipe
from peft_softprompt_ext.app.data import Example, exact_match, normalize_answer

from .tasks import RANK, Row

OPTIMIZERS, SCHEDULES = app_recipe.OPTIMIZERS, app_recipe.SCHEDULES


@dataclass(frozen=True)
class Recipe:
    """How an adapter trains. `warmup`: share of steps with a linear ramp; then `schedule` decays the lr to 0
    (linear, cosine) or keeps it (constant). Adafactor is Lester et al.'s: no parameter scaling, no relative
    step, beta2 decay exponent 0.8."""

    optimizer: str = "adamw"
    lr: float = 0.1
    schedule: str = "linear"
    warmup: float = 0.1
    weight_decay: float = 0.0
    clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer in {list(OPTIMIZERS)}, schedule in {list(SCHEDULES)}; got {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe, steps: int) -> tuple[Any, Any]:
    """The CLI's optimizer and schedule (`app.recipe.make_optimizer`): the benchmark trains the way users do."""
    r = recipe
    return app_recipe.make_optimizer(params, r.optimizer, r.lr, r.schedule, steps, r.warmup, r.weight_decay)


# --------------------------------------------------------------------------- batches


def pad_left(rows: Sequence[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def train_batches(lengths: list[int], steps: int, batch: int, seed: int) -> list[list[int]]:
    """The same seeded batch order for every method (HF `group_by_length` style, see the module docstring)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        perm = list(range(len(lengths)))
        rng.shuffle(perm)
        order += perm
    order = order[: steps * batch]
    window = 32 * batch
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return batches


@dataclass
class Requests:
    """What a model is fed for one split: the ids of each request (prefix + text + suffix) and the rows."""

    ids: list[list[int]]
    rows: list[Row]


def requests(rows: list[Row], prefix: list[int], suffix: list[int]) -> Requests:
    return Requests([prefix + r.text + suffix for r in rows], rows)


# --------------------------------------------------------------------------- loss / training


def answer_loss(model: Any, ids: list[list[int]], targets: list[list[int]], kind: str, pad_id: int, device: str):
    """Cross-entropy on the answer only. Ranking: the first token at the last position (one logit row per
    example). Generation: request + answer (+EOS) teacher-forced; only the last max-answer-length + 1 positions
    get logits (`logits_to_keep`)."""
    if kind == RANK:
        batch, mask = pad_left(ids, pad_id, device)
        logits = model(input_ids=batch, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
        return F.cross_entropy(logits, torch.tensor([t[0] for t in targets], device=device))
    keep = max(len(t) for t in targets)
    batch, mask = pad_left([i + t for i, t in zip(ids, targets, strict=True)], pad_id, device)
    labels = torch.full((len(ids), keep), -100, dtype=torch.long, device=device)
    for row, t in enumerate(targets):
        labels[row, keep - len(t) :] = torch.tensor(t, device=device)
    logits = model(input_ids=batch, attention_mask=mask, logits_to_keep=keep + 1).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def autocast(device: str, amp: str | None) -> contextlib.AbstractContextManager:
    """bf16 autocast (matmuls in bf16, weights and the prompt stay float32) or nothing."""
    if amp != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def float32_logits(model: torch.nn.Module) -> Any:
    """Make the output head compute in float32 under autocast: bf16 logits (8 bits of mantissa) tie classes
    and tokens that float32 tells apart. The head runs on the kept positions only, so this is cheap."""
    head = model.get_output_embeddings()

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if output.dtype == torch.float32:
            return None
        with torch.autocast(device_type=output.device.type, enabled=False):
            bias = None if module.bias is None else module.bias.float()
            return F.linear(args[0].float(), module.weight.float(), bias)

    return head.register_forward_hook(hook)


@dataclass
class TrainSpec:
    steps: int
    batch_size: int
    seed: int
    device: str
    pad_id: int
    progress: bool = False
    amp: str | None = None


def train(model: Any, data: Requests, kind: str, recipe: Recipe, spec: TrainSpec, desc: str) -> list[float]:
    """Train the model's trainable parameters; returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, recipe, spec.steps)
    lengths = [len(x) + len(r.target) for x, r in zip(data.ids, data.rows, strict=True)]
    batches = train_batches(lengths, spec.steps, spec.batch_size, spec.seed)
    torch.manual_seed(spec.seed)
    model.train()
    losses = []
    bar = tqdm(batches, desc=f"train {desc}", leave=False, file=sys.stderr, disable=not spec.progress)
    for rows in bar:
        with autocast(spec.device, spec.amp):
            loss = answer_loss(
                model, [data.ids[i] for i in rows], [data.rows[i].target for i in rows], kind, spec.pad_id, spec.device
            )
        loss.backward()
        if recipe.clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# --------------------------------------------------------------------------- scoring


@dataclass
class Scored:
    """Per-example correctness (test order) and, for generation, the decoded outputs."""

    correct: list[bool]
    outputs: list[str] | None = None

    @property
    def score(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


@dataclass
class EvalSpec:
    batch_size: int
    device: str
    tokenizer: Any
    progress: bool = False
    amp: str | None = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def _letters(text: str) -> int:
    return len("".join(text.split()))


class CannotMatch(StoppingCriteria):
    """Stops each row once the text it has generated holds more non-space characters than its longest accepted
    answer (normalised) plus a final period and a margin of 2 for a character decoded from part of its bytes:
    `exact_match` compares normalised text (case folded, whitespace collapsed, one final period dropped), so such
    a row can no longer match, whatever it writes next."""

    def __init__(self, tokenizer: Any, start: int, examples: Sequence[Example]) -> None:
        self.tokenizer, self.start = tokenizer, start
        self.budgets = [max(_letters(normalize_answer(a)) for a in ex.accepted()) + 3 for ex in examples]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        done = [_letters(text) > budget for text, budget in zip(texts, self.budgets, strict=True)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def weights_cast_once(model: torch.nn.Module) -> Iterator[None]:
    """Under no_grad: mark the frozen weights as requiring grad for the block, so bf16 autocast casts each of them
    once and reuses the copy (autocast caches casts of leaf tensors that require grad, for as long as its outermost
    context lasts) instead of casting all of them again at every decoding step. The casts are the same, so are the
    results; no graph is built under no_grad."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@torch.no_grad()
def score(model: Any, data: Requests, task: Any, spec: EvalSpec, desc: str) -> Scored:
    """Ranking accuracy or generation exact match on `data` (see the module docstring), under one autocast
    context for the whole split (`weights_cast_once`)."""
    with weights_cast_once(model), autocast(spec.device, spec.amp):
        return _score(model, data, task, spec, desc)


def _score(model: Any, data: Requests, task: Any, spec: EvalSpec, desc: str) -> Scored:
    model.eval()
    order = sorted(range(len(data.ids)), key=lambda i: len(data.ids[i]))
    correct = [False] * len(order)
    outputs: list[str] | None = [""] * len(order) if task.spec.kind != RANK else None
    classes = torch.tensor(task.class_ids, device=spec.device) if task.class_ids else None
    batch, pad_id, tokenizer = spec.batch_size, spec.pad_id, spec.tokenizer
    chunks = [order[s : s + batch] for s in range(0, len(order), batch)]
    for rows in tqdm(chunks, desc=f"eval {desc}", leave=False, file=sys.stderr, disable=not spec.progress):
        ids, mask = pad_left([data.ids[i] for i in rows], pad_id, spec.device)
        if classes is not None:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            pred = logits[:, classes].argmax(-1).tolist()
            for i, p in zip(rows, pred, strict=True):
                correct[i] = p == data.rows[i].gold
            continue
        stop = CannotMatch(tokenizer, ids.shape[1], [data.rows[i].example for i in rows])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=task.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        for i, text in zip(rows, texts, strict=True):
            outputs[i] = text
            correct[i] = exact_match(text, data.rows[i].example)
    return Scored(correct, outputs)


# --------------------------------------------------------------------------- measuring


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_bytes(model: Any) -> int:
    """Bytes on disk of `save_pretrained`."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
