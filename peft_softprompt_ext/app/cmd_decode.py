"""``softprompt decode``: the nearest vocabulary tokens of each virtual token of a saved adapter.

Only the base model's input embeddings are needed, so the base is loaded as a bare ``AutoModel`` whatever the
adapter's task (no head to mismatch). Options are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from transformers import AutoModel

from .. import adapter_dir
from ..constants import METRICS
from ..decode import decode_prompt
from ..vocab import load_tokenizer, special_token_ids
from .common import CliError, load_error, positive_int, resolve_model

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("decode", help="Show the nearest vocabulary tokens of a saved soft prompt.")
    p.add_argument("adapter_dir", help="A saved soft-prompt adapter directory.")
    p.add_argument("--base", help="Base model path (default: the adapter config's base_model_name_or_path).")
    p.add_argument("--tokenizer", help="Tokenizer path (default: the adapter's tokenizer, else --base).")
    p.add_argument("--metric", choices=METRICS, default="cosine", help="Nearest-neighbour metric.")
    p.add_argument("--top-k", type=positive_int, default=5, help="Candidates per virtual token (default 5).")
    p.add_argument("--keep-special", action="store_true", help="Allow special tokens as candidates.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    p.set_defaults(func=run)


def _tokenizer(name: str | None) -> Any:
    if not name:
        return None
    try:
        path, extra = resolve_model(name)
        return load_tokenizer(path, extra)
    except (OSError, ValueError, CliError) as err:
        logger.warning("No tokenizer at %r (%s); printing token ids only.", name, err)
        return None


def run(args: argparse.Namespace) -> int:
    """Print the decoded prompt of ``args.adapter_dir`` against the base model's input embeddings."""
    saved = adapter_dir.read(args.adapter_dir, adapter_dir.PROMPT_TYPES)
    base = args.base or saved.config.get("base_model_name_or_path")
    if not base:
        raise CliError("the adapter config names no base model; pass --base MODEL")
    path, extra = resolve_model(base)
    try:  # the checkpoint's dtype: no float32 copy of a big model; never code from the folder
        model = AutoModel.from_pretrained(path, dtype="auto", trust_remote_code=False, use_safetensors=True, **extra)
    except (OSError, ValueError) as err:
        raise load_error(base, err) from err
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    if saved.config.get("vocab_size") not in (None, rows):
        raise CliError(
            f"vocabulary size mismatch: the adapter was trained with vocab_size={saved.config['vocab_size']}, "
            f"the base model {base!r} has {rows} embedding rows"
        )
    tokenizer = _tokenizer(args.tokenizer or saved.config.get("tokenizer_name_or_path") or base)
    exclude = set() if args.keep_special else special_token_ids(tokenizer, model.config)
    if args.top_k > rows - len(exclude):
        raise CliError(f"--top-k {args.top_k} exceeds the {rows - len(exclude)} candidate tokens")
    result = decode_prompt(saved.prompt, embeddings, tokenizer, args.metric, args.top_k, exclude, not args.keep_special)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0
