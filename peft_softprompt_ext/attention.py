"""Attention for the user's tokens against the prompt's keys/values: transformers' SDPA without two costs its
generic path puts on a prefix cache.

With a cache, kv_len > q_len, so transformers builds an explicit mask (it skips it only when q_len == kv_len or
q_len == 1) and then

1. can't pass `is_causal` (SDPA's causal flag is upper-left; a prefix needs lower-right), so on CUDA the flash kernel
   is off the table;
2. on CPU calls `repeat_kv` (`use_gqa_in_sdpa` allows grouped-query attention only without a mask), materialising
   the key/value heads once per query group in every layer, forward and backward, although torch's CPU kernel takes
   a mask together with `enable_gqa`.

`softprompt_sdpa` is registered with transformers (`AttentionInterface`, `AttentionMaskInterface`, its public
extension points). Its mask function returns the marker `LOWER_RIGHT` instead of a mask when the only pattern is
lower-right causal (plain causal, no padding, the 2-D mask covering every key); its attention function then runs
lower-right causal attention: on CUDA with `torch.nn.attention.bias.causal_lower_right` (the flash kernel), on CPU
with a boolean mask built once per shape and `enable_gqa`. A real mask (padding, windows) on CPU goes to SDPA with
`enable_gqa`; everything else to transformers' own `sdpa_attention_forward`. The marker is passed to every layer
as its mask. On CPU a decoding step (one query row) that SDPA would run in bf16/fp16 runs in float32: torch's CPU
kernel is several times slower on one reduced-precision row (`_cpu_sdpa`).

`switched(base)` turns it on around one call of a model whose configs all say "sdpa"; the capability probe
(`architecture.py`) decides per model whether it may, by comparing logits with and without it. Under gradient
checkpointing a layer reruns in the backward, outside that call: non-reentrant checkpointing switches the rerun too
(`cache.recompute_within`); reentrant checkpointing keeps it off (`tuner/strategies.py`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .constants import PREFIX_ATTENTION_NAME, SDPA_NAME

LOWER_RIGHT = torch.zeros(1, 1, 0, 0, dtype=torch.bool)  # "lower-right causal, no padding" (compared by identity)
_GENERIC = ("softcap", "position_bias", "s_aux", "sinks")  # features only transformers' own function handles
_REDUCED = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=32)
def _lower_right(q_len: int, kv_len: int, device: str) -> torch.Tensor:
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def prefix_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> Any:
    """`LOWER_RIGHT` for queries that are the last q_length of kv_length keys, plain causal, nothing masked;
    transformers' SDPA mask otherwise."""
    plain = mask_function is causal_mask_function and local_size is None and allow_is_causal_skip
    covered = attention_mask is not None and attention_mask.shape[-1] == kv_length and kv_offset == 0
    suffix = 1 < q_length < kv_length and isinstance(q_offset, int) and q_offset == kv_length - q_length
    if plain and covered and suffix and bool(attention_mask.all()):
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
    lower_right = attention_mask is LOWER_RIGHT
    cpu = query.device.type == "cpu"
    generic = any(kwargs.get(name) is not None for name in _GENERIC)
    reduced = _cpu_reduced_dtype(query) if cpu and not generic and query.shape[2] == 1 else None
    if not lower_right and reduced is None and (attention_mask is None or not cpu or generic):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if generic:
        raise ValueError(f"{type(module).__name__} passes {[n for n in _GENERIC if kwargs.get(n) is not None]}")
    groups = getattr(module, "num_key_value_groups", 1)
    q_len, kv_len = query.shape[2], key.shape[2]
    if lower_right and not cpu:
        if groups > 1:  # the lower-right dispatch calls the flash op itself, without enable_gqa
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        mask = causal_lower_right(q_len, kv_len)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    else:
        mask = _lower_right(q_len, kv_len, str(query.device)) if lower_right else attention_mask
        out = _cpu_sdpa(query, key, value, mask, dropout, scaling, groups, reduced)
    return out.transpose(1, 2).contiguous(), None


def _cpu_reduced_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The bf16/fp16 dtype SDPA would run a CPU query in: its own, or autocast's (which casts SDPA's inputs; under
    autocast RoPE hands over float32 queries), else None."""
    if query.dtype in _REDUCED:
        return query.dtype
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _REDUCED:
        return torch.get_autocast_dtype("cpu")
    return None


def _cpu_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    groups: int,
    reduced: torch.dtype | None,
) -> torch.Tensor:
    """SDPA on CPU with the unrepeated key/value heads (`enable_gqa`). `reduced` (a decoding step that SDPA would
    run in bf16/fp16): computed in float32 and rounded once to that dtype, since torch's CPU flash kernel runs a
    single reduced-precision query row up to 5x (bf16) and 10x (fp16) slower than the same row in float32 and
    accumulates in float32 either way (`benchmarks/bench_attention.py`); autocast is off there, or it would cast
    the inputs back."""
    if reduced is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1
        )
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    with torch.autocast(device_type="cpu", enabled=False):
        out = _cpu_sdpa(query.float(), key.float(), value.float(), mask, dropout, scaling, groups, None)
    return out.to(reduced)


@functools.cache
def _register() -> None:
    AttentionInterface.register(PREFIX_ATTENTION_NAME, prefix_sdpa)
    AttentionMaskInterface.register(PREFIX_ATTENTION_NAME, prefix_mask)


def _configs(config: PretrainedConfig) -> list[PretrainedConfig]:
    found = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig):
            found += _configs(sub)
    return found


def applies(base: nn.Module) -> bool:
    """Whether `base` runs transformers' SDPA everywhere (the only implementation this one stands in for) and
    dispatches attention through `AttentionInterface`."""
    config = getattr(base, "config", None)
    if not isinstance(config, PretrainedConfig) or not getattr(base, "_supports_attention_backend", False):
        return False
    return all(c._attn_implementation == SDPA_NAME for c in _configs(config))


@contextlib.contextmanager
def switched(base: nn.Module, on: bool = True) -> Iterator[None]:
    """`base` on `softprompt_sdpa` for the block (when `on` and it `applies`), back on "sdpa" afterwards."""
    if not on or not applies(base):
        yield
        return
    _register()
    base.config._attn_implementation = PREFIX_ATTENTION_NAME
    try:
        yield
    finally:
        base.config._attn_implementation = SDPA_NAME
