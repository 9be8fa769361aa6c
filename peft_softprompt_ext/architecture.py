"""What the base model is, decided by looking at it rather than by a list of names.

The shared prompt KV path needs a plain per-layer key/value cache that a prompt can be prepended to, and must give
the logits the concatenated prompt gives. `probe` checks exactly that, once per model, on a two-token dummy prompt:
it builds the prompt's cache, checks that every layer of it is a plain attention layer (not linear attention, SSM or
conv state, a sparse-attention indexer...), then runs the same three tokens both ways and compares. Anything that
fails or raises (MLA variants, hybrids, recurrent models, whatever comes next) uses concatenation, decided before
the first real forward and logged once, never discovered by a crash.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from . import cache as kv

logger = logging.getLogger(__name__)

PROBE_PROMPT, PROBE_INPUT = 2, 3  # dummy virtual tokens and input tokens of the probe


@dataclass(frozen=True)
class Capabilities:
    """`prefix_kv`: the prompt's KV cache can be shared (else concatenation; `reason` says why not).
    `local_attention`: some layer attends within a window (sliding / chunked), so pads must never sit between the
    prompt and the text."""

    prefix_kv: bool
    reason: str
    local_attention: bool = False


def max_positions(config: Any) -> int | None:
    """Absolute-position models can't take more than this many positions; None when unbounded (RoPE etc.)."""
    if getattr(config, "position_embedding_type", "absolute") != "absolute" and hasattr(config, "rope_theta"):
        return None
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0 and not hasattr(config, "rope_parameters"):
            return value
    return None


def is_causal_decoder(model: nn.Module) -> bool:
    """A decoder-only causal LM architecture (transformers' own mappings), where pads may go before the prompt."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _tolerance(dtype: torch.dtype) -> float:
    reduced = dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled()
    return 5e-2 if reduced else 1e-3


def _compare_paths(model: nn.Module, embeddings: nn.Module, prompt_cache: Any, prompt: torch.Tensor) -> float:
    """Max |logit difference| between the shared-KV and the concatenated forward, relative to the logit scale."""
    device = prompt.device
    rows = embeddings.weight.shape[0]
    ids = (torch.arange(2 * PROBE_INPUT, device=device).view(2, PROBE_INPUT) * 7 + 3) % rows
    positions = torch.arange(PROBE_PROMPT + PROBE_INPUT, device=device).expand(2, -1)
    with_positions = kv.accepts(model, "position_ids")
    extra = {"position_ids": positions[:, PROBE_PROMPT:]} if with_positions else {}
    shared = model(
        input_ids=ids,
        attention_mask=torch.ones(2, PROBE_PROMPT + PROBE_INPUT, dtype=torch.long, device=device),
        use_cache=False,
        **{kv.cache_kwarg(model): kv.for_batch(prompt_cache, 2)},
        **extra,
    ).logits
    embeds = torch.cat([prompt.unsqueeze(0).expand(2, -1, -1), embeddings(ids).to(prompt.dtype)], dim=1)
    extra = {"position_ids": positions} if with_positions else {}
    concat = model(inputs_embeds=embeds, use_cache=False, **extra).logits[:, PROBE_PROMPT:]
    if shared.shape != concat.shape:
        raise ValueError(f"logits of shape {tuple(shared.shape)} against {tuple(concat.shape)}")
    scale = max(1.0, float(concat.abs().max()))
    return float((shared.float() - concat.float()).abs().max()) / scale


def probe(model: nn.Module, embeddings: nn.Module) -> Capabilities:
    """Decide, for `model` (the base model) as it is, whether the shared prompt KV path applies."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return Capabilities(False, "encoder-decoder model: the prompt is concatenated before the encoder input")
    if not is_causal_decoder(model):
        return Capabilities(False, "not a decoder-only causal LM")
    if kv.cache_kwarg(model) is None or kv.cache_kwarg(kv.backbone_of(model)) is None:
        return Capabilities(False, "the model takes no KV cache")
    weight = embeddings.weight
    ids = torch.arange(PROBE_PROMPT, device=weight.device) + 3
    with _evaluating(model):
        try:
            prompt = embeddings(ids % weight.shape[0]).detach()
            prompt_cache = kv.prompt_cache(model, prompt)
            if kv.plain_layers(prompt_cache) is None:
                layers = sorted({type(layer).__name__ for layer in getattr(prompt_cache, "layers", ())})
                return Capabilities(
                    False,
                    f"its cache ({type(prompt_cache).__name__}, layers {layers or 'none'}) is not plain key/value",
                )
            error = _compare_paths(model, embeddings, prompt_cache, prompt)
        except Exception as err:  # whatever the architecture does, the answer is "use concatenation"
            return Capabilities(False, f"the shared-KV forward fails ({type(err).__name__}: {err})")
    if error > _tolerance(weight.dtype):
        return Capabilities(False, f"the shared-KV logits differ from concatenation by {error:.2g} (relative)")
    return Capabilities(True, "plain per-layer KV cache, equal to concatenation", kv.has_local_attention(prompt_cache))
