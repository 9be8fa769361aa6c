"""The seam over transformers' KV cache API: build a prompt's cache, share it across a batch, keep it alive under
gradient checkpointing. Under causal attention the virtual tokens see only each other, so their keys/values do not
depend on the input: compute them once (batch 1), expand over the batch and run the real tokens against them.

Transformers renamed `past_key_values` to `cache` (5.x); every place that passes or reads a cache goes through
`cache_kwarg` / `output_cache` here, so the next rename is a one-line change and never a silent drop.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_layers import GradientCheckpointingLayer

CACHE_NAMES = ("cache", "past_key_values")
PLAIN_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)  # [B, heads, T, head_dim] keys/values and nothing else


def cache_kwarg(module: nn.Module) -> str | None:
    """The name under which `module.forward` takes a KV cache, or None."""
    params = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_NAMES if name in params), None)


def accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def generates_from_embeds(model: nn.Module) -> bool:
    """Whether `model.generate(inputs_embeds=...)` works for a decoder-only model (transformers' own test)."""
    prepare = getattr(model, "prepare_inputs_for_generation", None)
    return prepare is not None and "inputs_embeds" in inspect.signature(prepare).parameters


def output_cache(outputs: Any) -> Any:
    for name in CACHE_NAMES:
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    raise RuntimeError("The model returned no KV cache although use_cache=True was passed.")


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer without its head (LlamaForCausalLM -> LlamaModel): the prompt needs no logits."""
    return getattr(model, "base_model", model)


def input_positions(
    mask: torch.Tensor, offset: torch.Tensor | int, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions of the real tokens, after `offset` virtual ones; pads don't advance them (padding invariance)."""
    if position_ids is not None:
        return position_ids + offset
    return (mask.long().cumsum(-1) - 1).clamp_min(0) + offset


# --------------------------------------------------------------------------- gradient checkpointing


def _checkpointed_layers(model: nn.Module) -> list[GradientCheckpointingLayer]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def _checkpointing_flags(model: nn.Module) -> list[nn.Module]:
    """Every module whose `gradient_checkpointing` flag is on: the layers, and the backbone, which then turns
    `use_cache` off (`merge_with_config_defaults`)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def gradient_checkpointing_active(model: nn.Module) -> bool:
    """Whether a training forward of `model` now runs checkpointed layers (which drop caches handed to them)."""
    if not (model.training and torch.is_grad_enabled()):
        return False  # checked first: the flag below walks every module
    if hasattr(type(model), "is_activation_checkpointing"):  # transformers >= 5.2x; the old name warns
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


@contextlib.contextmanager
def recompute_within(model: nn.Module, make_context: Callable[[], contextlib.AbstractContextManager]) -> Iterator[bool]:
    """Checkpointed layers called in the block recompute inside `make_context()` (in the backward, after the block
    has exited): a forward that switches what a layer runs (the prefix-aware attention) then has a recompute that
    runs the same code and saves the same tensors. Through non-reentrant checkpointing's `context_fn`; yields False
    (and changes nothing) where a layer's checkpoint function is reentrant, unreadable or has its own
    `context_fn`."""
    layers = _checkpointed_layers(model)
    funcs = [getattr(layer, "_gradient_checkpointing_func", None) for layer in layers]
    ok = not checkpointing_is_reentrant(model) and all("context_fn" not in func.keywords for func in funcs)
    if ok:

        def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
            return contextlib.nullcontext(), make_context()

        for layer, func in zip(layers, funcs, strict=True):
            layer._gradient_checkpointing_func = functools.partial(func, context_fn=contexts)
    try:
        yield ok
    finally:
        if ok:
            for layer, func in zip(layers, funcs, strict=True):
                layer._gradient_checkpointing_func = func


def checkpointing_is_reentrant(model: nn.Module) -> bool:
    """Reentrant checkpointing hands gradients only to tensor arguments, never to a cache's tensors; True also when
    the checkpoint function can't be read (so a caller falls back to what is always correct)."""
    for layer in _checkpointed_layers(model):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None)
        if keywords is None or keywords.get("use_reentrant", True) is not False:
            return True
    return False


@contextlib.contextmanager
def checkpointing_suspended(model: nn.Module) -> Iterator[None]:
    """Run `model` without checkpointing for the block: the prompt's batch-1 forward keeps its cache (and its few
    activations cost P positions, not B*L)."""
    flagged = _checkpointing_flags(model)
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


@contextlib.contextmanager
def cache_kept_under_checkpointing(model: nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep a cache they only read: transformers' `_can_checkpoint_with_cache` on each
    layer, and the backbone's own flag off (some backbones drop the cache before calling their layers; the flag
    does nothing else there, the layers' flags keep checkpointing on). Safe with a frozen cache
    (`for_batch(..., frozen=True)`), whose `update` never writes, so the recompute reads the same keys and values."""
    layers = _checkpointed_layers(model)
    backbones = [m for m in _checkpointing_flags(model) if not isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    for module in backbones:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's own value
        for module in backbones:
            module.gradient_checkpointing = True


# --------------------------------------------------------------------------- the prompt's cache


def prompt_cache(model: nn.Module, prompt: torch.Tensor, checkpointed: bool = False) -> Any:
    """KV cache of one prompt [P, d], batch 1 (expand it with `for_batch`). `checkpointed` (a plain cache, under
    gradient checkpointing): the pass keeps only its keys/values and recomputes its activations in the backward,
    so the prompt costs the memory of its cache and not of P positions' activations in every layer."""
    backbone = backbone_of(model)
    positions = torch.arange(prompt.shape[0], device=prompt.device).unsqueeze(0)
    kwargs = {"position_ids": positions} if accepts(backbone, "position_ids") else {}

    def run(embeds: torch.Tensor) -> Any:
        with checkpointing_suspended(backbone):
            outputs = backbone(inputs_embeds=embeds.unsqueeze(0), use_cache=True, return_dict=True, **kwargs)
        return output_cache(outputs)

    if not checkpointed:
        return run(prompt)
    built: list[Any] = []

    def states(embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = run(embeds)
        built.append(cache)  # the backward's recompute appends a second one, which nothing reads
        return tuple(t for layer in _layers(cache) for t in (layer.keys, layer.values))

    tensors = torch.utils.checkpoint.checkpoint(states, prompt, use_reentrant=False)
    cache = built[0]
    for layer, keys, values in zip(_layers(cache), tensors[::2], tensors[1::2], strict=True):
        layer.keys, layer.values = keys, values
    return cache


def plain_layers(cache: Any) -> list[Any] | None:
    """The cache's per-layer key/value holders when it is a DynamicCache whose every layer is a plain attention
    layer (`PLAIN_LAYERS`): then a prompt can be prepended. None for anything else (linear attention, SSM or conv
    state, sparse-attention indexers, quantised, static or unknown layers)."""
    layers = getattr(cache, "layers", None) if type(cache) is DynamicCache else None  # subclasses carry more state
    if not layers:
        return None
    for layer in layers:
        if type(layer) not in PLAIN_LAYERS:
            return None
        if not (isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4 and layer.values.dim() == 4):
            return None
    return list(layers)


def smallest_window(cache: Any) -> int | None:
    """The shortest sliding window among the cache's layers, or None."""
    windows = [layer.sliding_window for layer in getattr(cache, "layers", ()) if getattr(layer, "is_sliding", False)]
    return min(windows) if windows else None


def has_local_attention(cache: Any) -> bool:
    """Some layer attends within a window (sliding / chunked): pads between prompt and text would use it up."""
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ()))


def _layers(cache: Any) -> list[Any]:
    layers = plain_layers(cache)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no per-layer keys/values this plugin knows how to share.")
    return layers


@functools.cache
def _frozen_class(layer_cls: type) -> type:
    """`layer_cls` whose `update` returns prefix + new states without storing them."""

    def update(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return type(f"Frozen{layer_cls.__name__}", (layer_cls,), {"update": update, "__doc__": _frozen_class.__doc__})


def _copy_layers(cache: Any, frozen: bool) -> Any:
    """A new cache object over the same tensors: updates reassign (`keys = cat(...)`), so the source stays intact
    and a compiled prompt cache can be handed to many forwards."""
    new = copy.copy(cache)
    new.layers = []
    for layer in _layers(cache):
        clone = copy.copy(layer)
        if frozen:
            clone.__class__ = _frozen_class(type(layer))
        new.layers.append(clone)
    return new


def cache_length(cache: Any) -> int:
    """Positions a plain prompt cache covers (a sliding layer keeps fewer keys but counts them all)."""
    return cache.get_seq_length()


def for_batch(cache: Any, batch_size: int, frozen: bool = False) -> Any:
    """A copy of a batch-1 prompt cache expanded over `batch_size` rows (`frozen`: read-only, for forwards that
    return no cache, such as checkpointed training)."""
    new = _copy_layers(cache, frozen)
    for layer in new.layers:
        layer.keys = layer.keys.expand(batch_size, *layer.keys.shape[1:])
        layer.values = layer.values.expand(batch_size, *layer.values.shape[1:])
    return new


def mixed_batch(caches: list[Any | None], rows: torch.Tensor, frozen: bool = False) -> tuple[Any, torch.Tensor]:
    """One cache for a batch whose rows use different prompts: `caches[u]` is prompt u's batch-1 cache (None: no
    prompt), `rows[b]` the prompt of row b. Shorter prompts are left-padded with zero keys/values that the returned
    [B, P_max] slot mask hides. Full-attention layers only: a sliding layer keeps a window, not a prompt (callers
    take concatenation for mixed batches on models with local attention)."""
    template = next(c for c in caches if c is not None)
    lengths = [0 if c is None else cache_length(c) for c in caches]
    width = max(lengths)
    new = _copy_layers(template, frozen)
    for index, layer in enumerate(new.layers):
        for name in ("keys", "values"):
            like = getattr(_layers(template)[index], name)
            padded = []
            for cache, length in zip(caches, lengths, strict=True):
                pad = like.new_zeros(1, like.shape[1], width - length, like.shape[3])
                parts = [pad] if cache is None else [pad, getattr(_layers(cache)[index], name)]
                padded.append(torch.cat(parts, dim=-2))
            setattr(layer, name, torch.cat(padded)[rows])
    starts = (width - torch.tensor(lengths, device=rows.device))[rows].unsqueeze(1)
    slots = torch.arange(width, device=rows.device).unsqueeze(0) >= starts
    return new, slots.long()


class CompiledPrompts:
    """Per-adapter prompt caches for inference, rebuilt whenever the prompt's parameters change (in-place
    optimiser steps bump a tensor's version; reloads replace or copy into it). Bounded: least recently used first
    out."""

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[tuple, Any]] = OrderedDict()

    @staticmethod
    def key(name: str, prefix: tuple[int, ...]) -> str:
        """The entry of adapter `name`'s fixed prefix `prefix` (hard and slot ids): dropped with the adapter's."""
        return f"{name}\x00{','.join(map(str, prefix))}"

    @staticmethod
    def fingerprint(encoder: nn.Module, dtype: torch.dtype) -> tuple:
        return (dtype,) + tuple((p.data_ptr(), p._version, p.device) for p in encoder.parameters())

    def get(self, name: str, encoder: nn.Module, dtype: torch.dtype, build: Callable[[], Any]) -> Any:
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
        """Drop adapter `name`'s entries (its prompt cache and its compiled prefixes), or all."""
        for key in [k for k in self._entries if name is None or k == name or k.startswith(f"{name}\x00")]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
