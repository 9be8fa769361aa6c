"""The work being timed, the tasks and groups of a run, and the run itself."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.common import cli, machine, measure, models, workers

from .config import CHECKPOINTED, PROMPT_METHODS, TRAINABLE, Settings
from .summary import check_targets, headline, judged_clock, ratios
from .zoo import Zoo, build_zoo


@dataclass
class Batch:
    ids: torch.Tensor
    mask: torch.Tensor


def _low_id(config: Any) -> int:
    specials = [getattr(config, n, None) for n in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id")]
    return min(max([v for v in specials if isinstance(v, int)] + [-1]) + 1, config.vocab_size - 1)


def random_ids(config: Any, batch: int, length: int, seed: int) -> torch.Tensor:
    """Uniform random token ids above the special ids (timings don't depend on the text)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(_low_id(config), config.vocab_size, (batch, length), generator=generator)


def make_batch(config: Any, batch: int, length: int, seed: int, device: Any) -> Batch:
    ids = random_ids(config, batch, length, seed).to(device)
    return Batch(ids, torch.ones_like(ids))


def template_parts(tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the chat template around a system turn and a user turn: (before the system text, between the
    system text and the user text, after the user text including the generation prompt); empty without a template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return [], [], []
    mark_s, mark_u = "\u2063SYSTEM\u2063", "\u2063USER\u2063"
    messages = [{"role": "system", "content": mark_s}, {"role": "user", "content": mark_u}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, rest = text.split(mark_s)
    middle, tail = rest.split(mark_u)
    return tuple(tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in (head, middle, tail))


def system_inputs(zoo: Zoo, s: Settings, batch: int, device: Any) -> tuple[Batch, Batch]:
    """(full request, user turn alone) for the system-prompt row. Full: `system_tokens` of system turn (template
    head + fixed random ids), then the slot's placeholders, then `user_tokens` of user turn (end of the system turn,
    user header, random ids, end of turn, generation prompt); the same system prompt in every row, different user
    turns. The user turn alone is exactly the last `user_tokens` of each row."""
    config = zoo.base.config
    head, middle, tail = template_parts(zoo.tokenizer)
    system_fill = s.system_tokens - len(head)
    user_fill = s.user_tokens - len(middle) - len(tail)
    if system_fill < 0 or user_fill < 0:
        raise ValueError(f"--system-tokens/--user-tokens too small for the chat template ({len(head)}, {len(middle)})")
    system = head + random_ids(config, 1, system_fill, s.seed)[0].tolist()
    slot_id = zoo.slot.peft_config["default"].slot_token_ids[0]
    user = random_ids(config, batch, user_fill, s.seed + 1)
    user = torch.cat([torch.tensor([middle] * batch, dtype=torch.long).view(batch, -1), user], dim=1)
    user = torch.cat([user, torch.tensor([tail] * batch, dtype=torch.long).view(batch, -1)], dim=1)
    prefix = torch.tensor([system + [slot_id] * s.slot_tokens] * batch, dtype=torch.long)
    full = torch.cat([prefix, user], dim=1).to(device)
    user = user.to(device)
    return Batch(full, torch.ones_like(full)), Batch(user, torch.ones_like(user))


# ------------------------------------------------------------------------------------------- the work being timed


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    out = model(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.ids)
    out.loss.backward()
    optimizer.step()


def prefill(model: nn.Module, batch: Batch, adapter_names: list[str] | None = None, keep: int | None = None) -> None:
    """no_grad forward of the batch without a cache; `keep`: logits of the last `keep` positions only."""
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    if keep is not None:
        extra["logits_to_keep"] = keep
    with torch.no_grad():
        model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False, **extra)


def prefill_recomputed(model: nn.Module, batch: Batch) -> None:
    """Prefill as if every request came to a fresh model: the compiled prompt caches dropped first."""
    model.compiled_prompts.discard()
    prefill(model, batch)


def generate(model: nn.Module, batch: Batch, new_tokens: int, pad_id: int, names: list[str] | None = None) -> None:
    """Greedy, exactly `new_tokens` per row (min = max)."""
    extra = {} if names is None else {"adapter_names": names}
    with torch.no_grad():
        out = model.generate(
            input_ids=batch.ids,
            attention_mask=batch.mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **extra,
        )
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    if sequences.shape[1] - batch.ids.shape[1] != new_tokens:  # a wrong count would silently skew tokens/s
        raise RuntimeError(f"generate returned {sequences.shape[1] - batch.ids.shape[1]} new tokens, not {new_tokens}.")


# ---------------------------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One measurable thing: `fn` runs it once, `prepare` (untimed) puts the shared models in its state first."""

    kind: str
    method: str
    p: int | None
    b: int
    length: int
    fn: Callable[[], Any]
    prepare: Callable[[], Any]
    memory_of: tuple[nn.Module, torch.optim.Optimizer | None] | None = None

    @property
    def key(self) -> dict[str, Any]:
        return {"kind": self.kind, "method": self.method, "P": self.p, "B": self.b, "L": self.length}


def _lengths(method: str, s: Settings) -> list[int | None]:
    return list(s.prompt_lengths) if method in PROMPT_METHODS else [None]


def train_tasks(zoo: Zoo, s: Settings, batch: Batch, gc: bool) -> list[Task]:
    tasks = []
    for method in (m for m in s.methods if m in (CHECKPOINTED if gc else TRAINABLE)):
        for p in _lengths(method, s):
            model, optimizer = zoo.model(method, p), zoo.optimizers[(method, p)]
            tasks.append(
                Task(
                    "train_gc" if gc else "train",
                    method,
                    p,
                    batch.ids.shape[0],
                    batch.ids.shape[1],
                    lambda m=model, o=optimizer: train_step(m, o, batch),
                    lambda m=method: zoo.configure(m, checkpointing=gc),
                    memory_of=(model, optimizer),
                )
            )
    return tasks


def eval_tasks(zoo: Zoo, s: Settings, batch: Batch, pad_id: int) -> list[Task]:
    tasks = []
    b, length = batch.ids.shape
    for kind in ("prefill", "generate"):
        for method in s.methods:
            for p in _lengths(method, s):
                model = zoo.model(method, p)
                if kind == "prefill":
                    fn = lambda m=model: prefill(m, batch)  # noqa: E731
                else:
                    fn = lambda m=model: generate(m, batch, s.new_tokens, pad_id)  # noqa: E731
                prepare = lambda m=method: zoo.configure(m)  # noqa: E731
                tasks.append(Task(kind, method, p, b, length, fn, prepare))
    return tasks


def mixed_tasks(zoo: Zoo, s: Settings, length: int, pad_id: int, device: Any) -> list[Task]:
    n = s.mixed_adapters
    batch = make_batch(zoo.base.config, n, length, s.seed, device)
    names = [f"task{i}" for i in range(n)]
    tasks = []
    for p, wrapper in zoo.mixed.items():
        for mode, rows in (("single", None), ("mixed", names)):
            method = f"ours_shared_{mode}"
            prepare = lambda: zoo.configure("ours_shared")  # noqa: E731
            tasks.append(
                Task("mixed_prefill", method, p, n, length, lambda w=wrapper, r=rows: prefill(w, batch, r), prepare)
            )
            gen = lambda w=wrapper, r=rows: generate(w, batch, s.new_tokens, pad_id, r)  # noqa: E731
            tasks.append(Task("mixed_generate", method, p, n, length, gen, prepare))
    return tasks


def system_tasks(zoo: Zoo, s: Settings, b: int, device: Any) -> list[Task]:
    """kind "system": prefill returning every position's logits (the forward's contract, as in the prefill rows);
    kind "system_last": the next-token logits only (``logits_to_keep=1``), what a request's prefill needs."""
    full, user = system_inputs(zoo, s, b, device)
    hard = _without_slot(full, s)
    p, length = s.slot_tokens, s.user_tokens
    shared = lambda: zoo.configure("ours_shared")  # noqa: E731
    tasks = []
    for kind, keep in (("system", None), ("system_last", 1)):
        bare = lambda k=keep: prefill(zoo.base, user, keep=k)  # noqa: E731
        tasks.append(Task(kind, "bare_user_turn", None, b, length, bare, shared))
        compiled = lambda k=keep: prefill(zoo.slot, full, keep=k)  # noqa: E731
        tasks.append(Task(kind, "ours_compiled", p, b, length, compiled, shared))
    tasks.append(Task("system", "bare_hard_system", None, b, length, lambda: prefill(zoo.base, hard), shared))
    tasks.append(
        Task("system", "ours_recomputed", p, b, length, lambda: prefill_recomputed(zoo.slot_recomputed, full), shared)
    )
    return tasks


def _without_slot(full: Batch, s: Settings) -> Batch:
    """The same request with no soft tokens: the bare model's cost of a hard system prompt (a reference)."""
    keep = torch.ones(full.ids.shape[1], dtype=torch.bool)
    keep[s.system_tokens : s.system_tokens + s.slot_tokens] = False
    return Batch(full.ids[:, keep], full.mask[:, keep])


@dataclass
class Group:
    name: str
    training: bool
    tasks: list[Task]


def plan(zoo: Zoo, s: Settings, device: Any, pad_id: int) -> list[Group]:
    """Per (B, L): a training group (with its checkpointed twins interleaved in the same rounds) and an eval group;
    per L a mixed-batch group; per B a system-prompt group."""
    groups: list[Group] = []
    for b in s.batch_sizes:
        for length in s.seq_lengths:
            batch = make_batch(zoo.base.config, b, length, s.seed, device)
            train = train_tasks(zoo, s, batch, gc=False) + (
                train_tasks(zoo, s, batch, gc=True) if s.checkpointing else []
            )
            if train:
                groups.append(Group(f"train B={b} L={length}", True, train))
            groups.append(Group(f"eval B={b} L={length}", False, eval_tasks(zoo, s, batch, pad_id)))
    if zoo.mixed:
        for length in s.seq_lengths:
            groups.append(Group(f"mixed L={length}", False, mixed_tasks(zoo, s, length, pad_id, device)))
    if zoo.slot is not None:
        for b in s.system_batch_sizes:
            groups.append(Group(f"system B={b}", False, system_tasks(zoo, s, b, device)))
    return groups


# ------------------------------------------------------------------------------------------------------------ the run


def instrument(task: Task, s: Settings, count: bool, memory: bool) -> dict[str, Any]:
    """`s.warmup` plain runs, then untimed runs measuring FLOPs and aten ops (`count`) and, for training with
    `memory`, peak memory (a run of its own: the counting modes change what a checkpointed step keeps alive, +80 MB
    for ours at B=8, L=64). Never the very first run: that one pays one-offs no timed run pays (our wrappers probe
    the architecture on their first forward, 3x a step's ops; the first inference run builds the compiled prompt
    cache)."""
    task.prepare()
    for _ in range(max(s.warmup, 1)):
        task.fn()
    record: dict[str, Any] = {}
    if count:
        record["flops"], record["ops"] = measure.count_work(task.fn)
    if memory and task.memory_of is not None:
        net, optimizer = task.memory_of
        record["persistent_bytes"] = measure.persistent_bytes(net, optimizer)
        _, record["step_peak_bytes"] = measure.step_peak_bytes(task.fn, s.device)
        record["total_peak_bytes"] = record["persistent_bytes"] + record["step_peak_bytes"]
    return record


@dataclass(frozen=True)
class Duties:
    """What one measuring process instruments besides timing. With several processes the untimed runs are split
    (FLOPs and ops are deterministic, memory is per process), so each spends more of its time on timed rounds."""

    index: int
    count: bool
    memory: bool

    @classmethod
    def of(cls, index: int, s: Settings) -> Duties:
        return cls(index, count=index == 0, memory=s.memory and index == min(1, s.jobs - 1))


def run_group(group: Group, s: Settings, duties: Duties, progress: Any) -> list[dict[str, Any]]:
    records = [{**task.key, **instrument(task, s, duties.count, duties.memory)} for task in group.tasks]
    progress.update(len(group.tasks))
    samples = measure.interleaved(
        [t.fn for t in group.tasks],
        rounds=s.rounds,
        device=s.device,
        budget_s=s.max_group_seconds,
        min_rounds=s.min_rounds,
        on_run=lambda: progress.update(1),
        prepare=[t.prepare for t in group.tasks],
    )
    for record, runs in zip(records, samples, strict=True):
        record["times_s"] = [x.wall for x in runs]
        record["cpu_times_s"] = [x.cpu for x in runs]
        record["process"] = [duties.index] * len(runs)
    return records


def measure_process(s: Settings, index: int) -> dict[str, Any]:
    """Everything one measuring process does: load the model, build the zoo, time every group. Process `index` of
    `s.jobs` (each runs the whole plan on its own core; `run` pools their rounds)."""
    from tqdm.auto import tqdm

    machine.steady_allocator()
    threads = machine.set_threads(s.threads)
    torch.manual_seed(s.seed)
    loaded = models.load_causal_lm(s.model, s.dtype, s.device)
    zoo = build_zoo(loaded, s)
    groups = plan(zoo, s, s.device, models.pad_token_id(zoo.base.config, zoo.tokenizer))
    duties = Duties.of(index, s)
    total = sum(len(g.tasks) * (1 + s.rounds) for g in groups)
    records: list[dict[str, Any]] = []
    desc = "bench_speed" if s.jobs == 1 else f"bench_speed {index + 1}/{s.jobs}"
    with tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True, position=index) as progress:
        for group in groups:
            progress.set_postfix_str(group.name)
            for net in (*zoo.wrappers(), zoo.base):
                net.train(group.training)
            with torch.set_grad_enabled(group.training):
                records += run_group(group, s, duties, progress)
    zoo.configure("bare")
    return {
        "model": loaded.name,
        "model_parameters": sum(p.numel() for p in zoo.base.parameters()),
        "lora_targets": zoo.lora_targets,
        "machine": {**machine.machine_info(s.device), "torch_threads": threads},
        "records": records,
    }


MEMORY_FIELDS = ("persistent_bytes", "step_peak_bytes", "total_peak_bytes")


def pool(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per task: the timed runs of every process in process order, FLOPs and ops from process 0, memory
    from the process that measured it."""
    pooled = []
    for same in zip(*(part["records"] for part in parts), strict=True):
        keys = {tuple(r[k] for k in ("kind", "method", "P", "B", "L")) for r in same}
        if len(keys) != 1:
            raise RuntimeError(f"measuring processes ran different tasks: {sorted(keys)}")
        record = {k: v for k, v in same[0].items() if k not in MEMORY_FIELDS}
        for name in ("times_s", "cpu_times_s", "process"):
            record[name] = [x for r in same for x in r[name]]
        record.update({k: r[k] for r in same for k in MEMORY_FIELDS if k in r})
        pooled.append(record)
    return pooled


def run(s: Settings) -> dict[str, Any]:
    """Run the whole benchmark in `s.jobs` measuring processes and return the results dictionary (`main` writes it
    to disk)."""
    with machine.LoadMonitor() as load:
        started = time.time()
        arguments = [(s, i) for i in range(s.jobs)]  # map_jobs runs a single job in this process
        parts = workers.map_jobs(measure_process, arguments, s.jobs, s.threads or 1, quiet=cli.quiet_libraries)
        wall = time.time() - started
    first = parts[0]
    results = {
        "benchmark": "bench_speed",
        "model": first["model"],
        "model_parameters": first["model_parameters"],
        "settings": asdict(s),
        "lora_targets": first["lora_targets"],
        "inputs": "uniform random token ids above the special ids, no padding, seed = settings.seed "
        "(system-prompt row: the model's chat template around random ids)",
        "machine": first["machine"],
        "load": load.summary(),
        "wall_seconds": round(wall, 1),
        "records": pool(parts),
    }
    results["ratios"] = ratios(results["records"])
    results["targets"] = check_targets(results["ratios"], judged_clock(s.device))
    results["headline"] = headline(results["ratios"])
    return results
