"""Package changes the benchmarks propose, as switchable prototypes, so their effect is measured side by side.

Nothing here is imported by the package; a benchmark switches a prototype on for one method's runs only
(bench_speed's ``ours_proposed`` method). Delete a prototype once the package has the change.

``prefix_attention``: attention for "the user's tokens against a prompt's key/value cache" without the two costs
transformers' SDPA path puts on it. With a cache, kv_len > q_len, so transformers builds an explicit mask (its
`_ignore_causal_mask_sdpa` skips the mask only when q_len == kv_len or q_len == 1) and then

1. can't pass ``is_causal`` (SDPA's is_causal is upper-left; the prefix needs lower-right), so on CUDA the flash
   kernel is off the table (memory-efficient or math kernel with a mask instead);
2. on CPU calls ``repeat_kv`` (`use_gqa_in_sdpa` allows GQA only without a mask), materialising the 3 key/value
   heads as 9 in every layer, forward and backward, although torch's CPU flash kernel takes a mask with GQA.

The prototype registers an attention implementation ``"softprompt_sdpa"`` with transformers
(`AttentionInterface` and `AttentionMaskInterface`): its mask function returns the marker `LOWER_RIGHT` instead of a
mask when the only pattern is lower-right causal (no padding, plain causal, the 2D mask covering every key); its
attention function then runs lower-right causal attention: on CUDA through
``torch.nn.attention.bias.causal_lower_right`` (the flash kernel, whose causal flag is lower-right), on CPU with a
bool mask built once per shape and ``enable_gqa=True``. With a real mask (padding) on CPU it passes the mask with
``enable_gqa=True``; everything else goes to transformers' own `sdpa_attention_forward`. The marker is a 4D tensor
passed to every layer as its mask, so a checkpointed layer's recompute sees it too.

    prototypes.prefix_attention(base, True)    # base.config._attn_implementation "sdpa" -> "softprompt_sdpa"
    prototypes.prefix_attention(base, False)   # and back

``fixed_prefix_logits``: the compiled system-prompt path (`PrefixKV._forward_fixed_prefix`, slots) returns logits for
every input position, so it builds a [B, prefix + rest, V] tensor from zeros (`Remainder.put`: a fill, a multiply and
a scatter_add of the remainder's logits) and then copies each row's compiled prefix logits in; and a caller that
asks for ``logits_to_keep`` (what generation's prefill needs) is refused the compiled path (`_slot_blockers`) and
recomputes the whole prefix. The prototype: when every row runs the remainder right after the same fixed prefix
with no padding, ``torch.cat([prefix logits expanded to the batch, remainder logits])`` (one write); with
``logits_to_keep=k`` and k <= the remainder's length, only the base model's last k logits (nothing else built).
Anything else: the package's own path, slicing the last k afterwards.

    prototypes.fixed_prefix_logits(True)       # patches the package's classes (process-wide) until ...(False)

``single_row_concat``: a training forward of ONE row gains nothing from sharing the prompt's KV (B·L + P positions
either way) but pays a separate batch-1 prompt pass, forward and backward (~3,000 more aten ops per step and the
prompt's positions as their own small matrix products). The prototype adds a blocker, so such a forward takes
concatenation: B == 1 and some prompt of the batch needs gradients.

    prototypes.single_row_concat(True)
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOWER_RIGHT",
    "NAME",
    "fixed_prefix_logits",
    "prefix_attention",
    "prefix_mask",
    "prefix_sdpa",
    "single_row_concat",
]

NAME = "softprompt_sdpa"
LOWER_RIGHT = torch.zeros(1, 1, 0, 0, dtype=torch.bool)  # "lower-right causal, no padding" (compared by identity)


@functools.lru_cache(maxsize=32)
def _lower_right(q_len: int, kv_len: int, device: str) -> torch.Tensor:
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def prefix_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> Any:
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    plain = mask_function is causal_mask_function and local_size is None and allow_is_causal_skip
    covered = attention_mask is not None and attention_mask.shape[-1] == kv_length and kv_offset == 0
    if plain and covered and 1 < q_length < kv_length and q_offset == kv_length - q_length:
        if bool(attention_mask.all()):
            return LOWER_RIGHT
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip,
        **kwargs,
    )


def prefix_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    lower_right = attention_mask is LOWER_RIGHT
    cpu = query.device.type == "cpu"
    if not lower_right and (attention_mask is None or not cpu or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    q_len, kv_len = query.shape[2], key.shape[2]
    if lower_right and not cpu:
        from torch.nn.attention.bias import causal_lower_right

        if groups > 1:  # the lower-right dispatch calls the flash op itself, without enable_gqa
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=causal_lower_right(q_len, kv_len), dropout_p=dropout, scale=scaling
        )
    else:
        mask = _lower_right(q_len, kv_len, str(query.device)) if lower_right else attention_mask
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1
        )
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, prefix_sdpa)
    AttentionMaskInterface.register(NAME, prefix_mask)


def prefix_attention(base: nn.Module, on: bool) -> None:
    """Switch `base` (a transformers model; its sub-configs follow) to the prototype or back to "sdpa". A model
    using another attention implementation is left alone."""
    _register()
    current = base.config._attn_implementation
    if on and current == "sdpa":
        base.config._attn_implementation = NAME
    elif not on and current == NAME:
        base.config._attn_implementation = "sdpa"


# ------------------------------------------------------------------------------------------------ fixed_prefix_logits

_ORIGINALS: dict[str, Any] = {}


def _contiguous(batch: Any) -> bool:
    """Every row: slotted, no padding, its remainder right after one shared prefix end."""
    plan = batch.plan
    end = plan.prefix_end
    return bool(plan.slotted.all()) and bool(batch.mask.all()) and bool((end == end[0]).all())


def _forward_fixed_prefix(self: Any, model: Any, batch: Any) -> Any:
    from peft_softprompt_ext import cache as kv
    from peft_softprompt_ext.tuner.batch import safe_token_id

    keep = batch.kwargs.pop("logits_to_keep", 0) or 0
    if not _contiguous(batch):
        outputs = _ORIGINALS["forward_fixed_prefix"](self, model, batch)
        if keep:
            outputs["logits"] = outputs.logits[:, -keep:]
        return outputs
    base = model.base_model
    batch.kwargs.pop("use_cache", None)
    cache, cached, prefix_logits = model.prefix_cache(batch, frozen=True)
    end = int(batch.plan.prefix_end[0])
    ids = batch.plan.clean_ids(batch.input_ids[:, end:], safe_token_id(base.config))
    inputs = {"input_ids": ids, "attention_mask": torch.cat([cached.to(batch.mask), batch.mask[:, end:]], 1)}
    if kv.accepts(base, "position_ids"):
        inputs["position_ids"] = (cached.sum(1, keepdim=True) + torch.arange(ids.shape[1])).to(ids.device)
    short = 0 < keep <= ids.shape[1]
    if short:
        inputs["logits_to_keep"] = keep
    outputs = base(**inputs, use_cache=False, **{kv.cache_kwarg(base): cache}, return_dict=True, **batch.kwargs)
    if short:
        return outputs
    rows = batch.rows.to(outputs.logits.device)
    prefix = torch.cat([prefix_logits[u] for u in sorted(prefix_logits)])  # [prompts, end, V]
    prefix = prefix[rows] if len(prefix_logits) > 1 else prefix.expand(len(rows), -1, -1)
    logits = torch.cat([prefix.to(outputs.logits.dtype), outputs.logits], dim=1)
    outputs["logits"] = logits[:, -keep:] if keep else logits
    return outputs


_SWITCHES = {"fixed_prefix_logits": False, "single_row_concat": False}


def _slot_blockers(self: Any, batch: Any, purpose: Any) -> list[str]:
    from peft_softprompt_ext.tuner.strategies import Purpose

    saved = batch.kwargs.pop("logits_to_keep", None) if _SWITCHES["fixed_prefix_logits"] else None
    try:
        reasons = _ORIGINALS["slot_blockers"](self, batch, purpose)
    finally:
        if saved is not None:
            batch.kwargs["logits_to_keep"] = saved
    one_row = _SWITCHES["single_row_concat"] and purpose is Purpose.FORWARD and batch.batch_size == 1
    if one_row and torch.is_grad_enabled() and any(self._needs_grad(n) for n in batch.names if n):
        reasons.append("one row in training (sharing the prompt's KV saves no positions)")
    return reasons


def _patch() -> None:
    from peft_softprompt_ext.tuner import model as tuner_model
    from peft_softprompt_ext.tuner import strategies

    if not _ORIGINALS:
        _ORIGINALS["forward_fixed_prefix"] = strategies.PrefixKV._forward_fixed_prefix
        _ORIGINALS["slot_blockers"] = tuner_model.SoftPromptModel._slot_blockers
    on = _SWITCHES["fixed_prefix_logits"]
    strategies.PrefixKV._forward_fixed_prefix = _forward_fixed_prefix if on else _ORIGINALS["forward_fixed_prefix"]
    any_on = any(_SWITCHES.values())
    tuner_model.SoftPromptModel._slot_blockers = _slot_blockers if any_on else _ORIGINALS["slot_blockers"]


def fixed_prefix_logits(on: bool) -> None:
    """Patch (or restore) `PrefixKV._forward_fixed_prefix` and `SoftPromptModel._slot_blockers` process-wide."""
    _SWITCHES["fixed_prefix_logits"] = on
    _patch()


def single_row_concat(on: bool) -> None:
    """Patch (or restore) `SoftPromptModel._slot_blockers` process-wide (see the module docstring)."""
    _SWITCHES["single_row_concat"] = on
    _patch()
