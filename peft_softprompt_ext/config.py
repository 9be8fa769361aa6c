"""`SoftPromptConfig`: what a soft prompt is made of, validated when it is built and when it is loaded."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from peft import PromptLearningConfig

logger = logging.getLogger(__name__)

PEFT_TYPE_NAME = "SOFT_PROMPT"
INIT_METHODS = ("vocab", "text", "random", "pretrained")
REPARAMETERIZATIONS = (None, "residual")


def _require_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"SoftPromptConfig.{name} must be a positive integer, got {value!r}.")


@dataclass
class SoftPromptConfig(PromptLearningConfig):
    """A soft prompt: `num_virtual_tokens` trainable vectors placed before the input.

    Initialisation (`init`):
      - ``"vocab"`` (default): embeddings of ids sampled without replacement from the first
        `init_vocab_top_k` ids (Lester et al. sample the 5,000 most frequent), never special or added tokens.
      - ``"text"``: the embeddings of `init_text` tokenised by `tokenizer` (object) or `tokenizer_name_or_path`;
        repeated when shorter than the prompt, truncated (with a warning) when longer.
      - ``"random"``: Gaussian matched to the embedding table's per-dimension mean and std.
      - ``"pretrained"``: the prompt saved in the adapter directory `init_from` (prompt transfer, SPoT).

    `reparameterization="residual"` trains `P + MLP(P)` with a shared bottleneck MLP of width
    `residual_hidden_size` (Razdaibiedina et al. 2023). `shared_prompt_kv` lets decoder-only models compute the
    prompt's keys/values once per batch instead of once per row.
    """

    init: str = field(default="vocab", metadata={"help": f"One of {INIT_METHODS}."})
    init_text: str | None = field(default=None, metadata={"help": "Text whose embeddings start the prompt."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer for text init."})
    tokenizer_kwargs: dict | None = field(default=None, metadata={"help": "Kwargs for AutoTokenizer."})
    init_vocab_top_k: int | None = field(default=5000, metadata={"help": "Sample vocab init from the first K ids."})
    init_seed: int = field(default=0, metadata={"help": "Seed of vocab/random initialisation."})
    init_from: str | None = field(default=None, metadata={"help": "Adapter dir whose prompt starts this one."})
    reparameterization: str | None = field(default=None, metadata={"help": "None or 'residual'."})
    residual_hidden_size: int = field(default=128, metadata={"help": "Bottleneck width of the residual MLP."})
    shared_prompt_kv: bool = field(default=True, metadata={"help": "Compute the prompt's KV once per batch."})
    vocab_size: int | None = field(default=None, metadata={"help": "Filled in: the base model's vocabulary."})
    # A tokenizer object for text init; never serialised (its name_or_path is).
    tokenizer: Any = field(default=None, repr=False, compare=False, metadata={"help": "Tokenizer object."})

    def __post_init__(self) -> None:
        super().__post_init__()
        from .registry import soft_prompt_peft_type

        self.peft_type = soft_prompt_peft_type()
        self._strip_remote_code()
        self.validate()

    def _strip_remote_code(self) -> None:
        """A saved config must never make us execute code from the hub."""
        if self.tokenizer_kwargs and self.tokenizer_kwargs.pop("trust_remote_code", None) is not None:
            logger.warning("Ignoring tokenizer_kwargs['trust_remote_code'] in SoftPromptConfig.")

    def validate(self) -> None:
        """Raise a ValueError naming the first field that is out of range."""
        _require_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in INIT_METHODS:
            raise ValueError(f"SoftPromptConfig.init must be one of {INIT_METHODS}, got {self.init!r}.")
        _require_positive_int("init_vocab_top_k", self.init_vocab_top_k, allow_none=True)
        if self.reparameterization not in REPARAMETERIZATIONS:
            raise ValueError(
                f"SoftPromptConfig.reparameterization must be one of {REPARAMETERIZATIONS}, "
                f"got {self.reparameterization!r}."
            )
        _require_positive_int("residual_hidden_size", self.residual_hidden_size)
        if self.inference_mode:
            return  # a loaded adapter is not initialised again: its init inputs need not be at hand
        if self.init == "text":
            if not self.init_text:
                raise ValueError("SoftPromptConfig.init_text must be a non-empty string when init='text'.")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError(
                    "SoftPromptConfig.init='text' needs a tokenizer: pass `tokenizer=` (object) or "
                    "`tokenizer_name_or_path=`."
                )
        if self.init == "pretrained" and not self.init_from:
            raise ValueError("SoftPromptConfig.init_from must name an adapter directory when init='pretrained'.")

    def to_dict(self) -> dict:
        """Like PEFT's, but the tokenizer object is replaced by its name (it can't go into JSON)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "tokenizer"}
        if self.tokenizer is not None and not d.get("tokenizer_name_or_path"):
            d["tokenizer_name_or_path"] = getattr(self.tokenizer, "name_or_path", None) or None
        return d
