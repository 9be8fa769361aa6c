"""Tokenizers and the vocabulary: loading a tokenizer a config names (never running its code) and the ids that
must never start or decode a prompt."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import AutoTokenizer

_SPECIAL_CONFIG_IDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "decoder_start_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
)


def load_tokenizer(name_or_path: str, tokenizer_kwargs: Mapping[str, Any] | None = None) -> Any:
    """A tokenizer named by a config read from disk: `trust_remote_code=False` always, so a folder with custom code
    (`auto_map`) is refused instead of asking on stdin whether to run it."""
    kwargs = {k: v for k, v in (tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    if not os.path.isdir(name_or_path) and _cached(name_or_path):
        kwargs.setdefault("local_files_only", True)  # a cached hub id loads without touching the network
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)


def _cached(repo_id: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, "tokenizer_config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def special_token_ids(tokenizer: Any = None, model_config: Any = None) -> set[int]:
    """Ids that must never start a prompt: the tokenizer's special and added tokens, and the model config's."""
    ids: set[int] = set()
    if tokenizer is not None:
        ids.update(getattr(tokenizer, "all_special_ids", []) or [])
        ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if model_config is not None:
        for name in _SPECIAL_CONFIG_IDS:
            value = getattr(model_config, name, None)
            ids.update(value if isinstance(value, Iterable) else ([value] if value is not None else []))
    return {int(i) for i in ids}


def embed(embeddings: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`embeddings(ids)` as a tensor: some models' embedding modules also return a scale (I-BERT's quantised one)."""
    out = embeddings(ids)
    return out[0] if isinstance(out, tuple) else out
