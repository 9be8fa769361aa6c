"""The ``softprompt decode`` and ``softprompt export`` subcommands, kept apart so the CLI module mounts them with
`add_decode_export_subparsers(subparsers)`; `main(argv)` runs just these two (for tests and direct use).

``softprompt decode ADAPTER_DIR [--base MODEL] [--tokenizer TOK] [--metric cosine|l2|dot] [--top-k K]``
    prints the nearest vocabulary tokens of each virtual token. Only the base model's input embeddings are
    needed, so it loads the base as a bare ``AutoModel`` whatever the adapter's task (no head to mismatch).
``softprompt export ADAPTER_DIR --to peft|embeds|softprompt OUT [--overwrite] [--dtype DTYPE]``
    ``peft``: a vanilla PEFT PROMPT_TUNING adapter; ``embeds``: raw prompt embeddings + JSON (vLLM);
    ``softprompt``: import a PEFT PROMPT_TUNING dir (ADAPTER_DIR) as one of ours.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

EXPORT_TARGETS = ("peft", "embeds", "softprompt")
METRICS = ("cosine", "l2", "dot")  # = decode.METRICS; not imported so `--help` needn't import torch and peft


def add_decode_export_subparsers(subparsers: Any) -> None:
    """Add ``decode`` and ``export`` to an argparse subparsers object; each sets ``func`` to its command."""
    decode = subparsers.add_parser("decode", help="Show the nearest vocabulary tokens of a saved soft prompt.")
    decode.add_argument("adapter_dir", help="A saved soft-prompt adapter directory.")
    decode.add_argument("--base", help="Base model path (default: the adapter config's base_model_name_or_path).")
    decode.add_argument("--tokenizer", help="Tokenizer path (default: the adapter's tokenizer, else --base).")
    decode.add_argument("--metric", choices=METRICS, default="cosine", help="Nearest-neighbour metric.")
    decode.add_argument("--top-k", type=int, default=5, help="Candidates per virtual token (default 5).")
    decode.add_argument("--keep-special", action="store_true", help="Allow special tokens as candidates.")
    decode.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    decode.set_defaults(func=decode_command)

    export = subparsers.add_parser("export", help="Export a soft prompt to vanilla PEFT or raw prompt embeddings.")
    export.add_argument("adapter_dir", help="Adapter directory to export (a PEFT one for --to softprompt).")
    export.add_argument("--to", choices=EXPORT_TARGETS, required=True, help="Output format.")
    export.add_argument("out", help="Output directory (must be missing or empty unless --overwrite).")
    export.add_argument("--overwrite", action="store_true", help="Replace a non-empty output directory.")
    export.add_argument("--dtype", help="Cast embeddings (--to embeds), e.g. bfloat16.")
    export.add_argument("--base", help="base_model_name_or_path to record (--to peft); default: the adapter's.")
    export.set_defaults(func=export_command)


def _load_tokenizer(path: str | None) -> Any:
    if not path:
        return None
    from .prompt import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        logger.warning("No tokenizer at %r (%s); printing token ids only.", path, err)
        return None


def decode_command(args: argparse.Namespace) -> int:
    """Print the decoded prompt of ``args.adapter_dir`` against the base model's input embeddings."""
    from transformers import AutoModel

    from .decode import decode_prompt
    from .export import PEFT_PROMPT_TUNING_TYPE, PROMPT_KEY, SOFT_PROMPT_TYPE, read_adapter

    config, state = read_adapter(args.adapter_dir, peft_type=(SOFT_PROMPT_TYPE, PEFT_PROMPT_TUNING_TYPE))
    base = args.base or config.get("base_model_name_or_path")
    if not base:
        raise SystemExit("decode: the adapter config names no base model; pass --base MODEL.")
    model = AutoModel.from_pretrained(base, dtype="auto")  # the checkpoint's dtype: no float32 copy of a big model
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    if config.get("vocab_size") not in (None, rows):
        raise SystemExit(
            f"decode: vocabulary size mismatch: the adapter was trained with vocab_size={config['vocab_size']}, "
            f"the base model {base!r} has {rows} embedding rows."
        )
    tokenizer = _load_tokenizer(args.tokenizer or config.get("tokenizer_name_or_path") or base)
    exclude: set[int] = set()
    if not args.keep_special:
        from .prompt import special_token_ids

        exclude = special_token_ids(tokenizer, model.config)
    try:
        result = decode_prompt(
            state[PROMPT_KEY], embeddings, tokenizer, args.metric, args.top_k, exclude, not args.keep_special
        )
    except ValueError as err:
        raise SystemExit(f"decode: {err}") from err
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


def export_command(args: argparse.Namespace) -> int:
    """Convert ``args.adapter_dir`` to ``args.to`` format in ``args.out``."""
    from . import export

    try:
        if args.to == "peft":
            path = export.export_peft_prompt_tuning(
                args.adapter_dir, args.out, base_model_name_or_path=args.base, overwrite=args.overwrite
            )
        elif args.to == "embeds":
            path = export.export_prompt_embeds(args.adapter_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
        else:
            path = export.import_peft_prompt_tuning(args.adapter_dir, args.out, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"export: {err}") from err
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``decode`` / ``export`` alone: ``python -m peft_softprompt_ext.cli_decode decode ADAPTER_DIR``."""
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__.splitlines()[0])
    add_decode_export_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
