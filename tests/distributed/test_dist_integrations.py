"""Single-process checks of peft_softprompt_ext.trainer and .distributed (fast; the multi-process ones are
test_dist_*; crash-safety of saves is in tests/test_reliability.py)."""

from __future__ import annotations

import pytest
import tiny
import torch
from peft import get_peft_model

from peft_softprompt_ext import SoftPromptConfig
from peft_softprompt_ext.distributed import local_weight, parameters_are_sharded
from peft_softprompt_ext.trainer import (
    DecodedPromptCallback,
    decoded_prompt_tokens,
    gather_prompt_weight,
    unwrap_soft_prompt_model,
)


def _model(seed: int = 0):
    return get_peft_model(
        tiny.causal_lm("llama", seed=seed), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )


def test_plain_model_reads_prompt_locally_and_is_not_sharded():
    model = _model()
    weight = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(local_weight(model.prompt_encoder["default"].embedding), weight)
    assert torch.equal(gather_prompt_weight(model), weight)
    assert not parameters_are_sharded(model)
    assert unwrap_soft_prompt_model(model) is model


def test_decoded_prompt_of_a_text_initialised_prompt_is_that_text(tokenizer):
    base = tiny.causal_lm("llama", seed=0)
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, init="text", init_text="w10 w11 w12", tokenizer=tokenizer
    )
    decoded = decoded_prompt_tokens(get_peft_model(base, config), tokenizer)
    assert decoded["tokens"] == ["w10", "w11", "w12"] and decoded["text"] == "w10 w11 w12"


def test_callback_rejects_bad_interval():
    with pytest.raises(ValueError, match="every_n_steps"):
        DecodedPromptCallback(every_n_steps=0)
