"""Single-process checks of peft_softprompt_ext.integrations (fast; the multi-process ones are test_dist_*)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import tiny
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_softprompt_ext import SoftPromptConfig
from peft_softprompt_ext.integrations import (
    DecodedPromptCallback,
    atomic_save_pretrained,
    decoded_prompt_tokens,
    gather_prompt_weight,
    local_adapter_state_dict,
    local_prompt_weight,
    parameters_are_sharded,
    unwrap_soft_prompt_model,
)


def _model(seed: int = 0):
    return get_peft_model(
        tiny.causal_lm("llama", seed=seed), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )


def test_plain_model_reads_prompt_locally_and_is_not_sharded():
    model = _model()
    weight = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(local_prompt_weight(model.prompt_encoder["default"].embedding), weight)
    assert torch.equal(gather_prompt_weight(model), weight)
    assert not parameters_are_sharded(model)
    assert local_adapter_state_dict(model) is None  # no FSDP: PEFT's own path
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


def test_atomic_save_replaces_a_previous_adapter(tmp_path):
    target = tmp_path / "adapter"
    first, second = _model(0), _model(1)
    atomic_save_pretrained(first, target)
    with torch.no_grad():
        second.prompt_encoder["default"].embedding.weight.add_(1.0)
    atomic_save_pretrained(second, target)
    saved = load_file(target / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(saved, second.prompt_encoder["default"].embedding.weight.detach())
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging or backup left behind


CRASH = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch, tiny
    from peft import get_peft_model
    from peft_softprompt_ext import SoftPromptConfig, atomic
    from peft_softprompt_ext.integrations import atomic_save_pretrained

    def die_mid_write(staging):
        weights = os.path.join(staging, "adapter_model.safetensors")
        with open(weights, "r+b") as f:  # the new file is half written when the process dies
            f.truncate(os.path.getsize(weights) // 2)
        os._exit(1)

    atomic._fsync_tree = die_mid_write  # fault injection in our own code: death before the swap
    model = get_peft_model(tiny.causal_lm("llama", seed=1), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    atomic_save_pretrained(model, {target!r})
    """
)


def test_crash_mid_save_leaves_the_previous_adapter_loadable(tmp_path):
    target = tmp_path / "adapter"
    previous = _model(0)
    atomic_save_pretrained(previous, target)
    before = load_file(target / "adapter_model.safetensors")["prompt_embeddings"]
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = CRASH.format(tests=tests, target=str(target))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    reloaded = PeftModel.from_pretrained(tiny.causal_lm("llama", seed=0), str(target))
    assert torch.equal(reloaded.prompt_encoder["default"].embedding.weight.detach(), before)
    # the next save cleans up the dead staging directory and succeeds
    atomic_save_pretrained(_model(2), target)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
