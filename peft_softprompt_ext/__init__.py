"""Soft prompts for Hugging Face PEFT. Importing this package registers the ``SOFT_PROMPT`` adapter type."""

from .config import SoftPromptConfig
from .model import (
    SoftPromptModel,
    SoftPromptModelForCausalLM,
    SoftPromptModelForFeatureExtraction,
    SoftPromptModelForSeq2SeqLM,
    SoftPromptModelForSequenceClassification,
    SoftPromptModelForTokenClassification,
)
from .registry import PeftIncompatibleError, register

register()

__version__ = "0.1.0"
__all__ = [
    "PeftIncompatibleError",
    "SoftPromptConfig",
    "SoftPromptModel",
    "SoftPromptModelForCausalLM",
    "SoftPromptModelForFeatureExtraction",
    "SoftPromptModelForSeq2SeqLM",
    "SoftPromptModelForSequenceClassification",
    "SoftPromptModelForTokenClassification",
]
