"""Slots: soft tokens inside the input (a chat template's system turn, between the question and the answer) instead
of in front of everything.

Like the ``<image>`` tokens of multimodal models, a slot is a placeholder token added to the tokenizer. With
``SoftPromptConfig(slots=[k0, k1, ...])`` slot i holds k_i virtual tokens and is written in the text as k_i copies
of its placeholder (`slot_text`), so the input keeps one position per virtual token and every output has the
input's length. The forward splices the virtual token embeddings in at those positions; the placeholder ids are
never embedded (they need no row in the embedding table). Why placeholders rather than a template string in the
config: they go wherever text goes (chat messages, templates, datasets), the tokenizer handles them like any
special token, and each row of a mixed batch carries its own.

    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, slots=[20])
    model = get_peft_model(base, config)
    slots.add_slot_tokens(tokenizer, model)        # adds <|soft_prompt_0|>, records its id in the adapter config
    messages = [{"role": "system", "content": slots.slot_text(model)}, {"role": "user", "content": question}]

When everything from a row's first token through its last slot is the same for every row of an adapter (a fixed
system prompt around the soft tokens), inference compiles that whole prefix into the prompt cache (`SlotPlan`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import SoftPromptConfig


class SlotError(ValueError):
    """A slot placeholder where it can't go, or missing where it must be; the message names the slot and row."""


def _config(target: Any, adapter_name: str | None) -> SoftPromptConfig:
    if isinstance(target, SoftPromptConfig):
        return target
    name = adapter_name or target.active_adapter
    if name not in target.peft_config:
        raise ValueError(f"No adapter {name!r}; loaded: {sorted(target.peft_config)}.")
    return target.peft_config[name]


def _slotted(config: SoftPromptConfig, name: str) -> SoftPromptConfig:
    if not config.slots:
        raise SlotError(f"Adapter {name!r} has no slots: its prompt goes before the input (SoftPromptConfig.slots).")
    return config


def add_slot_tokens(tokenizer: Any, target: Any, adapter_name: str | None = None) -> list[int]:
    """Add the adapter's placeholder tokens to `tokenizer` (special tokens, never split) and return their ids.

    A new adapter records the ids in its config (they are saved with it). A loaded one checks that this tokenizer
    gives the placeholders the ids it was saved with, so a reloaded adapter reads the same positions."""
    name = adapter_name or getattr(target, "active_adapter", "config")
    config = _slotted(_config(target, adapter_name), name)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(config.slot_tokens)}, replace_extra_special_tokens=False
    )
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(config.slot_tokens))]
    if config.slot_token_ids is None:
        config.slot_token_ids = ids
    elif ids != list(config.slot_token_ids):
        raise SlotError(
            f"This tokenizer gives the slot tokens {config.slot_tokens} the ids {ids}, but adapter {name!r} was saved "
            f"with {config.slot_token_ids}: use the tokenizer saved with the adapter, or one with the same added "
            "tokens in the same order."
        )
    return ids


def slot_text(target: Any, slot: int | None = None, adapter_name: str | None = None) -> str:
    """The text that stands for slot `slot` (all slots in order when None): its placeholder once per virtual token."""
    name = adapter_name or getattr(target, "active_adapter", "config")
    config = _slotted(_config(target, adapter_name), name)
    chosen = range(len(config.slots)) if slot is None else [slot]
    return "".join(config.slot_tokens[s] * config.slots[s] for s in chosen)


@dataclass(frozen=True)
class SlotPlan:
    """Where a batch's virtual tokens go: virtual token `index[n]` of row `rows[n]`'s prompt at column `cols[n]`.
    `prefix_end[b]`: the column after row b's last slot (0 for rows without slots); `start[b]`: its first real
    column; `slotted[b]`: whether row b's adapter has slots."""

    rows: torch.Tensor
    cols: torch.Tensor
    index: torch.Tensor
    slotted: torch.Tensor
    prefix_end: torch.Tensor
    start: torch.Tensor
    placeholder_ids: torch.Tensor  # every slot id of every loaded adapter (never embedded)

    def for_row(self, b: int, keep: torch.Tensor) -> SlotPlan:
        """The plan of row b alone, with only the columns `keep` (its real tokens)."""
        new_col = keep.long().cumsum(0) - 1
        chosen = self.rows == b
        rows = torch.zeros(int(chosen.sum()), dtype=torch.long, device=self.rows.device)
        end = int(new_col[self.prefix_end[b] - 1]) + 1 if int(self.prefix_end[b]) else 0
        return SlotPlan(
            rows,
            new_col[self.cols[chosen]],
            self.index[chosen],
            self.slotted[b : b + 1],
            self.prefix_end.new_tensor([end]),
            self.start.new_zeros(1),
            self.placeholder_ids,
        )

    def clean_ids(self, input_ids: torch.Tensor, safe_id: int) -> torch.Tensor:
        """`input_ids` with every placeholder replaced by an id the embedding table has."""
        return input_ids.masked_fill(torch.isin(input_ids, self.placeholder_ids.to(input_ids.device)), safe_id)

    def splice(
        self, embeds: torch.Tensor, prompts: Mapping[int, torch.Tensor], row_prompt: torch.Tensor
    ) -> torch.Tensor:
        """`embeds` with each row's virtual tokens put at its slot positions (out of place: gradients reach the
        prompts). `prompts[u]` is prompt u's [P, d] tensor, `row_prompt[b]` the prompt of row b."""
        values = embeds.new_empty(len(self.rows), embeds.shape[-1])
        owners = row_prompt.to(self.rows.device)[self.rows]
        for u, prompt in prompts.items():
            chosen = owners == u
            if bool(chosen.any()):
                values = values.index_put((chosen.nonzero()[:, 0],), prompt.to(embeds.dtype)[self.index[chosen]])
        return embeds.index_put((self.rows, self.cols), values)

    def fixed_prefixes(self, input_ids: torch.Tensor, mask: torch.Tensor, row_prompt: torch.Tensor) -> dict | None:
        """Per slotted prompt u, the ids from its rows' first real token through their last slot when they are the
        same for all its rows and hold no padding; None when any prompt's rows differ there."""
        prefixes: dict[int, torch.Tensor] = {}
        for b in self.slotted.nonzero()[:, 0].tolist():
            start, end = int(self.start[b]), int(self.prefix_end[b])
            if not bool(mask[b, start:end].all()):
                return None
            ids = input_ids[b, start:end]
            u = int(row_prompt[b])
            if u in prefixes and not torch.equal(prefixes[u], ids):
                return None
            prefixes.setdefault(u, ids)
        return prefixes


def _token(configs: Mapping[str, Any], token_id: int) -> tuple[str, str]:
    for name, config in configs.items():
        if getattr(config, "slot_token_ids", None) and token_id in config.slot_token_ids:
            return name, config.slot_tokens[config.slot_token_ids.index(token_id)]
    return "?", str(token_id)


def _check_row(b: int, name: str | None, config: Any, row: torch.Tensor, mask: torch.Tensor, configs: Mapping) -> list:
    """(column, virtual index) of row b's slots, validated; the errors name the slot and the row."""
    found = []
    own = set(config.slot_token_ids) if config is not None and config.slots else set()
    label = "no prompt" if name is None else f"adapter {name!r}"
    for col in torch.isin(row, torch.tensor(sorted(_all_ids(configs)), device=row.device)).nonzero()[:, 0].tolist():
        token_id = int(row[col])
        if token_id not in own:
            owner, token = _token(configs, token_id)
            why = "has no slots" if not own else f"uses {config.slot_tokens}"
            raise SlotError(
                f"Row {b} ({label}) holds slot token {token!r} of adapter {owner!r} at column {col}, but "
                f"its own {'prompt' if name else 'row'} {why}."
            )
    if not own:
        return found
    offset = 0
    for s, (token_id, size) in enumerate(zip(config.slot_token_ids, config.slots, strict=True)):
        cols = (row == token_id).nonzero()[:, 0]
        token = config.slot_tokens[s]
        if len(cols) != size:
            raise SlotError(
                f"Row {b} ({label}) has {len(cols)} {token!r} tokens, but slot {s} holds {size} virtual tokens: put "
                f"slots.slot_text(model, {s}) in its text (with a tokenizer that knows the token: "
                "slots.add_slot_tokens)."
            )
        if not bool(mask[cols].all()):
            raise SlotError(f"Slot {s} ({token!r}) of row {b} ({label}) falls inside the padding (attention_mask 0).")
        found += [(int(c), offset + i) for i, c in enumerate(cols.tolist())]
        offset += size
    return found


def _all_ids(configs: Mapping[str, Any]) -> set[int]:
    return {i for c in configs.values() for i in (getattr(c, "slot_token_ids", None) or ())}


def plan(
    input_ids: torch.Tensor | None,
    mask: torch.Tensor,
    row_names: list[str | None],
    configs: Mapping[str, Any],
) -> SlotPlan | None:
    """Locate and check the slots of a batch (`row_names[b]`: row b's adapter, None for no prompt). None when no
    loaded adapter has slots and no row holds a placeholder."""
    slotted_names = {n for n in row_names if n is not None and configs[n].slots}
    for name in sorted(slotted_names):
        if configs[name].slot_token_ids is None:
            raise SlotError(
                f"Adapter {name!r} has slots but no placeholder ids: call slots.add_slot_tokens(tokenizer, model, "
                f"{name!r}) with the tokenizer that makes the inputs."
            )
    known = _all_ids(configs)
    if not known:
        return None
    if input_ids is None:
        if slotted_names:
            raise SlotError(
                f"Adapters {sorted(slotted_names)} have slots: pass input_ids (the placeholders mark them)."
            )
        return None
    if not slotted_names and not bool(
        torch.isin(input_ids, torch.tensor(sorted(known), device=input_ids.device)).any()
    ):
        return None
    rows, cols, index = [], [], []
    for b, name in enumerate(row_names):
        config = configs.get(name) if name is not None else None
        for col, virtual in _check_row(b, name, config, input_ids[b], mask[b], configs):
            rows.append(b)
            cols.append(col)
            index.append(virtual)
    device = input_ids.device
    rows_t, cols_t = (
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(cols, dtype=torch.long, device=device),
    )
    slotted = torch.tensor([n in slotted_names for n in row_names], device=device)
    prefix_end = torch.zeros(len(row_names), dtype=torch.long, device=device)
    if len(rows):
        prefix_end = prefix_end.scatter_reduce(0, rows_t, cols_t + 1, reduce="amax")
    start = torch.where(mask.any(1), mask.long().argmax(1), torch.zeros_like(prefix_end))
    return SlotPlan(
        rows_t,
        cols_t,
        torch.tensor(index, dtype=torch.long, device=device),
        slotted,
        prefix_end,
        start,
        torch.tensor(sorted(known), dtype=torch.long),
    )
