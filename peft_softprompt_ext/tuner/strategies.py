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
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from .. import attention
from .. import cache as kv
from ..architecture import Capabilities, UnsupportedModelError
from ..vocab import embed
from .batch import LabelLayout, Layout, PromptBatch, Remainder, base_labels, safe_token_id

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
    shifted_token_keys: tuple[str, ...]  # outputs with one entry per next-token pair (one shorter)
    label_layout: LabelLayout

    def prompt_rows(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def prefix_cache(self, batch: PromptBatch, frozen: bool, expand: int = 1) -> tuple[Any, torch.Tensor]: ...

    @property
    def capabilities(self) -> Capabilities: ...


def _restore_outputs(model: PromptedModel, outputs: Any, layout: Layout) -> Any:
    """Token-level outputs back to the user's columns: per position (logits, hidden states) and per next-token pair
    (the log-probs, entropies and masks of a fused head a trainer installed, one shorter)."""
    for key in model.token_level_keys:
        value = outputs.get(key)
        if value is not None:
            outputs[key] = layout.restore_output(value)
    for key in model.shifted_token_keys:
        value = outputs.get(key)
        if value is not None:
            outputs[key] = layout.restore_shifted(value)
    return outputs


class _UserView(StoppingCriteria):
    """A caller's stopping criterion, shown the ids it would see without a soft prompt: the user's input_ids and
    the new tokens (generate itself runs on placeholders + input, or from embeddings on new tokens only)."""

    def __init__(self, inner: Any, input_ids: torch.Tensor, start: int) -> None:
        self.inner, self.input_ids, self.start = inner, input_ids, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        prompt = self.input_ids.repeat_interleave(input_ids.shape[0] // self.input_ids.shape[0], 0)
        return self.inner(torch.cat([prompt.to(input_ids.device), input_ids[:, self.start :]], dim=1), scores, **kwargs)


def _user_view_criteria(kwargs: dict[str, Any], input_ids: torch.Tensor, start: int) -> None:
    criteria = kwargs.get("stopping_criteria")
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_UserView(c, input_ids, start) for c in criteria])


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


@contextlib.contextmanager
def _attention(model: PromptedModel) -> Iterator[None]:
    """The base model on `attention.py`'s prefix-aware SDPA for one call, where the probe allowed it. Under gradient
    checkpointing the layers' recompute runs in the backward, after the call, so it is switched there too
    (`kv.recompute_within`); where it can't be (reentrant checkpointing), the call stays on transformers' SDPA."""
    base = model.base_model
    if not model.capabilities.prefix_attention or not kv.gradient_checkpointing_active(base):
        with attention.switched(base, model.capabilities.prefix_attention):
            yield
        return
    with kv.recompute_within(base, lambda: attention.switched(base)) as ok, attention.switched(base, ok):
        yield


class PrefixKV:
    """The prompt lives in the KV cache; the base model sees the user's tokens only."""

    path = ExecutionPath.PREFIX_KV

    def forward(self, model: PromptedModel, batch: PromptBatch, local_attention: bool) -> Any:
        if batch.plan is not None:
            return self._forward_fixed_prefix(model, batch)
        base = model.base_model
        use_cache = bool(batch.kwargs.pop("use_cache", False))
        cache, cached, _ = model.prefix_cache(batch, frozen=not use_cache)
        cached = cached.to(device=batch.device, dtype=batch.mask.dtype)
        # a window must not be spent on pads: move them after the text (the prompt is the cache, always first)
        no_slots = batch.mask[:, :0]
        layout = (
            Layout.pads_last(no_slots, batch.mask)
            if local_attention and not use_cache
            else Layout.identity(0, batch.length)
        )
        inputs: dict[str, Any] = {kv.cache_kwarg(base): cache, "use_cache": use_cache, "return_dict": True}
        if batch.input_ids is not None:
            inputs["input_ids"] = layout.apply(batch.input_ids)
        else:
            inputs["inputs_embeds"] = layout.apply(batch.inputs_embeds)
        inputs["attention_mask"] = torch.cat([cached, layout.apply(batch.mask)], dim=1)
        if kv.accepts(base, "position_ids"):
            positions = kv.input_positions(batch.mask, cached.long().sum(1, keepdim=True), batch.position_ids)
            inputs["position_ids"] = layout.apply(positions)
        if batch.token_type_ids is not None:
            inputs["token_type_ids"] = layout.apply(batch.token_type_ids)
        labels = base_labels(batch.labels, model.label_layout, layout, batch.mask.shape)
        if labels is not None:
            inputs["labels"] = labels
        context = kv.cache_kept_under_checkpointing(base) if not use_cache else contextlib.nullcontext()
        with context, _attention(model):
            outputs = base(**inputs, **batch.kwargs)
        return _restore_outputs(model, outputs, layout)

    def _forward_fixed_prefix(self, model: PromptedModel, batch: PromptBatch) -> Any:
        """Inference with slots: each prompt's fixed prefix (hard tokens + virtual ones) comes from its compiled
        cache, with its logits; the base model runs only on what follows the last slot. `logits_to_keep` (what a
        request's prefill asks for) reaches the base model when every row's last columns are its remainder's last
        tokens, so the LM head runs on those alone; otherwise the full logits are built and cut."""
        base = model.base_model
        batch.kwargs.pop("use_cache", None)
        keep = batch.kwargs.pop("logits_to_keep", 0)
        cache, cached, prefix_logits = model.prefix_cache(batch, frozen=True)
        cached = cached.to(device=batch.device, dtype=batch.mask.dtype)
        plan = batch.plan
        rest = Remainder.of(batch.mask, plan.prefix_end, pads_first=False)
        ids = rest.take(plan.clean_ids(batch.input_ids, safe_token_id(base.config)))
        inputs = {"input_ids": ids, "attention_mask": torch.cat([cached, rest.mask], dim=1), "use_cache": False}
        if kv.accepts(base, "position_ids"):
            inputs["position_ids"] = cached.sum(1, keepdim=True) + (rest.mask.cumsum(1) - 1).clamp_min(0)
        tail = _remainder_tail(batch, rest, keep)
        if tail:
            inputs["logits_to_keep"] = tail
        with _attention(model):
            outputs = base(**inputs, **{kv.cache_kwarg(base): cache}, return_dict=True, **batch.kwargs)
        if tail:
            return outputs
        logits = rest.put(outputs.logits, batch.length)
        for b in plan.slotted.nonzero()[:, 0].tolist():
            start, end = int(plan.start[b]), int(plan.prefix_end[b])
            logits[b, start:end] = prefix_logits[int(batch.rows[b])][0].to(logits.dtype)
        outputs["logits"] = _kept(logits, keep)
        return outputs

    def generate(self, model: PromptedModel, batch: PromptBatch, **kwargs: Any) -> Any:
        """Generate with the prompts (and fixed slot prefixes) as a pre-filled cache. Transformers takes the cached
        part to be a prefix of input_ids, so placeholder ids stand in for it; the result is the user's input_ids
        followed by the new tokens."""
        base = model.base_model
        # generate repeats each row for beams / returned sequences but leaves a cache handed to it as it is
        config = kwargs.get("generation_config") or base.generation_config
        expand = max(
            kwargs.get("num_beams") or config.num_beams or 1,
            kwargs.get("num_return_sequences") or config.num_return_sequences or 1,
        )
        with torch.no_grad():
            cache, cached, _ = model.prefix_cache(batch, frozen=False, expand=expand)
        cached = cached[::expand].to(device=batch.device, dtype=batch.mask.dtype)
        safe = safe_token_id(base.config)
        prefix_end = batch.plan.prefix_end if batch.plan is not None else torch.zeros_like(batch.rows)
        rest = Remainder.of(batch.mask, prefix_end, pads_first=True)
        ids = batch.plan.clean_ids(batch.input_ids, safe) if batch.plan is not None else batch.input_ids
        ids = rest.take(ids).masked_fill(rest.mask == 0, safe)
        start = cached.shape[1] + ids.shape[1]
        if kwargs.get("max_length") is not None:
            kwargs["max_length"] += start - batch.length
        _user_view_criteria(kwargs, batch.input_ids, start)
        with _attention(model):
            out = base.generate(
                input_ids=torch.cat([ids.new_full(cached.shape, safe), ids], dim=1),
                attention_mask=torch.cat([cached, rest.mask], dim=1),
                **{kv.cache_kwarg(base): cache},
                **kwargs,
            )
        return _with_input(out, batch.input_ids, start)


def _concat_layout(capabilities: Capabilities, slots: torch.Tensor, mask: torch.Tensor) -> Layout:
    """Pads before the prompt for a causal decoder where leading pads change nothing (the last column is then a real
    token for every row, what heads and generation read); after the text for everything else (encoders, positions
    from the length): [pads][prompt][text] or [prompt][text][pads]."""
    if capabilities.leading_pads_ok:
        return Layout.pads_first(slots, mask)
    return Layout.pads_last(slots, mask)


class Concat:
    """The prompt embeddings before the input embeddings; prompt positions cut from the outputs."""

    path = ExecutionPath.CONCAT

    def _sequence(
        self, model: PromptedModel, batch: PromptBatch, for_generation: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, Layout]:
        prompts, slots = model.prompt_rows(batch)
        slots = slots.to(device=batch.device, dtype=batch.mask.dtype)
        if batch.inputs_embeds is not None:
            embeds = batch.inputs_embeds
        elif batch.plan is None:
            embeds = embed(model.word_embeddings, batch.input_ids)
        else:  # the placeholders are never embedded: the slots' virtual tokens replace them
            embeds = embed(
                model.word_embeddings, batch.plan.clean_ids(batch.input_ids, safe_token_id(model.base_model.config))
            )
            embeds = batch.plan.splice(embeds, model.slot_prompts(batch), batch.rows)
        seq = torch.cat([prompts, embeds.to(prompts.dtype)], dim=1)
        if for_generation and not model.base_model.config.is_encoder_decoder:  # new tokens go after a real token
            layout = Layout.pads_first(slots, batch.mask)
        else:
            layout = _concat_layout(model.capabilities, slots, batch.mask)
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
        return _restore_outputs(model, outputs, layout)

    def generate(self, model: PromptedModel, batch: PromptBatch, **kwargs: Any) -> Any:
        """Generate from prompt + input embeddings (pads first: every row ends in a real token): with generate's
        own `inputs_embeds` support where the model has it, else by running all but the last position here and
        handing generate that cache. The result is the user's input_ids followed by the new tokens."""
        base = model.base_model
        if not base.config.is_encoder_decoder and not model.capabilities.leading_pads_ok and batch.has_pads:
            return _row_by_row(self, model, batch, kwargs)  # leading pads would move this model's positions
        seq, full_mask, layout = self._sequence(model, batch, for_generation=True)
        embeds, mask = layout.apply(seq), layout.apply(full_mask)
        if base.config.is_encoder_decoder:  # the encoder runs here: some (FSMT) take embeddings only in forward
            encoder = base.get_encoder()
            encoded = encoder(input_ids=None, inputs_embeds=embeds, attention_mask=mask, return_dict=True)
            return base.generate(encoder_outputs=encoded, attention_mask=mask, **kwargs)
        if kv.generates_from_embeds(base) or batch.input_ids is None:
            if kwargs.get("max_length") is not None:
                kwargs["max_length"] += layout.width
            if batch.input_ids is None:
                return base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            _user_view_criteria(kwargs, batch.input_ids, 0)
            out = base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            return _with_input(out, batch.input_ids, 0)
        return self._generate_after_prefill(model, batch, embeds, mask, layout, kwargs)

    def _generate_after_prefill(
        self, model: PromptedModel, batch: PromptBatch, embeds: torch.Tensor, mask: torch.Tensor, layout: Layout, kwargs
    ) -> Any:
        base = model.base_model
        name = kv.cache_kwarg(base)
        if name is None:
            raise UnsupportedModelError(
                f"{type(base).__name__} generates neither from inputs_embeds nor from a cache handed to it, so a "
                "soft prompt can't generate with it (its forward works: score with forward, or generate greedily "
                "with repeated forwards)."
            )
        config = kwargs.get("generation_config") or base.generation_config
        expand = max(kwargs.get("num_beams") or config.num_beams or 1, kwargs.get("num_return_sequences") or 1)
        extra = {"position_ids": kv.input_positions(mask, 0)[:, :-1]} if kv.accepts(base, "position_ids") else {}
        with torch.no_grad():
            out = base(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **extra)
        try:
            cache = kv.output_cache(out)
        except RuntimeError:
            raise UnsupportedModelError(
                f"{type(base).__name__} generates neither from inputs_embeds nor returns a cache to continue from, so "
                "a soft prompt can't generate with it (its forward works)."
            ) from None
        if expand > 1:
            cache.batch_repeat_interleave(expand)
        safe = safe_token_id(base.config)
        ids = batch.plan.clean_ids(batch.input_ids, safe) if batch.plan is not None else batch.input_ids
        ids = layout.apply(torch.cat([ids.new_full((batch.batch_size, layout.width), safe), ids], dim=1))
        start = ids.shape[1]
        if kwargs.get("max_length") is not None:
            kwargs["max_length"] += start - batch.length
        _user_view_criteria(kwargs, batch.input_ids, start)
        out = base.generate(input_ids=ids, attention_mask=mask, **{name: cache}, **kwargs)
        return _with_input(out, batch.input_ids, start)


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
        if capabilities.pads_matter and batch.has_left_padding:
            return ExecutionPath.CONCAT, "left-padded generate with windowed attention (pads would use the window)"
    if batch is not None and capabilities.pads_matter and len(batch.names) > 1:
        return ExecutionPath.CONCAT, "a mixed-prompt batch with windowed attention (a window keeps no padded prompt)"
    return ExecutionPath.PREFIX_KV, capabilities.reason


def _row_by_row(strategy: Concat, model: PromptedModel, batch: PromptBatch, kwargs: dict[str, Any]) -> torch.Tensor:
    """Each row generated alone, without its pads, then stacked as generate stacks them (new tokens padded after the
    input): for models whose positions come from the sequence length, where pads anywhere would shift them."""
    if kwargs.get("return_dict_in_generate"):
        raise ValueError(
            f"{type(model.base_model).__name__} takes no position ids, so its padded rows are generated one by one; "
            "return_dict_in_generate=True is not supported then (generate the rows separately)."
        )
    pad = safe_token_id(model.base_model.config)
    pad = kwargs.get("pad_token_id", pad) if isinstance(kwargs.get("pad_token_id"), int) else pad
    new_tokens = []
    for b in range(batch.batch_size):
        keep = batch.mask[b].bool()
        row = PromptBatch(
            [batch.names[int(batch.rows[b])]],
            torch.zeros(1, dtype=torch.long, device=batch.device),
            batch.input_ids[b : b + 1, keep],
            None,
            batch.mask[b : b + 1, keep],
            plan=None if batch.plan is None else batch.plan.for_row(b, keep),
        )
        out = strategy.generate(model, row, **dict(kwargs))
        new_tokens.append(out[:, row.length :])
    width = max(t.shape[1] for t in new_tokens)
    new = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in new_tokens])
    repeats = new.shape[0] // batch.batch_size
    return torch.cat([batch.input_ids.repeat_interleave(repeats, 0), new], dim=1)


def _with_input(out: Any, input_ids: torch.Tensor, start: int) -> Any:
    """Generate's output with its first `start` columns replaced by the user's input_ids (each row repeated for
    the sequences generate returned per row)."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    repeats = sequences.shape[0] // input_ids.shape[0]
    sequences = torch.cat([input_ids.repeat_interleave(repeats, 0), sequences[:, start:]], dim=1)
    if isinstance(out, torch.Tensor):
        return sequences
    out.sequences = sequences
    return out


def _remainder_tail(batch: PromptBatch, rest: Remainder, keep: Any) -> int:
    """`keep` if the user's last `keep` columns are, in every row, the last tokens of a padding-free remainder of
    one length (so the base model's own `logits_to_keep` picks exactly them), else 0."""
    if not isinstance(keep, int) or not 0 < keep <= rest.mask.shape[1] or not bool(rest.mask.all()):
        return 0
    after_prefix = bool((batch.plan.prefix_end <= batch.length - keep).all())
    return keep if after_prefix and bool(batch.mask[:, -keep:].all()) else 0


def _kept(logits: torch.Tensor, keep: Any) -> torch.Tensor:
    """Transformers' `logits_to_keep`: 0 all positions, an int the last ones, a 1-D tensor those indices."""
    if isinstance(keep, torch.Tensor):
        return logits[:, keep.to(logits.device)]
    return logits[:, -keep:] if keep else logits
