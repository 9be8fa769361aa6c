"""One forward's inputs, checked at the edge, and how the user's columns map into the sequence the base model sees.

`PromptBatch` is what every execution strategy receives: which prompt each row gets and the user's tensors, with
shapes validated (clear errors instead of failures deep inside rotary or cache code) and the attention mask made
0/1 (the bare model treats any non-zero as "attend"). `Layout` is the column permutation a strategy applies (pads
moved out from between the prompt and the text) and its inverse for the outputs; `base_labels` places the user's
labels in that sequence so that the base model's own loss (and any fused head a trainer installed) computes exactly
the loss of the user's columns.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..constants import BASE_ADAPTER
from ..slots import SlotPlan

IGNORE_INDEX = -100


@dataclass
class PromptBatch:
    """`names`: the distinct prompts of the batch (None: no prompt); `rows[b]`: the index in `names` of row b's."""

    names: list[str | None]
    rows: torch.Tensor
    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    mask: torch.Tensor
    labels: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    plan: SlotPlan | None = None  # where the virtual tokens of prompts with slots go (slots.plan)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def has_pads(self) -> bool:
        return not bool(self.mask.all())

    @property
    def has_left_padding(self) -> bool:
        """Some row has a pad before one of its real tokens."""
        return bool((self.mask[:, :-1] < self.mask[:, 1:]).any())

    @property
    def prompted(self) -> bool:
        return any(name is not None for name in self.names)


def safe_token_id(config: Any) -> int:
    """An id every embedding table has: stands in for virtual tokens and slot placeholders, never read."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    return 0


def _check_2d(name: str, tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if tensor.shape == (1, shape[1]) and shape[0] > 1 and name == "position_ids":
        return tensor.expand(shape)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {shape} (batch, length) like the input.")
    return tensor


def _reference(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("Pass input_ids or inputs_embeds, not both.")
    if input_ids is None and inputs_embeds is None:
        raise ValueError("Pass input_ids or inputs_embeds.")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a 2-D tensor [batch, length], got {shape}; e.g. input_ids[None].")
        return input_ids
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be 3-D [batch, length, hidden], got shape {tuple(inputs_embeds.shape)}.")
    return inputs_embeds


def route_rows(adapter_names: Sequence[str] | None, batch: int, active: str, loaded: Sequence[str]) -> tuple:
    """(distinct prompts of the batch, [B] index of each row's prompt)."""
    if adapter_names is None:
        return [active], torch.zeros(batch, dtype=torch.long)
    if isinstance(adapter_names, str) or len(adapter_names) != batch:
        raise ValueError(f"adapter_names must be a list with one name per row ({batch} rows), got {adapter_names!r}.")
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in loaded})
    if unknown:
        raise ValueError(
            f"Unknown adapter name(s) {unknown} in adapter_names; loaded: {sorted(loaded)} "
            f"(or {BASE_ADAPTER!r} for no prompt)."
        )
    distinct = list(dict.fromkeys(adapter_names))
    rows = torch.tensor([distinct.index(n) for n in adapter_names], dtype=torch.long)
    return [None if n == BASE_ADAPTER else n for n in distinct], rows


def make_batch(
    *,
    active: str,
    loaded: Sequence[str],
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    adapter_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> PromptBatch:
    """Validate a forward's / generate's inputs and route each row to its prompt."""
    reference = _reference(input_ids, inputs_embeds)
    batch, length = reference.shape[:2]
    if batch == 0 or length == 0:
        raise ValueError(f"The input has shape {tuple(reference.shape)}: it needs at least one row and one token.")
    shape = (batch, length)
    if attention_mask is None:
        mask = torch.ones(shape, dtype=torch.long, device=reference.device)
    else:
        mask = (_check_2d("attention_mask", attention_mask, shape) != 0).long()
    if position_ids is not None:
        position_ids = _check_2d("position_ids", position_ids, shape)
    if token_type_ids is not None:
        token_type_ids = _check_2d("token_type_ids", token_type_ids, shape)
    names, rows = route_rows(adapter_names, batch, active, loaded)
    return PromptBatch(
        names, rows.to(reference.device), input_ids, inputs_embeds, mask, labels, position_ids, token_type_ids, kwargs
    )


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """The base model's sequence is `order`-permuted [prompt slots | user columns]: `width` slots, `total` columns
    in all (`order` None: as is)."""

    width: int
    total: int
    order: torch.Tensor | None = None

    @staticmethod
    def pads_first(slots: torch.Tensor, mask: torch.Tensor) -> Layout:
        """Every pad (prompt slots of shorter prompts too) before the prompt: [pads][prompt][text]. Positions are
        explicit, so this only keeps pads out of sliding windows and puts a real token last."""
        full = torch.cat([slots, mask], dim=1)
        order = None if bool(full.all()) else torch.argsort(full, dim=1, stable=True)
        return Layout(slots.shape[1], full.shape[1], order)

    @staticmethod
    def pads_last(slots: torch.Tensor, mask: torch.Tensor) -> Layout:
        """Every real position first (the prompt, then the text), pads after them: [prompt][text][pads]. For models
        that count columns (relative biases, windows, positions from the length) and for a prompt in the cache
        (zero slots)."""
        full = torch.cat([slots, mask], dim=1)
        gaps = bool((full[:, :-1] < full[:, 1:]).any())
        order = torch.argsort(1 - full, dim=1, stable=True) if gaps else None
        return Layout(slots.shape[1], full.shape[1], order)

    @staticmethod
    def identity(slots_width: int, length: int) -> Layout:
        return Layout(slots_width, slots_width + length)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """[B, total, ...] in user order -> the base model's order."""
        return tensor if self.order is None else _take(tensor, self.order)

    def restore(self, tensor: torch.Tensor) -> torch.Tensor:
        """A token-level output [B, total, ...] in the base model's order -> [B, L, ...] in the user's."""
        if self.order is not None:
            tensor = _take(tensor, torch.argsort(self.order, dim=1))
        return tensor[:, self.width :].contiguous() if self.width else tensor

    def restore_output(self, value: Any) -> Any:
        """`restore` for a tensor or tuple of tensors whose dimension 1 is the sequence (anything else as is)."""
        if isinstance(value, tuple):
            return tuple(self.restore_output(v) for v in value)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == self.total:
            return self.restore(value)
        return value

    def restore_shifted(self, value: Any) -> Any:
        """`restore` for a per-token output of the next-token pairs, [B, total - 1, ...] (entry j: position j
        predicting j + 1, as fused heads return them): -> [B, L - 1, ...], entry t for the user's column t."""
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != self.total - 1:
            return value
        padded = torch.cat([value, value.new_zeros(value.shape[0], 1, *value.shape[2:])], dim=1)
        return self.restore(padded)[:, :-1]


@dataclass(frozen=True)
class Remainder:
    """What the base model runs on when part of each row is in the cache: row b's real tokens from column
    `prefix_end[b]` on (all of them for rows without a cached prefix), in order, then padding (`pads_first`: padding
    first, for generation). `order[b, r]` is the user column at position r, `mask` marks real tokens."""

    order: torch.Tensor
    mask: torch.Tensor

    @staticmethod
    def of(mask: torch.Tensor, prefix_end: torch.Tensor, pads_first: bool) -> Remainder:
        columns = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        keep = mask.bool() & (columns >= prefix_end.to(mask.device).unsqueeze(1))
        width = max(1, int(keep.sum(1).max()))
        key = keep.long() if pads_first else (~keep).long()
        order = torch.argsort(key, dim=1, stable=True)
        order = order[:, -width:] if pads_first else order[:, :width]
        return Remainder(order, keep.gather(1, order).long())

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return _take(tensor, self.order)

    def put(self, values: torch.Tensor, length: int) -> torch.Tensor:
        """Scatter [B, R, ...] back to the user's [B, length, ...] columns (zeros where nothing ran)."""
        out = values.new_zeros(values.shape[0], length, *values.shape[2:])
        keep = self.mask.bool().view(*self.mask.shape, *([1] * (values.dim() - 2)))
        index = self.order.view(*self.order.shape, *([1] * (values.dim() - 2))).expand_as(values)
        return out.scatter_add(1, index.to(values.device), values * keep.to(values.device))


def _take(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    index = order.view(*order.shape, *([1] * (tensor.dim() - 2))).expand(*order.shape, *tensor.shape[2:])
    return tensor.gather(1, index.to(tensor.device))


# --------------------------------------------------------------------------- labels


class LabelLayout(enum.Enum):
    """What a task's labels index: the next token (causal LM), each token, or the whole sequence."""

    NEXT_TOKEN = "next_token"
    PER_TOKEN = "per_token"
    PER_SEQUENCE = "per_sequence"


def _next_token_labels(labels: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Base labels whose shifted pairs (position j predicts label j + 1) are exactly the user's pairs (column t - 1
    predicts label t), whatever the permutation: targets are attached to their source column, then shifted back."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    full = torch.cat([targets.new_full((labels.shape[0], layout.width), IGNORE_INDEX), targets], dim=1)
    full = layout.apply(full)
    shifted = torch.full_like(full, IGNORE_INDEX)
    shifted[:, 1:] = full[:, :-1]
    return shifted


def _per_token_labels(labels: torch.Tensor, layout: Layout) -> torch.Tensor:
    full = torch.cat([labels.new_full((labels.shape[0], layout.width), IGNORE_INDEX), labels], dim=1)
    return layout.apply(full)


def _per_sequence_labels(labels: torch.Tensor, layout: Layout) -> torch.Tensor:
    return labels


_PLACE: dict[LabelLayout, Callable[[torch.Tensor, Layout], torch.Tensor]] = {
    LabelLayout.NEXT_TOKEN: _next_token_labels,
    LabelLayout.PER_TOKEN: _per_token_labels,
    LabelLayout.PER_SEQUENCE: _per_sequence_labels,
}


def base_labels(labels: torch.Tensor | None, kind: LabelLayout, layout: Layout, shape: torch.Size) -> Any:
    """The labels to hand the base model for the permuted, prompted sequence (prompt positions ignored)."""
    if labels is None:
        return None
    if kind is not LabelLayout.PER_SEQUENCE and tuple(labels.shape[:2]) != tuple(shape):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}; expected {tuple(shape)} (batch, length) like the input."
        )
    if kind is LabelLayout.PER_SEQUENCE and labels.shape[0] != shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} rows; the input has {shape[0]}.")
    return _PLACE[kind](labels, layout)
