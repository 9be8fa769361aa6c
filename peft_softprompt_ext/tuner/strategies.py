"""The two ways a soft prompt reaches the base model, each with its forward and its generate.

- `PrefixKV` (decoder-only models with a plain KV cache): the prompt's keys/values are computed once (batch 1) and
  handed to the model as a cache; the model sees exactly the user's tokens, so outputs have the input's length and
  the prompt costs P positions per step, not B*P. Survives (non-reentrant) gradient checkpointing: the batch's copy
  of the cache is frozen (never written), which transformers then lets checkpointed layers keep.
- `Concat` (everything else): the prompt embeddings go before the input embeddings; prompt positions are cut from
  the outputs.

Both give the base model labels it can use itself (prompt positions ignored), so a trainer that relies on the base
model's loss or replaces its head (TRL) sees a normal model. Which one runs is `choose`'s decision.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from typing import Any, Protocol

import torch
from torch import nn

from .. import cache as kv
from ..architecture import Capabilities, is_causal_decoder
from .batch import LabelLayout, Layout, PromptBatch, base_labels

logger = logging.getLogger(__name__)


class ExecutionPath(str, enum.Enum):
    PREFIX_KV = "prefix_kv"
    CONCAT = "concat"


class Purpose(enum.Enum):
    FORWARD = "forward"
    GENERATE = "generate"


class PromptedModel(Protocol):
    """What a strategy needs from the SoftPromptModel (its task class sets the two class attributes)."""

    base_model: nn.Module
    word_embeddings: nn.Module
    token_level_keys: tuple[str, ...]  # outputs with one entry per position of the sequence
    label_layout: LabelLayout

    def prompt_rows(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def prefix_cache(self, batch: PromptBatch, frozen: bool, expand: int = 1) -> tuple[Any, torch.Tensor]: ...


def _restore_outputs(outputs: Any, keys: tuple[str, ...], layout: Layout) -> Any:
    for key in keys:
        value = outputs.get(key)
        if value is not None:
            outputs[key] = layout.restore_output(value)
    return outputs


def new_positions(model: nn.Module, kwargs: dict[str, Any], length: int) -> int:
    """How many tokens a generate call may append (for the position-limit check)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if kwargs.get("max_new_tokens") is not None:
        return int(kwargs["max_new_tokens"])
    if kwargs.get("max_length") is not None:
        return max(0, int(kwargs["max_length"]) - length)
    if config is not None and getattr(config, "max_new_tokens", None) is not None:
        return int(config.max_new_tokens)
    if config is not None and getattr(config, "max_length", None) is not None:
        return max(0, int(config.max_length) - length)
    return 0


class PrefixKV:
    """The prompt lives in the KV cache; the base model sees the user's tokens only."""

    path = ExecutionPath.PREFIX_KV

    def forward(self, model: PromptedModel, batch: PromptBatch, local_attention: bool) -> Any:
        base = model.base_model
        use_cache = bool(batch.kwargs.pop("use_cache", False))
        cache, slots = model.prefix_cache(batch, frozen=not use_cache)
        slots = slots.to(device=batch.device, dtype=batch.mask.dtype)
        # a window must not be spent on pads: move them after the text (the prompt is the cache, always first)
        layout = Layout.pads_last(batch.mask) if local_attention and not use_cache else Layout.identity(0, batch.length)
        inputs: dict[str, Any] = {kv.cache_kwarg(base): cache, "use_cache": use_cache, "return_dict": True}
        if batch.input_ids is not None:
            inputs["input_ids"] = layout.apply(batch.input_ids)
        else:
            inputs["inputs_embeds"] = layout.apply(batch.inputs_embeds)
        inputs["attention_mask"] = torch.cat([slots, layout.apply(batch.mask)], dim=1)
        if kv.accepts(base, "position_ids"):
            positions = kv.input_positions(batch.mask, slots.long().sum(1, keepdim=True), batch.position_ids)
            inputs["position_ids"] = layout.apply(positions)
        if batch.token_type_ids is not None:
            inputs["token_type_ids"] = layout.apply(batch.token_type_ids)
        labels = base_labels(batch.labels, model.label_layout, layout, batch.mask.shape)
        if labels is not None:
            inputs["labels"] = labels
        context = kv.cache_kept_under_checkpointing(base) if not use_cache else contextlib.nullcontext()
        with context:
            outputs = base(**inputs, **batch.kwargs)
        return _restore_outputs(outputs, model.token_level_keys, layout)

    def generate(self, model: PromptedModel, batch: PromptBatch, **kwargs: Any) -> Any:
        """Generate with the prompt's KV as a pre-filled cache. Transformers takes the cached part to be a prefix of
        input_ids, so placeholder ids stand in for the virtual tokens and are cut from the result."""
        base = model.base_model
        # generate repeats each row for beams / returned sequences but leaves a cache handed to it as it is
        config = kwargs.get("generation_config") or base.generation_config
        expand = max(
            kwargs.get("num_beams") or config.num_beams or 1,
            kwargs.get("num_return_sequences") or config.num_return_sequences or 1,
        )
        with torch.no_grad():
            cache, slots = model.prefix_cache(batch, frozen=False, expand=expand)
        slots = slots[::expand].to(device=batch.device, dtype=batch.mask.dtype)
        width = slots.shape[1]
        placeholder = batch.input_ids.new_full((batch.batch_size, width), _placeholder_id(base.config))
        if kwargs.get("max_length") is not None:
            kwargs["max_length"] += width
        out = base.generate(
            input_ids=torch.cat([placeholder, batch.input_ids], dim=1),
            attention_mask=torch.cat([slots, batch.mask], dim=1),
            **{kv.cache_kwarg(base): cache},
            **kwargs,
        )
        return _strip_prefix(out, width)


class Concat:
    """The prompt embeddings before the input embeddings; prompt positions cut from the outputs."""

    path = ExecutionPath.CONCAT

    def _sequence(self, model: PromptedModel, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, Layout]:
        prompts, slots = model.prompt_rows(batch)
        slots = slots.to(device=batch.device, dtype=batch.mask.dtype)
        embeds = batch.inputs_embeds if batch.inputs_embeds is not None else model.word_embeddings(batch.input_ids)
        seq = torch.cat([prompts, embeds.to(prompts.dtype)], dim=1)
        if is_causal_decoder(model.base_model):
            layout = Layout.pads_first(slots, batch.mask)
        else:
            layout = Layout.identity(slots.shape[1], batch.length)
        return seq, torch.cat([slots, batch.mask], dim=1), layout

    def forward(self, model: PromptedModel, batch: PromptBatch, local_attention: bool) -> Any:
        base = model.base_model
        seq, full_mask, layout = self._sequence(model, batch)
        width = layout.width
        inputs: dict[str, Any] = {"inputs_embeds": layout.apply(seq), "attention_mask": layout.apply(full_mask)}
        if kv.accepts(base, "position_ids") and not base.config.is_encoder_decoder:
            slots = full_mask[:, :width]
            prompt_pos = kv.input_positions(slots, 0)
            text_pos = kv.input_positions(batch.mask, slots.sum(1, keepdim=True), batch.position_ids)
            inputs["position_ids"] = layout.apply(torch.cat([prompt_pos, text_pos], 1))
        if batch.token_type_ids is not None:
            zeros = batch.token_type_ids.new_zeros(batch.batch_size, width)
            inputs["token_type_ids"] = layout.apply(torch.cat([zeros, batch.token_type_ids], 1))
        labels = base_labels(batch.labels, model.label_layout, layout, batch.mask.shape)
        if labels is not None:
            inputs["labels"] = labels
        outputs = base(**inputs, return_dict=True, **batch.kwargs)
        return _restore_outputs(outputs, model.token_level_keys, layout)

    def generate(self, model: PromptedModel, batch: PromptBatch, **kwargs: Any) -> Any:
        """Generate from prompt + input embeddings (no cache hand-over): the fallback for any generative model."""
        base = model.base_model
        seq, full_mask, layout = self._sequence(model, batch)
        if kwargs.get("max_length") is not None and not base.config.is_encoder_decoder:
            kwargs["max_length"] += layout.width
        out = base.generate(inputs_embeds=layout.apply(seq), attention_mask=layout.apply(full_mask), **kwargs)
        if batch.input_ids is None or base.config.is_encoder_decoder:
            return out
        # decoder-only generate from embeddings returns only the new tokens; give back input + new like the base
        ids = batch.input_ids
        if isinstance(out, torch.Tensor):
            return torch.cat([ids.repeat_interleave(out.shape[0] // batch.batch_size, 0), out], dim=1)
        out.sequences = torch.cat(
            [ids.repeat_interleave(out.sequences.shape[0] // batch.batch_size, 0), out.sequences], 1
        )
        return out


STRATEGIES: dict[ExecutionPath, PrefixKV | Concat] = {
    ExecutionPath.PREFIX_KV: PrefixKV(),
    ExecutionPath.CONCAT: Concat(),
}


def choose(
    capabilities: Capabilities, shared_prompt_kv: bool, blockers: list[str], batch: PromptBatch | None, purpose: Purpose
) -> tuple[ExecutionPath, str]:
    """The path for this call and why. `blockers` are the model's current reasons against sharing (sharded
    parameters, reentrant checkpointing...)."""
    if not shared_prompt_kv:
        return ExecutionPath.CONCAT, "shared_prompt_kv=False"
    if not capabilities.prefix_kv:
        return ExecutionPath.CONCAT, capabilities.reason
    if blockers:
        return ExecutionPath.CONCAT, blockers[0]
    if purpose is Purpose.GENERATE and batch is not None:
        if batch.input_ids is None:
            return ExecutionPath.CONCAT, "generate from inputs_embeds"
        if any(batch.kwargs.get(name) is not None for name in kv.CACHE_NAMES):
            return ExecutionPath.CONCAT, "generate with a cache of the caller's"
        if capabilities.local_attention and batch.has_left_padding:
            return ExecutionPath.CONCAT, "left-padded generate with windowed attention (pads would use the window)"
    return ExecutionPath.PREFIX_KV, capabilities.reason


def _placeholder_id(config: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0


def _strip_prefix(out: Any, n: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[:, n:]
    out.sequences = out.sequences[:, n:]
    return out
