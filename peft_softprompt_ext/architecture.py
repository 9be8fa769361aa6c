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

from . import attention
from . import cache as kv
from .vocab import embed

logger = logging.getLogger(__name__)

PROBE_PROMPT, PROBE_INPUT, PROBE_PADS = 2, 3, 6  # dummy virtual tokens, input tokens, pads of the probe
PROBE_MAX_WINDOW = 64  # a sliding window up to this long is also probed with a prompt that overflows it


class UnsupportedModelError(RuntimeError):
    """The base model can't take a soft prompt at all: it runs neither from prompt + input embeddings nor with the
    prompt in its cache."""


@dataclass(frozen=True)
class Capabilities:
    """`concat`: the model runs from prompt + input embeddings (else `concat_reason`). `prefix_kv`: the prompt's KV
    cache can be shared (else `reason` says why not). `pads_matter`: pads between the prompt and the text change the
    result (a sliding window, ALiBi or relative biases count columns), so they must never sit there.
    `leading_pads_ok`: pads go before everything (a causal model where they change nothing, so the last column is a
    real token, what heads and generation read; a bidirectional one whose head pools the last column), else after
    the text. `causal`: the model attends causally (the prompt's keys then don't depend on the input).
    `prefix_attention`: the shared path may run `attention.py`'s implementation (it gave this model the same logits,
    with and without pads)."""

    prefix_kv: bool
    reason: str
    pads_matter: bool = False
    concat: bool = True
    concat_reason: str = ""
    leading_pads_ok: bool = True
    causal: bool = False
    prefix_attention: bool = False

    def check_supported(self, model_type: str) -> None:
        """Concatenation is the reference every path is checked against: without it nothing can be trusted."""
        if not self.concat:
            raise UnsupportedModelError(
                f"{model_type} can't take a soft prompt: its forward fails on input embeddings ({self.concat_reason}). "
                "Soft prompts need a model that runs from input embeddings."
            )


def max_positions(config: Any) -> int | None:
    """Absolute-position models can't take more than this many positions; None when unbounded (RoPE etc.)."""
    if getattr(config, "position_embedding_type", "absolute") != "absolute" and hasattr(config, "rope_theta"):
        return None
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0 and not hasattr(config, "rope_parameters"):
            return value
    return None


def _causal(model: nn.Module, embeddings: nn.Module, prompt: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether the model attends causally (decided by looking, not by its name): its last hidden states before the
    final position must not move when the final token changes."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % embeddings.weight.shape[0]
    states = []
    for row in (ids, changed):
        embeds = torch.cat(
            [prompt.unsqueeze(0).expand(row.shape[0], -1, -1), embed(embeddings, row).to(prompt.dtype)], 1
        )
        out = model(inputs_embeds=embeds, output_hidden_states=True)
        hidden = getattr(out, "hidden_states", None)
        if not hidden:
            return False
        states.append(hidden[-1][:, :-1])
    return _relative(states[1], states[0]) <= _tolerance(prompt.dtype)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block, the model's mode restored afterwards."""
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


def _probe_ids(embeddings: nn.Module, rows: int, length: int, offset: int = 0) -> torch.Tensor:
    device = embeddings.weight.device
    return (torch.arange(rows * length, device=device).view(rows, length) * 7 + 3 + offset) % embeddings.weight.shape[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) / max(1.0, float(b.float().abs().max()))


def _concat_logits(
    model: nn.Module, embeddings: nn.Module, prompt: torch.Tensor, ids: torch.Tensor, pads: int = 0, lead: bool = True
) -> torch.Tensor:
    """The model on [prompt ; input] embeddings, positions 0..P+L-1 (the reference every path must equal); with
    `pads`, the first row has that many masked pads before everything (`lead`) or after the text (the other rows:
    real tokens there). Per-token outputs come back for the first row's real columns only."""
    rows, length = ids.shape
    embeds = torch.cat([prompt.unsqueeze(0).expand(rows, -1, -1), embed(embeddings, ids).to(prompt.dtype)], 1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=ids.device)
    if pads:
        filler = embed(embeddings, _probe_ids(embeddings, rows, pads, offset=5)).to(prompt.dtype)
        parts = [filler, embeds] if lead else [embeds, filler]
        embeds, mask = torch.cat(parts, 1), torch.cat([mask.new_ones(rows, pads), mask], 1)
        if lead:
            mask[0, :pads] = 0
        else:
            mask = mask.roll(-pads, 1)
            mask[0, -pads:] = 0
    extra: dict[str, Any] = {"attention_mask": mask}
    if getattr(model.config, "is_encoder_decoder", False):
        start = getattr(model.config, "decoder_start_token_id", None) or 0
        extra["decoder_input_ids"] = torch.full((rows, 1), start, dtype=torch.long, device=ids.device)
    elif kv.accepts(model, "position_ids"):
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(inputs_embeds=embeds, **extra)
    value = out.logits if getattr(out, "logits", None) is not None else out[0]
    if value.dim() != 3 or value.shape[1] != embeds.shape[1]:
        return value  # pooled (sequence classification)
    first = (pads if lead else 0) + prompt.shape[0]
    return value[:, first : first + length]


def _shared_logits(model: nn.Module, prompt_cache: Any, ids: torch.Tensor, pads: int = 0) -> torch.Tensor:
    """The shared-KV forward; with `pads`, the first row has that many masked columns between the prompt and its
    text (the other rows real tokens there: a ragged batch, as users send)."""
    rows, length = ids.shape
    width = kv.cache_length(prompt_cache)
    padded = torch.cat([(ids[:, :1] + 1).expand(rows, pads), ids], dim=1)
    mask = torch.cat([ids.new_ones(rows, width), ids.new_ones(rows, pads + length)], dim=1)
    mask[0, width : width + pads] = 0
    extra = {}
    if kv.accepts(model, "position_ids"):
        extra["position_ids"] = (mask[:, width:].cumsum(-1) - 1).clamp_min(0) + width
    cache = kv.for_batch(prompt_cache, rows)
    out = model(input_ids=padded, attention_mask=mask, use_cache=False, **{kv.cache_kwarg(model): cache}, **extra)
    return out.logits[:, pads:] if out.logits.dim() == 3 else out.logits  # per token, or pooled (SEQ_CLS)


@dataclass(frozen=True)
class _SharedProbe:
    prefix_kv: bool
    reason: str
    pads_matter: bool = False
    window: int | None = None
    prefix_attention: bool = False


def _prefix_kv(
    model: nn.Module, embeddings: nn.Module, prompt: torch.Tensor, reference: torch.Tensor, ids
) -> _SharedProbe:
    """Compare the shared-KV forward with the concatenated one, unpadded and in a ragged batch (the caller has
    checked that the model is causal); then the same forward on `attention.py`'s implementation with the first."""
    if kv.cache_kwarg(model) is None or kv.cache_kwarg(kv.backbone_of(model)) is None:
        return _SharedProbe(False, "the model takes no KV cache")
    try:
        prompt_cache = kv.prompt_cache(model, prompt)
        if kv.plain_layers(prompt_cache) is None:
            layers = sorted({type(layer).__name__ for layer in getattr(prompt_cache, "layers", ())})
            why = f"its cache ({type(prompt_cache).__name__}, layers {layers or 'none'}) is not plain key/value"
            return _SharedProbe(False, why)
        shared = [_shared_logits(model, prompt_cache, ids), _shared_logits(model, prompt_cache, ids, pads=PROBE_PADS)]
        model.train()  # a training forward must keep returning the prompt's cache
        kv.prompt_cache(model, prompt)
    except Exception as err:  # whatever the architecture does, the answer is "use concatenation"
        return _SharedProbe(False, f"the shared-KV forward fails ({type(err).__name__}: {err})")
    finally:
        model.eval()
    error, padded = _relative(shared[0], reference), _relative(shared[1][:1], reference[:1])
    if error > _tolerance(prompt.dtype):
        return _SharedProbe(False, f"the shared-KV logits differ from concatenation by {error:.2g} (relative)")
    return _SharedProbe(
        True,
        "plain per-layer KV cache, equal to concatenation",
        kv.has_local_attention(prompt_cache) or padded > _tolerance(prompt.dtype),
        kv.smallest_window(prompt_cache),
        _prefix_attention_ok(model, prompt_cache, ids, shared, _tolerance(prompt.dtype)),
    )


def _prefix_attention_ok(
    model: nn.Module, prompt_cache: Any, ids: torch.Tensor, shared: list, tolerance: float
) -> bool:
    """Whether `attention.switched` leaves the shared-KV logits as they are, unpadded (the lower-right marker) and
    in the ragged batch (a real mask)."""
    if not attention.applies(model):
        return False
    try:
        with attention.switched(model):
            switched = [_shared_logits(model, prompt_cache, ids), _shared_logits(model, prompt_cache, ids, PROBE_PADS)]
    except Exception:  # noqa: BLE001  any failure means: keep transformers' own implementation
        return False
    return max(_relative(a, b) for a, b in zip(switched, shared, strict=True)) <= tolerance


def probe(model: nn.Module, embeddings: nn.Module) -> Capabilities:
    """Decide, for `model` (the base model) as it is, which paths apply: concatenation (does it run from
    prompt + input embeddings? where may pads go?) and the shared prompt KV (causal attention, equal to
    concatenation, also in a ragged batch and with a prompt longer than a small sliding window)."""
    ids = _probe_ids(embeddings, 2, PROBE_INPUT)
    with evaluating(model):
        prompt = embed(embeddings, _probe_ids(embeddings, 1, PROBE_PROMPT, offset=1)[0]).detach()
        try:
            reference = _concat_logits(model, embeddings, prompt, ids)
        except Exception as err:  # the model's forward can't take embeddings (or not these)
            return Capabilities(False, "concatenation is impossible", False, False, f"{type(err).__name__}: {err}")
        pads_first = _pads_ok(model, embeddings, prompt, reference, ids, lead=True)
        encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
        if encoder_decoder or not _causal(
            model, embeddings, prompt, ids
        ):  # pads after the text unless only before works
            pads_last = _pads_ok(model, embeddings, prompt, reference, ids, lead=False)
            reason = (
                "encoder-decoder model: the prompt is concatenated before the encoder input"
                if encoder_decoder
                else "bidirectional attention: the prompt's keys depend on the input"
            )
            return Capabilities(False, reason, leading_pads_ok=pads_first and not pads_last)
        shared = _prefix_kv(model, embeddings, prompt, reference, ids)
        if shared.prefix_kv and shared.window is not None and shared.window <= PROBE_MAX_WINDOW:
            longer = embed(embeddings, _probe_ids(embeddings, 1, shared.window + 1, offset=1)[0]).detach()
            shared = _prefix_kv(model, embeddings, longer, _concat_logits(model, embeddings, longer, ids), ids)
    return Capabilities(
        shared.prefix_kv,
        shared.reason,
        shared.pads_matter,
        leading_pads_ok=pads_first,
        causal=True,
        prefix_attention=shared.prefix_attention,
    )


def _pads_ok(model: nn.Module, embeddings: nn.Module, prompt: torch.Tensor, reference, ids, lead: bool) -> bool:
    """Whether masked pads before everything (`lead`) or after the text leave the first row's outputs unchanged:
    not where positions come from the length, or where a head pools a fixed column (BERT's first, XLNet's last)."""
    try:
        padded = _concat_logits(model, embeddings, prompt, ids, pads=PROBE_PADS, lead=lead)
    except Exception:  # noqa: BLE001  a model that can't take a mask with pads there
        return False
    return _relative(padded[:1], reference[:1]) <= _tolerance(prompt.dtype)
