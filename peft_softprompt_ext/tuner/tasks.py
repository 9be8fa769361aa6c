"""PEFT's task classes with a soft prompt: each says which outputs are per position and what its labels index;
the strategies do the rest (the base model computes every loss, on labels placed for the prompted sequence)."""

from __future__ import annotations

from peft import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

from .batch import LabelLayout
from .model import SoftPromptModel


class SoftPromptModelForCausalLM(SoftPromptModel, PeftModelForCausalLM):
    """Causal LM: logits have the input's length; labels cover the user's tokens only."""

    token_level_keys = ("logits", "hidden_states")
    # what a fused LM head returns instead of logits (TRL's, which needs labels): one entry per next-token pair
    shifted_token_keys = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
    label_layout = LabelLayout.NEXT_TOKEN


class SoftPromptModelForSequenceClassification(SoftPromptModel, PeftModelForSequenceClassification):
    """Sequence classification: the head is trained and saved with the prompt (PEFT's modules_to_save)."""

    token_level_keys = ("hidden_states",)
    label_layout = LabelLayout.PER_SEQUENCE


class SoftPromptModelForTokenClassification(SoftPromptModel, PeftModelForTokenClassification):
    """Token classification: one logit row per input token."""

    token_level_keys = ("logits", "hidden_states")
    label_layout = LabelLayout.PER_TOKEN


class SoftPromptModelForFeatureExtraction(SoftPromptModel, PeftModelForFeatureExtraction):
    """Feature extraction: hidden states per input token."""


class SoftPromptModelForSeq2SeqLM(SoftPromptModel, PeftModelForSeq2SeqLM):
    """Seq2seq: the prompt goes before the encoder input; the decoder and its labels are untouched."""

    token_level_keys = ("encoder_last_hidden_state", "encoder_hidden_states")
    label_layout = LabelLayout.PER_SEQUENCE  # decoder labels: not aligned with the (prompted) encoder input


TASK_CLASSES: dict[type, type] = {
    PeftModel: SoftPromptModel,
    PeftModelForCausalLM: SoftPromptModelForCausalLM,
    PeftModelForSequenceClassification: SoftPromptModelForSequenceClassification,
    PeftModelForTokenClassification: SoftPromptModelForTokenClassification,
    PeftModelForFeatureExtraction: SoftPromptModelForFeatureExtraction,
    PeftModelForSeq2SeqLM: SoftPromptModelForSeq2SeqLM,
}
