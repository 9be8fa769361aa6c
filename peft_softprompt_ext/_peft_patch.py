"""The one module that patches PEFT: the peft type, the mappings and the dispatch to our classes.

PEFT has no public way to add a prompt-learning method from outside its tree, so this module:
  1. adds ``SOFT_PROMPT`` to ``peft.PeftType`` and registers it with ``peft.register_peft_method``;
  2. gives ``PeftModel`` a ``__new__`` that builds our subclass of the requested task class
     (``PeftModelForCausalLM`` -> ``SoftPromptModelForCausalLM``...) when the config is ours, so ``get_peft_model``,
     ``PeftModel.from_pretrained`` and the ``AutoPeftModel*`` classes all return ours;
  3. routes ``PeftModel.from_pretrained`` of a soft-prompt adapter through our loader (safetensors only, read under
     the directory's lock, and ``is_trainable=True`` allowed: PEFT refuses it for every prompt-learning adapter).
  4. adds our class names to the PEFT classes transformers' pipelines accept (they check by name).
Everything else PEFT does (LoRA & co.) is left exactly as it was. The tuner subclasses PeftModel and overrides the
private hooks listed in `_REQUIRED_INTERNALS`; the version check below covers those too.

Nothing here imports the rest of the package: `install` receives the classes and the loader it wires in.
"""

from __future__ import annotations

import enum
import functools
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import peft
from packaging import version
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.peft_model import PeftModel
from peft.utils.peft_types import PeftType, register_peft_method
from transformers.pipelines.base import SUPPORTED_PEFT_TASKS

from .constants import PEFT_TYPE_NAME, TESTED_PEFT

logger = logging.getLogger(__name__)

_REQUIRED_INTERNALS = (
    "peft.utils.peft_types.PeftType",
    "peft.utils.peft_types.register_peft_method",
    "peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING",
    "peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING",
    "peft.tuners.tuners_utils.BasePromptEncoder",
    "peft.peft_model.PeftModel.from_pretrained",
    "peft.peft_model.PeftModel._setup_prompt_encoder",
    "peft.peft_model.PeftModel._check_new_adapter_config",
    "peft.peft_model.PeftModel.create_or_update_model_card",
    "peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "transformers.pipelines.base.SUPPORTED_PEFT_TASKS",
)


class PeftIncompatibleError(RuntimeError):
    """PEFT changed in a way this plugin cannot work with."""


@dataclass(frozen=True)
class Wiring:
    """What `install` hooks into PEFT: our config class, the prompt encoder PEFT registers as the method's "model",
    our class for each PEFT task class, and the loader that replaces PEFT's for our adapters."""

    config_cls: type
    encoder_cls: type
    task_classes: Mapping[type, type]
    is_ours: Callable[[Any, Any, dict], bool]  # (model_id, config, kwargs) -> whether it is a soft-prompt adapter
    from_pretrained: Callable[..., Any]  # (original, cls, model, model_id, adapter_name, is_trainable, config, kw)


_wiring: list[Wiring] = []


def _resolve(dotted: str) -> Any:
    module_name, _, rest = dotted.partition(".")
    obj = importlib.import_module(module_name)
    for part in rest.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
    return obj


def check_peft_version() -> None:
    """Fail loudly (not silently wrong) when PEFT no longer has what we hook into."""
    missing = []
    for dotted in _REQUIRED_INTERNALS:
        try:
            _resolve(dotted)
        except (ImportError, AttributeError):
            missing.append(dotted)
    if missing:
        raise PeftIncompatibleError(
            f"peft_softprompt_ext needs peft internals that peft {peft.__version__} lacks: {missing}. "
            f"It was tested with peft >={TESTED_PEFT[0]},<{TESTED_PEFT[1]}; install that range."
        )
    if not version.parse(TESTED_PEFT[0]) <= version.parse(peft.__version__) < version.parse(TESTED_PEFT[1]):
        logger.warning(
            "peft %s is outside the tested range >=%s,<%s; soft prompts may misbehave.", peft.__version__, *TESTED_PEFT
        )


def _add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add a member to a `str` Enum in place (Enum has no public API for this)."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


def peft_type() -> enum.Enum:
    """``peft.PeftType.SOFT_PROMPT``, created on first use."""
    return _add_enum_member(PeftType, PEFT_TYPE_NAME)


def _dispatching_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    """`PeftModel.__new__`: build our subclass when handed our config, the requested class otherwise."""
    wiring = _wiring[0]
    config = args[1] if len(args) > 1 else kwargs.get("peft_config")
    ours = set(wiring.task_classes.values())
    if isinstance(config, wiring.config_cls) and cls not in ours and not any(issubclass(cls, c) for c in ours):
        if cls not in wiring.task_classes:
            raise TypeError(
                f"SoftPromptConfig can't build a {cls.__name__}; supported: "
                f"{[c.__name__ for c in wiring.task_classes]}."
            )
        cls = wiring.task_classes[cls]
    return object.__new__(cls)


def _wrap_from_pretrained(original: Callable[..., Any]) -> classmethod:
    @functools.wraps(original)
    def from_pretrained(cls, model, model_id, adapter_name="default", is_trainable=False, config=None, **kwargs):
        wiring = _wiring[0]
        if not wiring.is_ours(model_id, config, kwargs):
            return original(cls, model, model_id, adapter_name, is_trainable=is_trainable, config=config, **kwargs)
        return wiring.from_pretrained(original, cls, model, model_id, adapter_name, is_trainable, config, kwargs)

    return classmethod(from_pretrained)


def install(wiring: Wiring) -> None:
    """Idempotently register the SOFT_PROMPT type with PEFT (run on `import peft_softprompt_ext`)."""
    if _wiring:
        return
    check_peft_version()
    member = peft_type()
    if member not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=member.value.lower(), config_cls=wiring.config_cls, model_cls=wiring.encoder_cls)
    if "__new__" in PeftModel.__dict__:
        raise PeftIncompatibleError("PeftModel now defines __new__ itself; the soft-prompt dispatch would replace it.")
    _wiring.append(wiring)
    for names in SUPPORTED_PEFT_TASKS.values():
        names += [ours.__name__ for peft_cls, ours in wiring.task_classes.items() if peft_cls.__name__ in names]
    PeftModel.__new__ = _dispatching_new
    PeftModel.from_pretrained = _wrap_from_pretrained(PeftModel.from_pretrained.__func__)
    logger.debug("Registered peft type %s", member.value)
