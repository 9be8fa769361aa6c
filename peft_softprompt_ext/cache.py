"""The prompt's key/value cache: under causal attention the virtual tokens see only each other, so their
keys/values do not depend on the input. Compute them once (batch 1), expand over the batch and run the real
tokens against them; outputs then have the input's length and the prompt costs P positions per step, not B*P.

Transformers renamed `past_key_values` to `cache` (5.x); every place that passes or reads a cache goes
through `cache_kwarg` / `output_cache` here, so the next rename is a one-line change and never a silent drop.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(module: nn.Module) -> str | None:
    """The name under which `module.forward` takes a KV cache, or None."""
    params = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_NAMES if name in params), None)


def accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def output_cache(outputs: Any) -> Any:
    for name in CACHE_NAMES:
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    raise RuntimeError("The model returned no KV cache although use_cache=True was passed.")


def is_causal_decoder(model: nn.Module) -> bool:
    """Decoder-only with causal attention (the prompt's KV is then input-independent)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer without its head (LlamaForCausalLM -> LlamaModel): the prompt needs no logits."""
    return getattr(model, "base_model", model)


def supports_prefix_kv(model: nn.Module) -> bool:
    backbone = backbone_of(model)
    return is_causal_decoder(model) and cache_kwarg(model) is not None and cache_kwarg(backbone) is not None


def gradient_checkpointing_active(model: nn.Module) -> bool:
    """Transformers drops caches inside checkpointed layers while training, so the prefix path can't be used."""
    return bool(getattr(model, "is_gradient_checkpointing", False)) and model.training and torch.is_grad_enabled()


def input_positions(mask: torch.Tensor, offset: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the real tokens, after `offset` virtual ones; pads don't advance them (padding invariance)."""
    if position_ids is not None:
        return position_ids + offset
    return (mask.long().cumsum(-1) - 1).clamp_min(0) + offset


def prompt_cache(model: nn.Module, prompts: torch.Tensor, batch_size: int) -> Any:
    """KV cache of the prompt(s): `prompts` is [P, d] (shared, expanded to the batch) or [B, P, d] (one per row)."""
    backbone = backbone_of(model)
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0)
    num_virtual = prompts.shape[1]
    positions = torch.arange(num_virtual, device=prompts.device).unsqueeze(0).expand(prompts.shape[0], -1)
    kwargs = {"position_ids": positions} if accepts(backbone, "position_ids") else {}
    outputs = backbone(inputs_embeds=prompts, use_cache=True, return_dict=True, **kwargs)
    cache = output_cache(outputs)
    if prompts.shape[0] == 1 and batch_size > 1:
        cache.batch_repeat_interleave(batch_size)
    return cache
