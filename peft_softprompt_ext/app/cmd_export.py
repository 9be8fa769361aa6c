"""``softprompt export``: to a vanilla PEFT PROMPT_TUNING adapter, to raw prompt embeddings, or back from PEFT."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .. import export
from ..adapter_dir import check_replaceable, check_writable
from ..constants import EXPORT_DTYPES

TARGETS: dict[str, Callable[[argparse.Namespace], str]] = {
    "peft": lambda a: export.export_peft_prompt_tuning(
        a.adapter_dir, a.out, base_model_name_or_path=a.base, overwrite=a.overwrite
    ),
    "embeds": lambda a: export.export_prompt_embeds(a.adapter_dir, a.out, dtype=a.dtype, overwrite=a.overwrite),
    "softprompt": lambda a: export.import_peft_prompt_tuning(a.adapter_dir, a.out, overwrite=a.overwrite),
}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="Export a soft prompt to vanilla PEFT or raw prompt embeddings.")
    p.add_argument("adapter_dir", help="Adapter directory to export (a PEFT one for --to softprompt).")
    p.add_argument("--to", choices=tuple(TARGETS), required=True, help="Output format.")
    p.add_argument("out", help="Output directory (must be missing or empty unless --overwrite).")
    p.add_argument("--overwrite", action="store_true", help="Replace OUT if this package wrote it.")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, help="Cast embeddings (--to embeds), e.g. bfloat16.")
    p.add_argument("--base", help="base_model_name_or_path to record (--to peft); default: the adapter's.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert ``args.adapter_dir`` to ``args.to`` format in ``args.out``."""
    if args.overwrite:
        check_replaceable(args.out, "OUT")
    check_writable(args.out, "OUT")
    print(TARGETS[args.to](args))
    return 0
