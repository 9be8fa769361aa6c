"""Padding-free packed batches (TRL's default packing): several documents in one row, `position_ids` restarting at
0 for each, no attention mask, flash-attention's `cu_seq_lens_*` alongside.

A soft prompt belongs in front of every document, and no document may see another's tokens, so such a batch is
unpacked into one (right-padded) row per document, run as usual, and its outputs are packed back: per-position
outputs into the packed columns, per-next-token-pair outputs (a fused head's) likewise, one shorter; the loss is the
base model's over the same labelled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .batch import IGNORE_INDEX

PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@dataclass(frozen=True)
class Packing:
    """`docs[i] = (row, start, end)`: document i's columns in the packed batch of shape `shape`."""

    docs: list[tuple[int, int, int]]
    shape: tuple[int, int]

    @staticmethod
    def detect(kwargs: dict[str, Any]) -> Packing | None:
        """The documents of a padding-free packed batch, or None for an ordinary one."""
        positions = kwargs.get("position_ids")
        reference = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if not isinstance(positions, torch.Tensor) or reference is None or positions.dim() != 2:
            return None
        if positions.shape[0] != reference.shape[0] or positions.shape[1] != reference.shape[1]:
            return None
        restarts = positions[:, 1:] == 0
        if not bool(restarts.any()):
            return None
        mask = kwargs.get("attention_mask")
        docs = []
        for row in range(positions.shape[0]):
            length = int(mask[row].sum()) if mask is not None else positions.shape[1]
            starts = [0] + [c + 1 for c in restarts[row, : max(length - 1, 0)].nonzero()[:, 0].tolist()]
            docs += [(row, s, e) for s, e in zip(starts, starts[1:] + [length], strict=True)]
        return Packing(docs, (positions.shape[0], positions.shape[1]))

    def _unpack(self, tensor: torch.Tensor, fill: float | int) -> torch.Tensor:
        width = max(e - s for _, s, e in self.docs)
        out = tensor.new_full((len(self.docs), width, *tensor.shape[2:]), fill)
        for i, (row, s, e) in enumerate(self.docs):
            out[i, : e - s] = tensor[row, s:e]
        return out

    def unpack(self, kwargs: dict[str, Any], pad_id: int) -> dict[str, Any]:
        """The forward's kwargs with one right-padded row per document (positions from the mask, as usual)."""
        kwargs = {k: v for k, v in kwargs.items() if k not in (*PACKING_KWARGS, "position_ids")}
        lengths = torch.tensor([e - s for _, s, e in self.docs])
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        width = int(lengths.max())
        kwargs["attention_mask"] = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long().to(ref.device)
        if kwargs.get("input_ids") is not None:
            kwargs["input_ids"] = self._unpack(kwargs["input_ids"], pad_id)
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = self._unpack(kwargs["inputs_embeds"], 0)
        if isinstance(kwargs.get("labels"), torch.Tensor):
            kwargs["labels"] = self._unpack(kwargs["labels"], IGNORE_INDEX)
        if isinstance(kwargs.get("token_type_ids"), torch.Tensor):
            kwargs["token_type_ids"] = self._unpack(kwargs["token_type_ids"], 0)
        names = kwargs.get("adapter_names")
        if names is not None and not isinstance(names, str):
            kwargs["adapter_names"] = [names[row] for row, _, _ in self.docs]
        return kwargs

    def pack(self, value: torch.Tensor, shifted: bool = False) -> torch.Tensor:
        """Per-document output [D, W, ...] back to the packed [B, L, ...] (shifted: [D, W-1, ...] -> [B, L-1, ...]:
        a document's last token predicts nothing of its own, so that entry is zero, as in the packed labels)."""
        rows, length = self.shape
        out = value.new_zeros(rows, length, *value.shape[2:])
        for i, (row, s, e) in enumerate(self.docs):
            n = e - s - 1 if shifted else e - s
            out[row, s : s + n] = value[i, :n]
        return out[:, :-1] if shifted else out

    def repack(self, outputs: Any, token_keys: tuple[str, ...], shifted_keys: tuple[str, ...]) -> Any:
        for key in token_keys + shifted_keys:
            value = outputs.get(key)
            if isinstance(value, tuple):
                outputs[key] = tuple(self.pack(v, key in shifted_keys) for v in value)
            elif isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == len(self.docs):
                outputs[key] = self.pack(value, key in shifted_keys)
        return outputs
