"""Command-line pieces every benchmark shares.

    parser = argparse.ArgumentParser()
    cli.add_common_arguments(parser, name="speed")     # --model --device --dtype --threads --seed --out-dir --name
    args = parser.parse_args()                          #   --no-plot --no-readme
    cli.quiet_libraries()
    command = cli.command_line("benchmarks/bench_speed.py", argv)

API:

- `add_common_arguments(parser, name, threads=None, dtype="fp32", readme=True)`: adds ``--model`` (HF causal LM
  folder; default None = bundled SmolLM2-135M-Instruct), ``--device`` (cpu | cuda[:N]), ``--dtype`` (fp32 | bf16
  | fp16), ``--threads`` (torch intra-op threads; default ``threads``), ``--seed`` (0), ``--out-dir``
  (benchmarks/results), ``--name`` (output file stem; default None, the script picks from ``name``),
  ``--no-plot`` (``args.plot``), and with ``readme`` ``--no-readme`` (``args.readme``).
- `quiet_libraries()`: transformers/peft/httpx loggers to ERROR and the known harmless warnings ignored.
- `command_line(script, argv)`: ``"python <script> <args>"``, shell-quoted, for the report (argv None: sys.argv).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import warnings
from collections.abc import Sequence

from . import RESULTS_DIR

__all__ = ["add_common_arguments", "command_line", "quiet_libraries"]


def add_common_arguments(
    parser: argparse.ArgumentParser, name: str, threads: int | None = None, dtype: str = "fp32", readme: bool = True
) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="HF causal LM folder (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", default=dtype, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=threads, help="torch intra-op threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where <name>.json/.md/.png go")
    parser.add_argument("--name", default=None, help=f"output file stem (default: {name})")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="don't write the plot")
    if readme:
        parser.add_argument(
            "--no-readme", dest="readme", action="store_false", help="don't write into benchmarks/README.md"
        )
    return parser


def quiet_libraries() -> None:
    for noisy in ("transformers", "peft", "httpx", "peft_softprompt_ext.prompt"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*[Pp]osition ids are not supported.*")
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    warnings.filterwarnings("ignore", message=".*use_cache=True.*is incompatible with gradient checkpointing.*")


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", script, *(shlex.quote(a) for a in args)])
