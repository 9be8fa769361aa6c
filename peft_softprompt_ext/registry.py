"""The one place that touches PEFT internals: the peft type, the mappings and the dispatch.

PEFT has no public way to add a prompt-learning method from outside its tree, so this module:
  1. adds ``SOFT_PROMPT`` to ``peft.PeftType`` and registers it with ``peft.register_peft_method``;
  2. gives ``PeftModel`` a ``__new__`` that builds our subclass of the requested task class
     (``PeftModelForCausalLM`` -> ``SoftPromptModelForCausalLM``...) when the config is a ``SoftPromptConfig``,
     so ``get_peft_model``, ``PeftModel.from_pretrained`` and the ``AutoPeftModel*`` classes all return ours;
  3. lets ``PeftModel.from_pretrained(..., is_trainable=True)`` load a soft prompt for further training (PEFT
     refuses every prompt-learning adapter there).
Everything else PEFT does (LoRA & co.) is left exactly as it was.
"""

from __future__ import annotations

import enum
import functools
import logging
from typing import Any

import peft
from packaging import version

logger = logging.getLogger(__name__)

TESTED_PEFT = ("0.21.0", "0.22.0")  # [min, max) of the versions this module was written against
_REQUIRED_INTERNALS = (
    "peft.utils.peft_types.PeftType",
    "peft.utils.peft_types.register_peft_method",
    "peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING",
    "peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING",
    "peft.tuners.tuners_utils.BasePromptEncoder",
    "peft.peft_model.PeftModel.from_pretrained",
    "peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
)
_state: dict[str, Any] = {}


class PeftIncompatibleError(RuntimeError):
    """PEFT changed in a way this plugin cannot work with."""


def _resolve(dotted: str) -> Any:
    import importlib

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
    installed = version.parse(peft.__version__)
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
    if not version.parse(TESTED_PEFT[0]) <= installed < version.parse(TESTED_PEFT[1]):
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


def soft_prompt_peft_type() -> enum.Enum:
    from peft.utils.peft_types import PeftType

    from .config import PEFT_TYPE_NAME

    return _add_enum_member(PeftType, PEFT_TYPE_NAME)


def _soft_prompt_class_for(task_cls: type) -> type:
    from . import model as sp

    for peft_cls, ours in sp.TASK_CLASSES.items():
        if task_cls is peft_cls:
            return ours
    raise TypeError(f"SoftPromptConfig can't build a {task_cls.__name__}; supported: {list(sp.TASK_CLASSES)}.")


def _dispatching_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    """`PeftModel.__new__`: build our subclass when handed a SoftPromptConfig, the requested class otherwise."""
    from .config import SoftPromptConfig
    from .model import SoftPromptModel

    config = args[1] if len(args) > 1 else kwargs.get("peft_config")
    if isinstance(config, SoftPromptConfig) and not issubclass(cls, SoftPromptModel):
        cls = _soft_prompt_class_for(cls)
    return object.__new__(cls)


def _is_soft_prompt_dir(model_id: Any, config: Any, kwargs: dict) -> bool:
    from peft import PeftConfig

    from .config import PEFT_TYPE_NAME, SoftPromptConfig

    if config is not None:
        return isinstance(config, SoftPromptConfig)
    try:
        peft_type = PeftConfig._get_peft_type(model_id, subfolder=kwargs.get("subfolder"))
    except (ValueError, OSError):
        return False
    return peft_type == PEFT_TYPE_NAME


def _wrap_from_pretrained(original: Any) -> Any:
    @functools.wraps(original)
    def from_pretrained(cls, model, model_id, adapter_name="default", is_trainable=False, config=None, **kwargs):
        if is_trainable and _is_soft_prompt_dir(model_id, config, kwargs):
            from .model import resuming_training

            with resuming_training():
                return original(cls, model, model_id, adapter_name, is_trainable=False, config=config, **kwargs)
        return original(cls, model, model_id, adapter_name, is_trainable=is_trainable, config=config, **kwargs)

    return classmethod(from_pretrained)


def register() -> None:
    """Idempotently register the SOFT_PROMPT type with PEFT (run on `import peft_softprompt_ext`)."""
    if _state.get("registered"):
        return
    check_peft_version()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.peft_model import PeftModel
    from peft.utils.peft_types import register_peft_method

    from .config import SoftPromptConfig
    from .prompt import SoftPromptEncoder

    peft_type = soft_prompt_peft_type()
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=peft_type.value.lower(), config_cls=SoftPromptConfig, model_cls=SoftPromptEncoder)
    if "__new__" in PeftModel.__dict__:
        raise PeftIncompatibleError("PeftModel now defines __new__ itself; the soft-prompt dispatch would replace it.")
    PeftModel.__new__ = _dispatching_new
    PeftModel.from_pretrained = _wrap_from_pretrained(PeftModel.from_pretrained.__func__)
    _state["registered"] = True
    logger.debug("Registered peft type %s", peft_type.value)
