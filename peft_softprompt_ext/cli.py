"""The ``softprompt`` command: train, generate with, inspect, decode and export soft prompts from a shell.

Bad input (missing files, malformed JSONL, unknown models, out-of-range options) ends in one line on stderr and a
non-zero exit; ``--debug`` shows the traceback instead. Model loading and training happen inside the commands,
after the arguments have been checked, so that bad options fail before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from .cli_decode import add_decode_export_subparsers

PROG = "softprompt"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
BASE_SELECTOR = "base"  # `@base text` in `generate`: this line gets no soft prompt


class CliError(Exception):
    """A user-facing error: printed as one line, never with a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (the full usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- train


def _positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _add_train(subparsers: Any) -> None:
    from .train import TrainSettings

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
    p.add_argument("--data", help="Training JSONL: one {\"input\": ..., \"output\": ...} per line "
                   "(default: the built-in supersense task).")  # fmt: skip
    p.add_argument("--eval-data", help="Held-out JSONL (default: up to --eval-size examples split off --data).")
    p.add_argument("--instruction", help="Text placed before every input of --data (before and after tuning).")
    p.add_argument("--num-tokens", type=int, default=d.num_tokens, help=f"Virtual tokens (default {d.num_tokens}).")
    p.add_argument("--init", choices=("text", "vocab", "random"), default=d.init, help="Initialisation (default text).")
    p.add_argument("--init-text", help="Text for --init text (default: a description of the task).")
    p.add_argument("--lr", type=_positive_float, default=d.lr, help=f"AdamW learning rate (default {d.lr}).")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Optimizer steps (default {d.steps}).")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"Examples per step (default {d.batch_size}).")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help=f"Held-out examples (default {d.eval_size}).")
    p.add_argument("--max-input-tokens", type=int, default=d.max_input_tokens,
                   help=f"Cut longer inputs to this many tokens (default {d.max_input_tokens}).")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed, help=f"Seed of data order and init (default {d.seed}).")
    p.add_argument("--device", default=d.device, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    p.set_defaults(func=train_command)


def _fmt(result: Any) -> str:
    loss = "" if result.loss is None else f"   loss {result.loss:.3f}"
    return f"{100 * result.accuracy:5.1f} %  ({round(result.accuracy * result.n)}/{result.n}){loss}"


def train_command(args: argparse.Namespace) -> int:
    """Train, then print the before/after table and where the adapter went."""
    from .train import TrainSettings, train

    settings = TrainSettings(
        out=args.out, model=args.model, data=args.data, eval_data=args.eval_data, instruction=args.instruction,
        num_tokens=args.num_tokens, init=args.init, init_text=args.init_text, lr=args.lr, steps=args.steps,
        batch_size=args.batch_size, eval_size=args.eval_size, max_input_tokens=args.max_input_tokens, seed=args.seed,
        device=args.device, overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    settings.validate()
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or (os.listdir(out) and not args.overwrite)):
        raise CliError(f"--out {args.out} exists and is not an empty directory; pass --overwrite to replace it")
    args.interrupt_message = "interrupted: no adapter was written"
    result = train(settings, log=print)
    before, after = result.before, result.after
    if before.prompt_tokens:
        hard = f"zero-shot, hand-written instruction ({before.prompt_tokens} tokens)"
    else:
        hard = "zero-shot, no soft prompt" + (" (same instruction)" if args.instruction else "")
    soft = f"soft prompt ({settings.num_tokens} virtual tokens, {settings.steps} steps)"
    width = max(len(hard), len(soft))
    print(f"\n{before.metric} on {before.n} held-out examples:")
    print(f"  before  {hard:<{width}}  {_fmt(before)}")
    print(f"  after   {soft:<{width}}  {_fmt(after)}")
    print(f"training took {result.train_seconds:.0f} s")
    print(f"saved adapter to {result.adapter_dir}")
    print(f"try: {PROG} info {args.out}  |  {PROG} decode {args.out}  |  {PROG} generate --adapter {args.out} TEXT")
    return 0


# --------------------------------------------------------------------------- generate


def _add_generate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="Generate with one or more saved soft prompts.",
        description="Greedy generation with saved soft prompts. Each TEXT (or stdin line) is a chat message for "
        "chat models. With several --adapter, a line '@NAME text' goes to adapter NAME ('@base' to none) and any "
        "other line goes to every adapter; all rows run as ONE mixed batch (model.generate(adapter_names=...)).",
    )
    p.add_argument("text", nargs="*", help="Inputs (default: one per line from stdin).")
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                   help="Adapter directory, repeatable; NAME defaults to the directory's name.")  # fmt: skip
    p.add_argument("--base", help="Base model (default: the first adapter's base_model_name_or_path).")
    p.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate (default 32).")
    p.add_argument("--instruction", help="Instruction placed before every input (default: the one the adapter was "
                   "trained with, if any).")  # fmt: skip
    p.add_argument("--raw", action="store_true", help="Send the text as is (no chat template, no instruction).")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.set_defaults(func=generate_command)


def _adapter_specs(values: Sequence[str]) -> list[tuple[str, str]]:
    """``[NAME=]DIR`` strings to unique (name, dir) pairs, checking that each dir holds a soft prompt."""
    from .export import PEFT_PROMPT_TUNING_TYPE, SOFT_PROMPT_TYPE, read_adapter

    specs: list[tuple[str, str]] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or os.path.isdir(value):
            name, path = os.path.basename(os.path.normpath(value)) or "adapter", value
        if not os.path.isdir(path):
            raise CliError(f"adapter directory not found: {path}")
        read_adapter(path, peft_type=(SOFT_PROMPT_TYPE, PEFT_PROMPT_TUNING_TYPE))
        if name == BASE_SELECTOR or any(name == n for n, _ in specs):
            raise CliError(f"adapter name {name!r} is taken; name it explicitly with --adapter NAME={path}")
        specs.append((name, path))
    return specs


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _default_base(adapter_dir: str) -> str | None:
    """The adapter's recorded base; a bundled SmolLM2 converted on another machine maps to this machine's copy."""
    from .bundled import SMOLLM2_NAME

    base = _read_json(os.path.join(adapter_dir, "adapter_config.json")).get("base_model_name_or_path")
    if base and not os.path.exists(base) and os.path.basename(os.path.normpath(base)) == SMOLLM2_NAME:
        return None  # train.load_model(None) -> the bundled copy here
    if not base:
        raise CliError(f"{adapter_dir} names no base model; pass --base MODEL")
    return base


def _rows(lines: Sequence[str], names: list[str]) -> list[tuple[str, str]]:
    """(adapter name or BASE_SELECTOR, text) for each generated row."""
    rows = []
    for line in lines:
        if line.startswith("@"):
            name, _, text = line[1:].partition(" ")
            if name != BASE_SELECTOR and name not in names:
                raise CliError(f"unknown adapter @{name}; loaded: {', '.join(names)} (or @{BASE_SELECTOR})")
            rows.append((name, text.strip()))
        else:
            rows.extend((name, line) for name in names)
    return rows


def generate_command(args: argparse.Namespace) -> int:
    """Load the base once, every adapter by name, and generate all rows in one mixed batch."""
    import torch
    from peft import PeftModel

    from .data import format_example
    from .model import BASE_ADAPTER
    from .train import TRAINING_INFO_NAME, left_pad, load_model, resolve_device

    if args.max_new_tokens <= 0:
        raise CliError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    specs = _adapter_specs(args.adapter)
    lines = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not lines:
        raise CliError("no input text: pass TEXT arguments or lines on stdin")
    names = [name for name, _ in specs]
    rows = _rows(lines, names)

    device = resolve_device(args.device)
    base, tokenizer, _ = load_model(args.base if args.base else _default_base(specs[0][1]), device)
    model = PeftModel.from_pretrained(base, specs[0][1], adapter_name=specs[0][0])
    for name, path in specs[1:]:
        model.load_adapter(path, adapter_name=name)
    model.eval()

    trained_with = {n: _read_json(os.path.join(p, TRAINING_INFO_NAME)).get("instruction") for n, p in specs}
    encoded = []
    for name, text in rows:
        if args.raw:
            encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            continue
        instruction = args.instruction if args.instruction is not None else trained_with.get(name)
        formatted = format_example(tokenizer, text, instruction)
        encoded.append(tokenizer(formatted, add_special_tokens=False)["input_ids"])
    ids, mask = left_pad(encoded, tokenizer.pad_token_id, device)
    adapter_names = [BASE_ADAPTER if name == BASE_SELECTOR else name for name, _ in rows]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, adapter_names=adapter_names, max_new_tokens=args.max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    tag = len(specs) > 1 or any(line.startswith("@") for line in lines)
    for (name, _), text in zip(rows, texts, strict=True):
        text = " ".join(text.strip().splitlines())
        print(f"[{name}] {text}" if tag else text)
    return 0


# --------------------------------------------------------------------------- info


def _add_info(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="Describe a saved soft-prompt adapter.")
    p.add_argument("adapter_dir", help="A saved adapter directory.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.set_defaults(func=info_command)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable; keeps type checkers content


def adapter_info(adapter_dir: str) -> dict[str, Any]:
    """What `softprompt info` prints: the config, the tensors' shapes, file sizes and the training record."""
    from .export import PEFT_PROMPT_TUNING_TYPE, PROMPT_KEY, SOFT_PROMPT_TYPE, read_adapter
    from .train import TRAINING_INFO_NAME

    if not os.path.isdir(adapter_dir):
        raise CliError(f"adapter directory not found: {adapter_dir}")
    config, state = read_adapter(adapter_dir, peft_type=(SOFT_PROMPT_TYPE, PEFT_PROMPT_TUNING_TYPE))
    prompt = state[PROMPT_KEY]
    files = {
        name: os.path.getsize(os.path.join(adapter_dir, name))
        for name in sorted(os.listdir(adapter_dir))
        if os.path.isfile(os.path.join(adapter_dir, name))
    }
    training = _read_json(os.path.join(adapter_dir, TRAINING_INFO_NAME))
    return {
        "path": os.path.abspath(adapter_dir),
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        "dtype": str(prompt.dtype).removeprefix("torch."),
        "parameters": sum(t.numel() for t in state.values()),
        "base_model": config.get("base_model_name_or_path"),
        "init": config.get("init", config.get("prompt_tuning_init")),
        "init_text": config.get("init_text", config.get("prompt_tuning_init_text")),
        "reparameterization": config.get("reparameterization"),
        "files": files,
        "saved_with": training.get("versions") or {"peft": config.get("peft_version")},
        "training": {k: training[k] for k in ("task", "instruction", "settings", "before", "after", "train_seconds")
                     if k in training},  # fmt: skip
    }


def info_command(args: argparse.Namespace) -> int:
    info = adapter_info(args.adapter_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("path", "peft_type", "task_type", "num_virtual_tokens", "token_dim", "dtype", "parameters",
                "base_model", "init", "init_text", "reparameterization"):  # fmt: skip
        if info[key] is not None:
            print(f"{key + ':':<20}{info[key]}")
    print("files:              " + ", ".join(f"{n} ({_size(s)})" for n, s in info["files"].items()))
    print("saved with:         " + ", ".join(f"{k} {v}" for k, v in info["saved_with"].items() if v))
    training = info["training"]
    if "before" in training and "after" in training:
        b, a = training["before"], training["after"]
        print(f"trained on:         {training.get('task')} ({training['settings'].get('steps')} steps)")
        print(f"{b['metric']}: before {100 * b['accuracy']:.1f} %, after {100 * a['accuracy']:.1f} % (n={a['n']})")
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Soft prompts for Hugging Face PEFT: train, generate, inspect, decode.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks (also accepted after the command).")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log library messages (INFO).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_generate(sub)
    _add_info(sub)
    add_decode_export_subparsers(sub)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) if str(err).strip() else type(err).__name__
    if isinstance(err, KeyError):  # KeyError's str() is the repr of the key
        text = f"missing key {text}"
    if not isinstance(err, CliError | OSError | ValueError):
        text = f"{type(err).__name__}: {text}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # the CLI prints what matters; hub retries and load reports are noise here
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations are for developers (-v shows them)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: {getattr(args, 'interrupt_message', 'interrupted')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exit_:  # cli_decode reports its errors as SystemExit(message)
        if debug or not isinstance(exit_.code, str):
            raise
        print(f"{PROG}: {exit_.code}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:
        if debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(err)} (--debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
