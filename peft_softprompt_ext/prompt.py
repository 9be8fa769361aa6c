"""The trainable prompt (an encoder PEFT can save and load) and the ways to initialise it."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from peft.tuners.tuners_utils import BasePromptEncoder
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"  # the key PEFT's own prompt tuning uses: the effective prompt
RAW_PREFIX = "residual."  # raw parameters of a residual prompt, kept so training can resume


class ResidualMLP(nn.Module):
    """Shared bottleneck MLP of residual prompt tuning, LN(up(relu(down(P)))), behind a learned gate that starts
    at zero: the prompt starts exactly at its initialisation and the residual grows smoothly. (Zeroing the
    up-projection instead would put LayerNorm at a zero input, whose 1/sqrt(eps) gradient makes the first step
    swamp the prompt.)"""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate * self.norm(self.up(torch.relu(self.down(x))))


class SoftPromptEncoder(BasePromptEncoder):
    """Holds one adapter's prompt. `embedding` is a leaf module with a `.weight`, so FSDP auto-wrap
    policies give it its own unit and PEFT's helpers that read `prompt_encoder[name].embedding.weight` work."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, residual_hidden_size: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        self.residual = ResidualMLP(token_dim, residual_hidden_size) if residual_hidden_size else None

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    @property
    def token_dim(self) -> int:
        return self.embedding.embedding_dim

    def forward(self) -> torch.Tensor:
        """The effective prompt, [num_virtual_tokens, token_dim]. Calls the embedding module (not `.weight`) so that
        FSDP / ZeRO-3 pre-forward hooks gather it and post-backward hooks reduce its gradient."""
        positions = torch.arange(self.num_virtual_tokens, device=self.embedding.weight.device)
        raw = self.embedding(positions)
        return raw if self.residual is None else raw + self.residual(raw)

    def fold(self) -> None:
        """Replace a residual prompt by the plain prompt it computes (for inference)."""
        if self.residual is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(self())
            self.residual = None

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the effective prompt, plus the raw parameters of a residual prompt."""
        with torch.no_grad():
            if self.residual is None:  # read, don't forward: no collective on a rank that saves alone
                from .integrations import local_prompt_weight

                return {PROMPT_KEY: local_prompt_weight(self.embedding).clone()}
            state = {PROMPT_KEY: self().detach()}
            if self.residual is not None:
                state[RAW_PREFIX + "raw_prompt"] = self.embedding.weight.detach()
                state.update({RAW_PREFIX + k: v.detach() for k, v in self.residual.state_dict().items()})
        return state

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Read the parameters; never run a forward (a forward under ZeRO-3 hangs when only rank 0 saves).
        A gathered `state_dict` handed in by accelerate/Trainer is preferred over the (maybe sharded) module."""
        encoder = model.prompt_encoder[adapter_name]
        key = f"prompt_encoder.{adapter_name}.embedding.weight"
        if encoder.residual is None and key in state_dict and state_dict[key].numel() > 0:
            return {PROMPT_KEY: state_dict[key]}
        return encoder.adapter_state_dict()

    def _load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if PROMPT_KEY not in state_dict:
            raise ValueError(f"Adapter weights have no '{PROMPT_KEY}' tensor; keys: {sorted(state_dict)}.")
        prompt = state_dict[PROMPT_KEY]
        expected = (self.num_virtual_tokens, self.token_dim)
        if tuple(prompt.shape) != expected:
            raise ValueError(
                f"Saved prompt has shape {tuple(prompt.shape)} (num_virtual_tokens, hidden size) but this model "
                f"expects {expected}: the adapter was saved for a different model or config."
            )
        raw_key = RAW_PREFIX + "raw_prompt"
        with torch.no_grad():
            if self.residual is not None and raw_key in state_dict:
                self.embedding.weight.copy_(state_dict[raw_key])
                mlp_state = {k[len(RAW_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(RAW_PREFIX)}
                mlp_state.pop("raw_prompt")
                self.residual.load_state_dict(mlp_state, strict=True)
            else:
                self.residual = None
                self.embedding.weight.copy_(prompt)


# --------------------------------------------------------------------------- initialisation


def _fit_length(ids: list[int], n: int, what: str) -> list[int]:
    if len(ids) > n:
        logger.warning("%s has %d tokens; truncating to num_virtual_tokens=%d.", what, len(ids), n)
        return ids[:n]
    if len(ids) < n:
        logger.info("%s has %d tokens; repeating it to fill num_virtual_tokens=%d.", what, len(ids), n)
    return (ids * math.ceil(n / len(ids)))[:n]


def special_token_ids(tokenizer: Any = None, model_config: Any = None) -> set[int]:
    """Ids that must never start a prompt: the tokenizer's special and added tokens, else the model's."""
    ids: set[int] = set()
    if tokenizer is not None:
        ids.update(getattr(tokenizer, "all_special_ids", []) or [])
        ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if model_config is not None:
        for name in (
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "unk_token_id",
            "decoder_start_token_id",
            "sep_token_id",
            "cls_token_id",
            "mask_token_id",
        ):
            value = getattr(model_config, name, None)
            ids.update(value if isinstance(value, Iterable) else ([value] if value is not None else []))
    return {int(i) for i in ids}


def load_tokenizer(name_or_path: str, tokenizer_kwargs: dict | None = None) -> Any:
    from transformers import AutoTokenizer

    kwargs = dict(tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def _gathered(weight: torch.Tensor) -> Any:
    """Gather a ZeRO-3 partitioned table for reading. Looks at the parameter itself, not transformers' global
    ZeRO-3 flag (PEFT's gather_params_ctx), which raw `deepspeed.zero.Init` users never set."""
    from .integrations import gathered_params

    return gathered_params([weight])


def _embedding_rows(embeddings: nn.Module, ids: list[int]) -> torch.Tensor:
    """Through the module, not raw rows: some models scale their embeddings (Gemma), and the prompt must live
    in the space the model actually feeds its layers."""
    with _gathered(embeddings.weight), torch.no_grad():
        return embeddings(torch.tensor(ids, device=embeddings.weight.device)).float().cpu().clone()


def text_ids(config: Any, tokenizer: Any, vocab_rows: int) -> list[int]:
    ids = [
        i
        for i in tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if i not in special_token_ids(tokenizer)
    ]
    if not ids:
        raise ValueError(f"SoftPromptConfig.init_text {config.init_text!r} has no non-special tokens.")
    if max(ids) >= vocab_rows:
        raise ValueError(
            f"Tokenizer id {max(ids)} is outside the model's embedding table of {vocab_rows} rows: the tokenizer "
            "(SoftPromptConfig.tokenizer / tokenizer_name_or_path) does not belong to this model."
        )
    return _fit_length(ids, config.num_virtual_tokens, "init_text")


def vocab_ids(config: Any, vocab_rows: int, excluded: set[int]) -> list[int]:
    top_k = min(config.init_vocab_top_k or vocab_rows, vocab_rows)
    candidates = torch.tensor([i for i in range(top_k) if i not in excluded], dtype=torch.long)
    if len(candidates) == 0:
        raise ValueError(f"SoftPromptConfig.init_vocab_top_k={top_k} leaves no non-special ids to sample from.")
    generator = torch.Generator().manual_seed(config.init_seed)
    n = config.num_virtual_tokens
    if n <= len(candidates):
        picks = torch.randperm(len(candidates), generator=generator)[:n]
    else:
        picks = torch.randint(len(candidates), (n,), generator=generator)
    return candidates[picks].tolist()


def matched_random(embeddings: nn.Module, n: int, seed: int, chunk_rows: int = 16384) -> torch.Tensor:
    """N(mean, std) per dimension of the embedded vocabulary, computed in chunks (no float copy of the table)."""
    weight = embeddings.weight
    with _gathered(weight), torch.no_grad():
        count = weight.shape[0]
        total = torch.zeros(weight.shape[1], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for start in range(0, count, chunk_rows):
            ids = torch.arange(start, min(start + chunk_rows, count), device=weight.device)
            rows = embeddings(ids).to("cpu", torch.float64)
            total += rows.sum(0)
            total_sq += (rows * rows).sum(0)
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, len(mean), generator=generator, dtype=torch.float64) * std + mean).float()


def read_saved_prompt(adapter_dir: str) -> torch.Tensor:
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SoftPromptConfig.init_from: no {ADAPTER_WEIGHTS_NAME} in {adapter_dir!r}.")
    state = load_file(path)
    if PROMPT_KEY not in state:
        raise ValueError(f"SoftPromptConfig.init_from: {path} has no '{PROMPT_KEY}' tensor.")
    return state[PROMPT_KEY].float()


def initial_prompt(config: Any, word_embeddings: nn.Embedding, model_config: Any = None) -> torch.Tensor:
    """The starting prompt for `config.init`, float32 on CPU, [num_virtual_tokens, token_dim]."""
    weight = word_embeddings.weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]
    n, dim = config.num_virtual_tokens, config.token_dim
    if config.init == "text":
        tokenizer = config.tokenizer or load_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)
        return _embedding_rows(word_embeddings, text_ids(config, tokenizer, rows))
    if config.init == "vocab":
        tokenizer = config.tokenizer
        if tokenizer is None and config.tokenizer_name_or_path:
            tokenizer = load_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)
        return _embedding_rows(word_embeddings, vocab_ids(config, rows, special_token_ids(tokenizer, model_config)))
    if config.init == "random":
        return matched_random(word_embeddings, n, config.init_seed)
    saved = read_saved_prompt(config.init_from)
    if saved.shape[1] != dim:
        raise ValueError(
            f"SoftPromptConfig.init_from: the saved prompt has hidden size {saved.shape[1]}, this model {dim}."
        )
    index = _fit_length(list(range(saved.shape[0])), n, f"prompt from {config.init_from}")
    return saved[index].clone()
