"""Shared by the worker scripts: tiny models, tokenizer and data, all built locally (no hub), and result files."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import tiny  # tests/ is on the workers' PYTHONPATH (dist_launch)
import torch

import peft_softprompt_ext  # noqa: F401  (registers SOFT_PROMPT)

VOCAB, WORDS = tiny.VOCAB, tiny.WORDS


def pg_timeout() -> datetime.timedelta:
    """Short, so a dead or hung peer turns into an error in seconds, not the default 30 minutes."""
    return datetime.timedelta(seconds=int(os.environ.get("SOFTPROMPT_PG_TIMEOUT", "60")))


def tiny_llama_config(hidden: int = 32, vocab: int = VOCAB):
    return tiny.llama_config(
        hidden_size=hidden, intermediate_size=2 * hidden, vocab_size=vocab, tie_word_embeddings=False
    )


def tiny_llama(seed: int = 0, hidden: int = 32, vocab: int = VOCAB):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(hidden, vocab)).eval()


def tokenizer():
    return tiny.word_tokenizer()


def soft_prompt_model(seed: int = 0, num_virtual_tokens: int = 4, **config_kwargs):
    from peft import get_peft_model

    from peft_softprompt_ext import SoftPromptConfig

    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, **config_kwargs)
    return get_peft_model(tiny_llama(seed), config)


def global_batches(steps: int, rows: int, length: int = 12, seed: int = 1) -> list[torch.Tensor]:
    """The same list of batches on every rank; rank r trains on its slice of each (different data per rank).
    Tokens follow a learnable pattern (each row counts up from a random start) so losses fall."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(4, VOCAB, (rows, 1), generator=g)
        out.append((start + torch.arange(length)) % (VOCAB - 4) + 4)
    return out


def prompt_of(model) -> torch.Tensor:
    from peft_softprompt_ext.trainer import unwrap_soft_prompt_model

    inner = unwrap_soft_prompt_model(model)
    return inner.prompt_encoder[inner.active_adapter].embedding.weight.detach().float().cpu().clone()


def write_result(out: str, rank: int, **data) -> None:
    """Written atomically so the test never reads half a file from a rank that died."""
    path = Path(out) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def tensor_list(t: torch.Tensor) -> list:
    return t.tolist()


def train_reference(steps: int, rows: int, lr: float = 3e-2, **model_kwargs) -> torch.Tensor:
    """One plain process trained on the whole of every global batch: what any N-rank run must reproduce."""
    model = soft_prompt_model(**model_kwargs)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for ids in global_batches(steps, rows):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return prompt_of(model)
