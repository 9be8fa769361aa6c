"""How a new soft prompt starts: a registry of initialisers, one function and one entry each.

    @register_initializer("mine", requires=("init_text",), help="...")
    def mine(ctx: InitContext) -> torch.Tensor:  # [num_virtual_tokens, hidden], float32, CPU
        ...

`SoftPromptConfig` validates `init` against this registry (and which optional fields each method uses), and the
CLI offers its names, so a new method needs nothing else. Prompts are read through the input embedding *module*
(some models scale their embeddings, Gemma), gathered under ZeRO-3, and always returned as float32 on the CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import adapter_dir
from .distributed import full_shape, gathered_params
from .vocab import embed, load_tokenizer, special_token_ids

logger = logging.getLogger(__name__)

# Optional config fields that only some initialisers read: set with any other method they are a mistake.
INIT_FIELDS = ("init_text", "init_from", "tokenizer_kwargs")


@dataclass(frozen=True)
class InitContext:
    """What an initialiser gets: the adapter's config, the model's input embeddings and the model's config."""

    config: Any  # a SoftPromptConfig (duck-typed: this module sits below config.py)
    embeddings: nn.Module
    model_config: Any = None

    @property
    def rows(self) -> int:
        return full_shape(self.embeddings.weight)[0]

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def tokenizer(self) -> Any:
        """The config's tokenizer object, else the one it names, else None."""
        if self.config.tokenizer is not None:
            return self.config.tokenizer
        if self.config.tokenizer_name_or_path:
            return load_tokenizer(self.config.tokenizer_name_or_path, self.config.tokenizer_kwargs)
        return None


@dataclass(frozen=True)
class Initializer:
    fn: Callable[[InitContext], torch.Tensor]
    requires: tuple[str, ...]  # config fields that must be set (when not loading a saved adapter)
    accepts: tuple[str, ...]  # optional fields of INIT_FIELDS it reads
    needs_tokenizer: bool
    help: str


INITIALIZERS: dict[str, Initializer] = {}


def register_initializer(
    name: str,
    *,
    requires: tuple[str, ...] = (),
    accepts: tuple[str, ...] = (),
    needs_tokenizer: bool = False,
    help: str = "",
) -> Callable[[Callable[[InitContext], torch.Tensor]], Callable[[InitContext], torch.Tensor]]:
    """Register `fn(ctx) -> [num_virtual_tokens, hidden] float32 tensor` as ``SoftPromptConfig(init=name)``."""

    def decorate(fn: Callable[[InitContext], torch.Tensor]) -> Callable[[InitContext], torch.Tensor]:
        INITIALIZERS[name] = Initializer(fn, tuple(requires), tuple(accepts), needs_tokenizer, help or fn.__doc__ or "")
        return fn

    return decorate


def initial_prompt(config: Any, embeddings: nn.Module, model_config: Any = None) -> torch.Tensor:
    """The starting prompt for `config.init`, float32 on CPU, [num_virtual_tokens, hidden]."""
    ctx = InitContext(config, embeddings, model_config)
    prompt = INITIALIZERS[config.init].fn(ctx)
    expected = (config.num_virtual_tokens, full_shape(embeddings.weight)[1])
    if tuple(prompt.shape) != expected:
        raise ValueError(f"Initialiser {config.init!r} returned shape {tuple(prompt.shape)}, expected {expected}.")
    return prompt.detach().float().cpu()


# --------------------------------------------------------------------------- helpers


def fit_length(ids: list[int], n: int, what: str) -> list[int]:
    """Truncate (with a warning) or repeat `ids` to exactly `n` entries."""
    if len(ids) > n:
        logger.warning("%s has %d tokens; truncating to num_virtual_tokens=%d.", what, len(ids), n)
        return ids[:n]
    if len(ids) < n:
        logger.info("%s has %d tokens; repeating it to fill num_virtual_tokens=%d.", what, len(ids), n)
    return (ids * math.ceil(n / len(ids)))[:n]


def embedding_rows(embeddings: nn.Module, ids: list[int]) -> torch.Tensor:
    """Rows through the module, not raw weights: the prompt must live where the model's layers read it."""
    with gathered_params([embeddings.weight]), torch.no_grad():
        return embed(embeddings, torch.tensor(ids, device=embeddings.weight.device)).float().cpu().clone()


def text_ids(ctx: InitContext) -> list[int]:
    tokenizer = ctx.tokenizer()
    specials = special_token_ids(tokenizer)
    ids = [i for i in tokenizer(ctx.config.init_text, add_special_tokens=False)["input_ids"] if i not in specials]
    if not ids:
        raise ValueError(f"SoftPromptConfig.init_text {ctx.config.init_text!r} has no non-special tokens.")
    if max(ids) >= ctx.rows:
        raise ValueError(
            f"Tokenizer id {max(ids)} is outside the model's embedding table of {ctx.rows} rows: the tokenizer "
            "(SoftPromptConfig.tokenizer / tokenizer_name_or_path) does not belong to this model."
        )
    return fit_length(ids, ctx.num_virtual_tokens, "init_text")


def vocab_ids(ctx: InitContext) -> list[int]:
    rows = ctx.rows
    top_k = min(ctx.config.init_vocab_top_k or rows, rows)
    excluded = special_token_ids(ctx.tokenizer(), ctx.model_config)
    candidates = torch.tensor([i for i in range(top_k) if i not in excluded], dtype=torch.long)
    if len(candidates) == 0:
        raise ValueError(f"SoftPromptConfig.init_vocab_top_k={top_k} leaves no non-special ids to sample from.")
    generator = torch.Generator().manual_seed(ctx.config.init_seed)
    n = ctx.num_virtual_tokens
    if n <= len(candidates):
        picks = torch.randperm(len(candidates), generator=generator)[:n]
    else:
        picks = torch.randint(len(candidates), (n,), generator=generator)
    return candidates[picks].tolist()


# --------------------------------------------------------------------------- the built-in methods


@register_initializer(
    "vocab",
    accepts=("tokenizer_kwargs",),
    help="embeddings of distinct ids sampled from the first init_vocab_top_k ids, never special or added tokens",
)
def vocab_sample(ctx: InitContext) -> torch.Tensor:
    return embedding_rows(ctx.embeddings, vocab_ids(ctx))


@register_initializer(
    "text",
    requires=("init_text",),
    accepts=("init_text", "tokenizer_kwargs"),
    needs_tokenizer=True,
    help="embeddings of init_text's tokens, repeated or truncated to num_virtual_tokens",
)
def from_text(ctx: InitContext) -> torch.Tensor:
    return embedding_rows(ctx.embeddings, text_ids(ctx))


@register_initializer("random", help="Gaussian matched to the embedded vocabulary's per-dimension mean and std")
def matched_random(ctx: InitContext, chunk_rows: int = 16384) -> torch.Tensor:
    """Computed in chunks of rows: no float copy of the whole table."""
    weight = ctx.embeddings.weight
    with gathered_params([weight]), torch.no_grad():
        count = weight.shape[0]
        total = torch.zeros(weight.shape[1], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for start in range(0, count, chunk_rows):
            ids = torch.arange(start, min(start + chunk_rows, count), device=weight.device)
            rows = embed(ctx.embeddings, ids).to("cpu", torch.float64)
            total += rows.sum(0)
            total_sq += (rows * rows).sum(0)
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    generator = torch.Generator().manual_seed(ctx.config.init_seed)
    return (
        torch.randn(ctx.num_virtual_tokens, len(mean), generator=generator, dtype=torch.float64) * std + mean
    ).float()


@register_initializer(
    "pretrained",
    requires=("init_from",),
    accepts=("init_from",),
    help="the prompt saved in the adapter directory init_from (prompt transfer, SPoT), repeated or truncated",
)
def from_pretrained_prompt(ctx: InitContext) -> torch.Tensor:
    saved = adapter_dir.read(ctx.config.init_from).prompt.float()
    dim = full_shape(ctx.embeddings.weight)[1]
    if saved.shape[1] != dim:
        raise ValueError(
            f"SoftPromptConfig.init_from: the saved prompt has hidden size {saved.shape[1]}, this model {dim}."
        )
    index = fit_length(list(range(saved.shape[0])), ctx.num_virtual_tokens, f"prompt from {ctx.config.init_from}")
    return saved[index].clone()
