"""The trainable prompt: an encoder PEFT can save and load, with an optional residual reparameterisation."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BasePromptEncoder
from torch import nn

from .constants import PROMPT_KEY, RAW_PROMPT_KEY, RESIDUAL_PREFIX, prompt_parameter_key
from .distributed import local_weight


class ResidualMLP(nn.Module):
    """Shared bottleneck MLP of residual prompt tuning, LN(up(relu(down(P)))), behind a learned gate that starts
    at zero: the prompt starts exactly at its initialisation and the residual grows smoothly. (Zeroing the
    up-projection instead would put LayerNorm at a zero input, whose 1/sqrt(eps) gradient makes the first step
    swamp the prompt.)"""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate * self.norm(self.up(torch.relu(self.down(x))))


class SoftPromptEncoder(BasePromptEncoder):
    """Holds one adapter's prompt. `embedding` is a leaf module with a `.weight`, so FSDP auto-wrap
    policies give it its own unit and PEFT's helpers that read `prompt_encoder[name].embedding.weight` work."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, residual_hidden_size: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        self.residual = ResidualMLP(token_dim, residual_hidden_size) if residual_hidden_size else None

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    @property
    def token_dim(self) -> int:
        return self.embedding.embedding_dim

    def forward(self) -> torch.Tensor:
        """The effective prompt, [num_virtual_tokens, token_dim]. Calls the embedding module (not `.weight`) so that
        FSDP / ZeRO-3 pre-forward hooks gather it and post-backward hooks reduce its gradient."""
        positions = torch.arange(self.num_virtual_tokens, device=self.embedding.weight.device)
        raw = self.embedding(positions)
        return raw if self.residual is None else raw + self.residual(raw)

    def fold(self) -> None:
        """Replace a residual prompt by the plain prompt it computes (for inference)."""
        if self.residual is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(self())
            self.residual = None

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the effective prompt, plus the raw parameters of a residual prompt."""
        with torch.no_grad():
            if self.residual is None:  # read, don't forward: no collective on a rank that saves alone
                return {PROMPT_KEY: local_weight(self.embedding).clone()}
            state = {PROMPT_KEY: self().detach(), RAW_PROMPT_KEY: self.embedding.weight.detach()}
            state.update({RESIDUAL_PREFIX + k: v.detach() for k, v in self.residual.state_dict().items()})
        return state

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Read the parameters; never run a forward (a forward under ZeRO-3 hangs when only rank 0 saves).
        A gathered `state_dict` handed in by accelerate/Trainer is preferred over the (maybe sharded) module."""
        encoder = model.prompt_encoder[adapter_name]
        key = prompt_parameter_key(adapter_name)
        if encoder.residual is None and key in state_dict and state_dict[key].numel() > 0:
            return {PROMPT_KEY: state_dict[key]}
        return encoder.adapter_state_dict()

    def _load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if PROMPT_KEY not in state_dict:
            raise ValueError(f"Adapter weights have no '{PROMPT_KEY}' tensor; keys: {sorted(state_dict)}.")
        prompt = state_dict[PROMPT_KEY]
        expected = (self.num_virtual_tokens, self.token_dim)
        if tuple(prompt.shape) != expected:
            raise ValueError(
                f"Saved prompt has shape {tuple(prompt.shape)} (num_virtual_tokens, hidden size) but this model "
                f"expects {expected}: the adapter was saved for a different model or config."
            )
        with torch.no_grad():
            if self.residual is not None and RAW_PROMPT_KEY in state_dict:
                self.embedding.weight.copy_(state_dict[RAW_PROMPT_KEY])
                mlp_state = {
                    k.removeprefix(RESIDUAL_PREFIX): v
                    for k, v in state_dict.items()
                    if k.startswith(RESIDUAL_PREFIX) and k != RAW_PROMPT_KEY
                }
                self.residual.load_state_dict(mlp_state, strict=True)
            else:
                self.residual = None
                self.embedding.weight.copy_(prompt)
