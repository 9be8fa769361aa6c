"""Soft prompts for Hugging Face PEFT. Importing this package registers the ``SOFT_PROMPT`` adapter type (the
start-up hook installed with the package does it as soon as ``peft`` is imported)."""

from . import _peft_patch
from ._peft_patch import PeftIncompatibleError
from .architecture import UnsupportedModelError
from .config import SoftPromptConfig
from .constants import VERSION
from .prompt import SoftPromptEncoder
from .tuner import (
    TASK_CLASSES,
    ExecutionPath,
    SoftPromptModel,
    SoftPromptModelForCausalLM,
    SoftPromptModelForFeatureExtraction,
    SoftPromptModelForSeq2SeqLM,
    SoftPromptModelForSequenceClassification,
    SoftPromptModelForTokenClassification,
    from_pretrained,
    is_soft_prompt_source,
)

_peft_patch.install(
    _peft_patch.Wiring(
        config_cls=SoftPromptConfig,
        encoder_cls=SoftPromptEncoder,
        task_classes=TASK_CLASSES,
        is_ours=is_soft_prompt_source,
        from_pretrained=from_pretrained,
    )
)

__version__ = VERSION
__all__ = [
    "ExecutionPath",
    "PeftIncompatibleError",
    "SoftPromptConfig",
    "SoftPromptModel",
    "SoftPromptModelForCausalLM",
    "SoftPromptModelForFeatureExtraction",
    "SoftPromptModelForSeq2SeqLM",
    "SoftPromptModelForSequenceClassification",
    "SoftPromptModelForTokenClassification",
    "UnsupportedModelError",
]
