"""``softprompt generate``: greedy generation with saved soft prompts (or the bare model), all rows one batch."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from peft import PeftModel

from .. import adapter_dir, slots
from ..constants import BASE_ADAPTER, TRAINING_INFO_NAME
from .bundled import bundled_folder
from .common import CliError, load_model, positive_int, resolve_device
from .data import format_example
from .recipe import left_pad

BASE_SELECTOR = "base"  # `@base text`: this line gets no soft prompt


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="Generate with saved soft prompts, or with the bare model.",
        description="Greedy generation. Each TEXT (or stdin line) is a chat message for chat models. With several "
        "--adapter, a line '@NAME text' goes to adapter NAME ('@base' to none) and any other line goes to every "
        "adapter; all rows run as ONE mixed batch (model.generate(adapter_names=...)). Without --adapter the bare "
        "model answers (--base, default the bundled SmolLM2).",
    )
    p.add_argument("text", nargs="*", help="Inputs (default: one per line from stdin).")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="Adapter directory, repeatable; NAME defaults to the directory's name.",
    )
    p.add_argument("--base", help="Base model (default: the first adapter's base_model_name_or_path).")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="Tokens to generate (default 32).")
    p.add_argument(
        "--instruction",
        help="Instruction placed before every input (default: the one the adapter was trained with, if any).",
    )
    p.add_argument("--raw", action="store_true", help="Send the text as is (no chat template, no instruction).")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.set_defaults(func=run)


def adapter_specs(values: Sequence[str]) -> list[tuple[str, str]]:
    """``[NAME=]DIR`` strings to unique (name, dir) pairs, checking that each dir holds a soft prompt."""
    specs: list[tuple[str, str]] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or os.path.isdir(value):
            name, path = os.path.basename(os.path.normpath(value)) or "adapter", value
        if not os.path.isdir(path):
            raise CliError(f"adapter directory not found: {path}")
        adapter_dir.read(path, adapter_dir.PROMPT_TYPES)
        if name == BASE_SELECTOR or any(name == n for n, _ in specs):
            raise CliError(f"adapter name {name!r} is taken; name it explicitly with --adapter NAME={path}")
        specs.append((name, path))
    return specs


def default_base(folder: str) -> str | None:
    """The adapter's recorded base (a bundled model's hub id or old path maps to this machine's copy: None)."""
    base = adapter_dir.read_config(folder).get("base_model_name_or_path")
    if not base:
        raise CliError(f"{folder} names no base model; pass --base MODEL")
    return None if bundled_folder(base) is not None else base


def rows_of(lines: Sequence[str], names: list[str]) -> list[tuple[str, str]]:
    """(adapter name or BASE_SELECTOR, text) for each generated row."""
    rows = []
    for line in lines:
        if line.startswith("@"):
            name, _, text = line[1:].partition(" ")
            if name != BASE_SELECTOR and name not in names:
                raise CliError(f"unknown adapter @{name}; loaded: {', '.join(names) or 'none'} (or @{BASE_SELECTOR})")
            rows.append((name, text.strip()))
        else:
            rows.extend((name, line) for name in names or [BASE_SELECTOR])
    return rows


def _trained_instruction(folder: str) -> str | None:
    path = os.path.join(folder, TRAINING_INFO_NAME)
    if not os.path.isfile(path):
        return None
    return adapter_dir.read_json_file(path).get("instruction")


def _load(args: argparse.Namespace, specs: list[tuple[str, str]], device: torch.device) -> tuple[Any, Any]:
    """The base once, then every adapter by name."""
    base_name = args.base if args.base or not specs else default_base(specs[0][1])
    model, tokenizer, _ = load_model(base_name, device)
    if specs:
        model = PeftModel.from_pretrained(model, specs[0][1], adapter_name=specs[0][0])
        for name, path in specs[1:]:
            model.load_adapter(path, adapter_name=name)
    return model.eval(), tokenizer


def _encode(args: argparse.Namespace, model: Any, tokenizer: Any, specs, rows) -> list[list[int]]:
    """Each row's ids: the chat template around its text, after its adapter's instruction, with its adapter's slot
    in the system turn when the prompt sits there."""
    if args.raw:
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in rows]
    trained_with = {n: _trained_instruction(p) for n, p in specs}
    system = {}
    for name, _ in specs:
        if model.peft_config[name].slots:
            slots.add_slot_tokens(tokenizer, model, name)
            system[name] = slots.slot_text(model, adapter_name=name)
    encoded = []
    for name, text in rows:
        instruction = args.instruction if args.instruction is not None else trained_with.get(name)
        formatted = format_example(tokenizer, text, instruction, system.get(name))
        encoded.append(tokenizer(formatted, add_special_tokens=False)["input_ids"])
    return encoded


def run(args: argparse.Namespace) -> int:
    """Load the base once, every adapter by name, and generate all rows in one mixed batch."""
    specs = adapter_specs(args.adapter)
    lines = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not lines:
        raise CliError("no input text: pass TEXT arguments or lines on stdin")
    rows = rows_of(lines, [name for name, _ in specs])
    device = resolve_device(args.device)
    model, tokenizer = _load(args, specs, device)
    ids, mask = left_pad(_encode(args, model, tokenizer, specs, rows), tokenizer.pad_token_id, device)
    kwargs = {"adapter_names": [BASE_ADAPTER if n == BASE_SELECTOR else n for n, _ in rows]} if specs else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    tag = len(specs) > 1 or any(line.startswith("@") for line in lines)
    for (name, _), text in zip(rows, texts, strict=True):
        text = " ".join(text.strip().splitlines())
        print(f"[{name}] {text}" if tag else text)
    return 0
