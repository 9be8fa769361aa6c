"""The prompt's key/value cache: under causal attention the virtual tokens see only each other, so their
keys/values do not depend on the input. Compute them once (batch 1), expand over the batch and run the real
tokens against them; outputs then have the input's length and the prompt costs P positions per step, not B*P.

Transformers renamed `past_key_values` to `cache` (5.x); every place that passes or reads a cache goes
through `cache_kwarg` / `output_cache` here, so the next rename is a one-line change and never a silent drop.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
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
    if not (model.training and torch.is_grad_enabled()):
        return False  # checked first: the flag below walks every module
    if hasattr(type(model), "is_activation_checkpointing"):  # transformers >= 5.2x; the old name warns
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def input_positions(mask: torch.Tensor, offset: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the real tokens, after `offset` virtual ones; pads don't advance them (padding invariance)."""
    if position_ids is not None:
        return position_ids + offset
    return (mask.long().cumsum(-1) - 1).clamp_min(0) + offset


def prompt_cache(model: nn.Module, prompt: torch.Tensor) -> Any:
    """KV cache of one prompt [P, d], batch 1 (expand it with `for_batch`)."""
    backbone = backbone_of(model)
    positions = torch.arange(prompt.shape[0], device=prompt.device).unsqueeze(0)
    kwargs = {"position_ids": positions} if accepts(backbone, "position_ids") else {}
    outputs = backbone(inputs_embeds=prompt.unsqueeze(0), use_cache=True, return_dict=True, **kwargs)
    return output_cache(outputs)


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise TypeError(f"{type(cache).__name__} has no per-layer keys/values this plugin knows how to share.")
    return layers


def _shallow_copy(cache: Any) -> Any:
    """A new cache object over the same tensors: updates reassign (`keys = cat(...)`), so the source stays intact
    and a compiled prompt cache can be handed to many forwards."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in _layers(cache)]
    return new


def for_batch(cache: Any, batch_size: int) -> Any:
    """A copy of a batch-1 prompt cache expanded over `batch_size` rows."""
    new = _shallow_copy(cache)
    for layer in new.layers:
        layer.keys = layer.keys.expand(batch_size, *layer.keys.shape[1:])
        layer.values = layer.values.expand(batch_size, *layer.values.shape[1:])
    return new


def mixed_batch(caches: list[Any | None], rows: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """One cache for a batch whose rows use different prompts: `caches[u]` is prompt u's batch-1 cache (None: no
    prompt), `rows[b]` the prompt of row b. Shorter prompts are left-padded with zero keys/values that the returned
    [B, P_max] slot mask hides."""
    template = next(c for c in caches if c is not None)
    lengths = [0 if c is None else _layers(c)[0].keys.shape[-2] for c in caches]
    width = max(lengths)
    new = _shallow_copy(template)
    for index, layer in enumerate(new.layers):
        for name in ("keys", "values"):
            like = getattr(_layers(template)[index], name)
            padded = []
            for cache, length in zip(caches, lengths, strict=True):
                pad = like.new_zeros(1, like.shape[1], width - length, like.shape[3])
                parts = [pad] if cache is None else [pad, getattr(_layers(cache)[index], name)]
                padded.append(torch.cat(parts, dim=-2))
            setattr(layer, name, torch.cat(padded)[rows])
    slots = torch.arange(width, device=rows.device).unsqueeze(0) >= (width - torch.tensor(lengths, device=rows.device))[
        rows
    ].unsqueeze(1)
    return new, slots.long()


class CompiledPrompts:
    """Per-adapter prompt caches for inference, rebuilt whenever the prompt's parameters change (in-place
    optimiser steps bump a tensor's version; reloads replace or copy into it). Bounded: least recently used first
    out."""

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[tuple, Any]] = OrderedDict()

    @staticmethod
    def fingerprint(encoder: nn.Module, dtype: torch.dtype) -> tuple:
        return (dtype,) + tuple((p.data_ptr(), p._version, p.device) for p in encoder.parameters())

    def get(self, name: str, encoder: nn.Module, dtype: torch.dtype, build: Any) -> Any:
        key = self.fingerprint(encoder, dtype)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, build())
            self._entries[name] = entry
        self._entries.move_to_end(name)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry[1]

    def discard(self, name: str | None = None) -> None:
        if name is None:
            self._entries.clear()
        else:
            self._entries.pop(name, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
