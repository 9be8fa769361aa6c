"""`SoftPromptConfig`: what a soft prompt is made of, validated field by field when built and when loaded."""

from __future__ import annotations

import copy
import enum
import functools
import logging
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from peft import PromptLearningConfig

from . import _peft_patch
from .constants import MAX_VIRTUAL_TOKENS
from .initializers import INIT_FIELDS, INITIALIZERS

logger = logging.getLogger(__name__)

REPARAMETERIZATIONS = (None, "residual")
SLOT_TOKEN = "<|soft_prompt_{index}|>"  # the default placeholder of slot `index`
# Fields that must be positive integers when set (and at most this large).
_POSITIVE = {
    "num_virtual_tokens": MAX_VIRTUAL_TOKENS,
    "token_dim": None,
    "init_vocab_top_k": None,
    "residual_hidden_size": None,
    "vocab_size": None,
    "num_transformer_submodules": None,
}
_UNCHECKED = ("tokenizer",)  # a live tokenizer object: duck-typed, never serialised


class ConfigError(ValueError):
    """A SoftPromptConfig field with a value of the wrong type or out of range."""


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if isinstance(hint, type):
        return hint.__name__
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    """isinstance against a type hint, with bool kept apart from int and plain str accepted for str enums."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is not None:  # list[str], dict[str, Any]: check the container, then the items of a list
        if not isinstance(value, origin):
            return False
        args = typing.get_args(hint)
        return origin is not list or not args or all(_matches(v, args[0]) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint)
    return isinstance(value, hint)


@dataclass
class SoftPromptConfig(PromptLearningConfig):
    """A soft prompt: `num_virtual_tokens` trainable vectors placed before the input.

    `init` names an initialiser of `peft_softprompt_ext.initializers` (a registry; see there to add one):
      - ``"vocab"`` (default): embeddings of ids sampled without replacement from the first `init_vocab_top_k` ids
        (Lester et al. sample the 5,000 most frequent), never special or added tokens.
      - ``"text"``: the embeddings of `init_text` tokenised by `tokenizer` (object) or `tokenizer_name_or_path`;
        repeated when shorter than the prompt, truncated (with a warning) when longer.
      - ``"random"``: Gaussian matched to the embedding table's per-dimension mean and std.
      - ``"pretrained"``: the prompt saved in the adapter directory `init_from` (prompt transfer, SPoT).

    `reparameterization="residual"` trains `P + MLP(P)` with a shared bottleneck MLP of width
    `residual_hidden_size` (Razdaibiedina et al. 2023). `shared_prompt_kv` lets decoder-only models compute the
    prompt's keys/values once per batch instead of once per row.

    `slots=[k1, k2, ...]` puts the virtual tokens inside the input instead of before it: slot i is k_i copies of
    its placeholder token `slot_tokens[i]` (default ``<|soft_prompt_i|>``) wherever the text has them, e.g. in a
    chat template's system turn (see `peft_softprompt_ext.slots`).
    """

    num_virtual_tokens: int = field(default=20, metadata={"help": "Number of virtual tokens."})
    init: str = field(default="vocab", metadata={"help": "An initialiser name (initializers.INITIALIZERS)."})
    init_text: str | None = field(default=None, metadata={"help": "Text whose embeddings start the prompt."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer for text init/decoding."})
    tokenizer_kwargs: dict | None = field(default=None, metadata={"help": "Kwargs for AutoTokenizer."})
    init_vocab_top_k: int | None = field(default=5000, metadata={"help": "Sample vocab init from the first K ids."})
    init_seed: int = field(default=0, metadata={"help": "Seed of vocab/random initialisation."})
    init_from: str | None = field(default=None, metadata={"help": "Adapter dir whose prompt starts this one."})
    reparameterization: str | None = field(default=None, metadata={"help": "None or 'residual'."})
    residual_hidden_size: int = field(default=128, metadata={"help": "Bottleneck width of the residual MLP."})
    shared_prompt_kv: bool = field(default=True, metadata={"help": "Compute the prompt's KV once per batch."})
    vocab_size: int | None = field(default=None, metadata={"help": "Filled in: the base model's vocabulary."})
    slots: list[int] | None = field(
        default=None, metadata={"help": "Virtual tokens per slot (placeholders in the input); None: before the input."}
    )
    slot_tokens: list[str] | None = field(default=None, metadata={"help": "The placeholder token of each slot."})
    slot_token_ids: list[int] | None = field(
        default=None, metadata={"help": "Filled in by slots.add_slot_tokens: the placeholders' tokenizer ids."}
    )
    # A tokenizer object for text init; never serialised (its name_or_path is).
    tokenizer: Any = field(default=None, repr=False, compare=False, metadata={"help": "Tokenizer object."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = _peft_patch.peft_type()
        self._strip_remote_code()
        if isinstance(self.slots, list) and self.slot_tokens is None:
            self.slot_tokens = [SLOT_TOKEN.format(index=i) for i in range(len(self.slots))]
        self.validate()

    def _strip_remote_code(self) -> None:
        """A saved config must never make us execute code from the hub."""
        if isinstance(self.tokenizer_kwargs, dict) and self.tokenizer_kwargs.pop("trust_remote_code", None) is not None:
            logger.warning("Ignoring tokenizer_kwargs['trust_remote_code'] in SoftPromptConfig.")

    @staticmethod
    @functools.cache
    def _hints() -> dict[str, Any]:
        return typing.get_type_hints(SoftPromptConfig)

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _UNCHECKED or (value is None and f.default is None):
                continue
            hint = self._hints()[f.name]
            if not _matches(value, hint):
                raise ConfigError(
                    f"SoftPromptConfig.{f.name} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})."
                )

    def _check_ranges(self) -> None:
        for name, limit in _POSITIVE.items():
            value = getattr(self, name)
            if value is None and name != "num_virtual_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"SoftPromptConfig.{name} must be a positive integer, got {value!r}.")
            if limit is not None and value > limit:
                raise ConfigError(f"SoftPromptConfig.{name} must be at most {limit}, got {value}.")
        if not 0 <= self.init_seed < 2**63:
            raise ConfigError(f"SoftPromptConfig.init_seed must be in [0, 2**63), got {self.init_seed}.")
        if self.reparameterization not in REPARAMETERIZATIONS:
            raise ConfigError(
                f"SoftPromptConfig.reparameterization must be one of {REPARAMETERIZATIONS}, "
                f"got {self.reparameterization!r}."
            )

    def _check_init(self) -> None:
        if self.init not in INITIALIZERS:
            raise ConfigError(f"SoftPromptConfig.init must be one of {sorted(INITIALIZERS)}, got {self.init!r}.")
        method = INITIALIZERS[self.init]
        for name in INIT_FIELDS:
            if getattr(self, name) is not None and name not in method.accepts:
                users = sorted(n for n, m in INITIALIZERS.items() if name in m.accepts)
                raise ConfigError(
                    f"SoftPromptConfig.{name} is only used by init in {users}, but init={self.init!r}; drop it."
                )
        if self.inference_mode:
            return  # a loaded adapter is not initialised again: its init inputs need not be at hand
        for name in method.requires:
            if not getattr(self, name):
                raise ConfigError(f"SoftPromptConfig.{name} must be set (non-empty) when init={self.init!r}.")
        if method.needs_tokenizer and self.tokenizer is None and not self.tokenizer_name_or_path:
            raise ConfigError(
                f"SoftPromptConfig.init={self.init!r} needs a tokenizer: pass `tokenizer=` (object) or "
                "`tokenizer_name_or_path=`."
            )

    def _check_slots(self) -> None:
        if self.slots is None:
            if self.slot_tokens is not None or self.slot_token_ids is not None:
                raise ConfigError(
                    "SoftPromptConfig.slot_tokens / slot_token_ids need slots=[...] (virtual tokens per slot)."
                )
            return
        if not self.slots or any(k <= 0 for k in self.slots) or sum(self.slots) != self.num_virtual_tokens:
            raise ConfigError(
                f"SoftPromptConfig.slots must be positive sizes summing to num_virtual_tokens="
                f"{self.num_virtual_tokens}, got {self.slots}."
            )
        for name in ("slot_tokens", "slot_token_ids"):
            values = getattr(self, name)
            if values is not None and (len(values) != len(self.slots) or len(set(values)) != len(values)):
                raise ConfigError(
                    f"SoftPromptConfig.{name} must hold {len(self.slots)} distinct entries, got {values}."
                )
        if any(not token.strip() for token in self.slot_tokens):
            raise ConfigError(f"SoftPromptConfig.slot_tokens must be non-empty strings, got {self.slot_tokens}.")

    def validate(self) -> None:
        """Raise a ConfigError (a ValueError) naming the first field of the wrong type or out of range."""
        self._check_types()
        self._check_ranges()
        self._check_init()
        self._check_slots()

    def to_dict(self) -> dict:
        """Like PEFT's, but the tokenizer object is replaced by its name (it can't go into JSON)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "tokenizer"}
        if self.tokenizer is not None and not d.get("tokenizer_name_or_path"):
            d["tokenizer_name_or_path"] = getattr(self.tokenizer, "name_or_path", None) or None
        return d

    @classmethod
    def from_saved(cls, saved: dict[str, Any], **overrides: Any) -> SoftPromptConfig:
        """A config from a saved ``adapter_config.json`` object; keys this version does not know are dropped
        with a warning (an adapter saved by a newer version)."""
        known = {f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
        unknown = sorted(set(saved) - known - {"peft_type"})
        if unknown:
            logger.warning("Ignoring adapter config keys this version does not know: %s", unknown)
        kwargs = {k: v for k, v in saved.items() if k in known}
        return cls(**{**kwargs, **overrides})
