"""The ``softprompt`` command: train, generate with, inspect, decode and export soft prompts from a shell.

Every subcommand is one module with `add_parser(subparsers)` and `run(args)`, listed in `COMMANDS`. Bad input
(missing files, malformed JSONL, unknown models, out-of-range options, unsafe output paths) ends in one line on
stderr and exit status 1 (usage errors 2), checked before any model is loaded; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from . import cmd_decode, cmd_export, cmd_generate, cmd_info, cmd_train
from .common import CliError

PROG = "softprompt"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
COMMANDS: dict[str, ModuleType] = {
    "train": cmd_train,
    "generate": cmd_generate,
    "info": cmd_info,
    "decode": cmd_decode,
    "export": cmd_export,
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (the full usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Soft prompts for Hugging Face PEFT: train, generate, inspect, decode.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks (also accepted after the command).")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log library messages (INFO).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) if str(err).strip() else type(err).__name__
    if isinstance(err, KeyError):  # KeyError's str() is the repr of the key
        text = f"missing key {text}"
    if not isinstance(err, CliError | OSError | ValueError):
        text = f"{type(err).__name__}: {text}"
    return text


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:  # the CLI prints what matters; hub retries and load reports are noise here
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations are for developers (-v shows them)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    _quiet_libraries(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: {getattr(args, 'interrupt_message', 'interrupted')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(err)} (--debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
