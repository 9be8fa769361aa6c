"""``softprompt train``: tune a soft prompt on a causal LM, evaluate before and after, save the adapter."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ..initializers import INITIALIZERS
from .common import positive_float, positive_int
from .recipe import DATA_FEW_SHOT, OPTIMIZERS, PLACEMENTS, SCHEDULES, TrainResult, TrainSettings, train

PROG = "softprompt"


def cli_inits() -> list[str]:
    """Every registered initialiser but "pretrained" (it needs an adapter directory: the Python API's init_from)."""
    return [name for name in INITIALIZERS if name != "pretrained"]


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def add_parser(subparsers: Any) -> None:
    d = TrainSettings(out="")
    p = subparsers.add_parser(
        "train",
        help="Tune a soft prompt; evaluate before and after; save the adapter.",
        description="Tune a soft prompt on a causal LM. With only --out: the bundled SmolLM2-135M-Instruct on the "
        "built-in WordNet supersense task, scored by label ranking; with --data: your JSONL, scored by exact match "
        "of greedy generation.",
    )
    p.add_argument("--out", required=True, help="Adapter directory to write (must be missing or empty).")
    p.add_argument("--model", help="Base model: local folder or hub id (default: bundled SmolLM2-135M-Instruct).")
    p.add_argument(
        "--data", help='Training JSONL: one {"input": ..., "output": ...} per line (default: built-in task).'
    )
    p.add_argument("--eval-data", help="Held-out JSONL (default: up to --eval-size examples split off --data).")
    p.add_argument("--instruction", help="Text placed before every input of --data (before and after tuning).")
    p.add_argument("--num-tokens", type=positive_int, default=d.num_tokens, help=f"Virtual tokens ({d.num_tokens}).")
    p.add_argument("--init", choices=cli_inits(), default=d.init, help=f"Initialisation (default {d.init}).")
    p.add_argument("--init-text", help="Text for --init text (default: a description of the task).")
    p.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default=d.placement,
        help="Where the soft prompt goes: before everything (prepend, default) or as a slot in the chat "
        "template's system turn (system).",
    )
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"Learning rate (default {d.lr}).")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help=f"Optimizer (default {d.optimizer}).")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help=f"lr after a 10 %% warm-up: decay to 0 linearly, keep it, or cosine (default {d.schedule}).",
    )
    p.add_argument(
        "--few-shot",
        type=non_negative_int,
        default=d.few_shot,
        help=f"Solved training examples in the few-shot baseline (default: one per class for the built-in task, "
        f"{DATA_FEW_SHOT} for --data; 0: no few-shot baseline).",
    )
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"Optimizer steps (default {d.steps}).")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"Examples per step ({d.batch_size}).")
    p.add_argument("--eval-size", type=positive_int, default=d.eval_size, help=f"Held-out examples ({d.eval_size}).")
    p.add_argument(
        "--max-input-tokens",
        type=positive_int,
        default=d.max_input_tokens,
        help=f"Cut longer inputs to this many tokens (default {d.max_input_tokens}).",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"Seed of data order and init (default {d.seed}).")
    p.add_argument("--device", default=d.device, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="Replace --out if it is an adapter directory.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    p.set_defaults(func=run, interrupt_message="interrupted: no adapter was written")


def _fmt(result: Any) -> str:
    loss = "" if result.loss is None else f"   loss {result.loss:.3f}"
    return f"{100 * result.accuracy:5.1f} %  ({round(result.accuracy * result.n)}/{result.n}){loss}"


def _shots(result: TrainResult) -> int:
    return int(result.few_shot_k or 0)


def report(result: TrainResult, settings: TrainSettings, out: str) -> None:
    """The before/after table and where the adapter went."""
    before, after = result.before, result.after
    if before.prompt_tokens:
        hard = f"zero-shot, hand-written instruction ({before.prompt_tokens} tokens)"
    else:
        hard = "zero-shot, no soft prompt" + (" (same instruction)" if settings.instruction else "")
    where = ", in the system turn" if settings.placement == "system" else ""
    soft = f"soft prompt ({settings.num_tokens} virtual tokens{where}, {settings.steps} steps)"
    rows = [("before", hard, before)]
    if result.few_shot is not None:
        few = result.few_shot
        extra = f", {few.prompt_tokens} tokens" if few.prompt_tokens else ""
        rows.append(("before", f"few-shot, {_shots(result)} solved examples in the context{extra}", few))
    rows.append(("after", soft, after))
    width = max(len(label) for _, label, _ in rows)
    print(f"\n{before.metric} on {before.n} held-out examples:")
    for when, label, scored in rows:
        print(f"  {when:<6}  {label:<{width}}  {_fmt(scored)}")
    print(f"training took {result.train_seconds:.0f} s")
    print(f"saved adapter to {result.adapter_dir}")
    print(f"try: {PROG} info {out}  |  {PROG} decode {out}  |  {PROG} generate --adapter {out} TEXT")


def run(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if hasattr(args, f.name)}
    settings = TrainSettings(**given, progress=not args.no_progress)
    settings.validate()
    report(train(settings, log=print), settings, args.out)
    return 0
