"""The soft-prompt PeftModel: lifecycle (`model.py`), execution strategies (`strategies.py`), inputs and layouts
(`batch.py`) and the task classes (`tasks.py`)."""

from .model import SoftPromptModel, from_pretrained, is_soft_prompt_source, resuming_training
from .strategies import ExecutionPath
from .tasks import (
    TASK_CLASSES,
    SoftPromptModelForCausalLM,
    SoftPromptModelForFeatureExtraction,
    SoftPromptModelForSeq2SeqLM,
    SoftPromptModelForSequenceClassification,
    SoftPromptModelForTokenClassification,
)

__all__ = [
    "TASK_CLASSES",
    "ExecutionPath",
    "SoftPromptModel",
    "SoftPromptModelForCausalLM",
    "SoftPromptModelForFeatureExtraction",
    "SoftPromptModelForSeq2SeqLM",
    "SoftPromptModelForSequenceClassification",
    "SoftPromptModelForTokenClassification",
    "from_pretrained",
    "is_soft_prompt_source",
    "resuming_training",
]
