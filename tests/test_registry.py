"""Registration with PEFT: our type, our classes through PEFT's entry points, and PEFT's own methods untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tiny
from peft import PeftModel, PeftModelForCausalLM, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from peft_softprompt_ext import SoftPromptConfig, SoftPromptModelForCausalLM, _peft_patch
from peft_softprompt_ext.constants import AUTOLOAD_ENV


def test_import_registers_the_type():
    assert PeftType.SOFT_PROMPT.value == "SOFT_PROMPT"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SOFT_PROMPT"] is SoftPromptConfig
    assert SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2).peft_type is PeftType.SOFT_PROMPT
    _peft_patch.install(_peft_patch._wiring[0])  # idempotent
    assert list(PeftType).count(PeftType.SOFT_PROMPT) == 1


def test_get_peft_model_returns_our_subclass_of_peft_task_class(capsys):
    model = get_peft_model(tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    assert type(model) is SoftPromptModelForCausalLM
    assert isinstance(model, PeftModelForCausalLM) and isinstance(model, PeftModel)
    model.print_trainable_parameters()
    assert "trainable params: 160 " in capsys.readouterr().out  # 5 x 32, the prompt only
    direct = PeftModelForCausalLM(
        tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    assert type(direct) is SoftPromptModelForCausalLM


def test_saved_config_says_soft_prompt(tmp_path):
    get_peft_model(
        tiny.causal_lm("gpt2"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    ).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SOFT_PROMPT"


LORA_SCRIPT = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
if {import_us}:
    import peft_softprompt_ext
import tiny
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
lora = get_peft_model(tiny.causal_lm("llama"), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False))
ids = tiny.random_ids(2, 6)
out = lora(input_ids=ids, labels=ids)
out.loss.backward()
lora.save_pretrained({out_dir!r} + "/lora")
reloaded = PeftModel.from_pretrained(tiny.causal_lm("llama"), {out_dir!r} + "/lora")
pt = get_peft_model(tiny.causal_lm("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
digest = hashlib.sha256()
for t in (out.logits, out.loss, reloaded(input_ids=ids).logits, pt(input_ids=ids).logits):
    digest.update(t.detach().numpy().tobytes())
for n, p in sorted(lora.named_parameters()):
    if p.grad is not None:
        digest.update(n.encode()); digest.update(p.grad.numpy().tobytes())
print(type(lora).__name__, type(reloaded).__name__, type(pt).__name__, digest.hexdigest())
"""


def test_peft_own_methods_behave_exactly_as_before(tmp_path):
    """LoRA and PEFT's PromptTuning give bit-identical results with and without our import."""
    outputs = []
    for import_us in (False, True):
        script = LORA_SCRIPT.format(
            tests=os.path.dirname(__file__), import_us=import_us, out_dir=str(tmp_path / str(import_us))
        )
        env = {**os.environ, AUTOLOAD_ENV: "1" if import_us else "0"}  # without us: the start-up hook off too
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout.strip())
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith("PeftModelForCausalLM PeftModelForCausalLM PeftModelForCausalLM")


def test_missing_peft_internals_raise_a_clear_error(monkeypatch):
    monkeypatch.setattr(_peft_patch, "_REQUIRED_INTERNALS", _peft_patch._REQUIRED_INTERNALS + ("peft.no_such_mapping",))
    with pytest.raises(_peft_patch.PeftIncompatibleError, match=r"peft.no_such_mapping.*tested with peft"):
        _peft_patch.check_peft_version()


AUTOLOAD_SCRIPT = """
import json, sys
at_start = dict(peft="peft" in sys.modules, torch="torch" in sys.modules,
                hooked=any(type(f).__name__ == "PeftImportHook" for f in sys.meta_path))
import importlib.util
importlib.util.find_spec("peft")  # transformers' is_peft_available: must not import anything
after_find_spec = "peft" in sys.modules or "peft_softprompt_ext" in sys.modules
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig
registered = "SOFT_PROMPT" in PEFT_TYPE_TO_CONFIG_MAPPING
config = type(PeftConfig.from_pretrained({adapter!r})).__name__ if registered else None
print(json.dumps(dict(at_start=at_start, after_find_spec=after_find_spec, registered=registered, config=config)))
"""


@pytest.mark.parametrize("switch", ["on", "off"])
def test_installing_the_package_registers_the_type_when_peft_is_imported(tmp_path, switch):
    """The start-up hook (peft_softprompt_ext_autoload.pth): a fresh process that never imports us by name sees
    SOFT_PROMPT as soon as it imports peft; nothing heavy is imported at start-up; the environment switch works."""
    get_peft_model(
        tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    ).save_pretrained(tmp_path)
    env = {**os.environ, AUTOLOAD_ENV: "1" if switch == "on" else "0"}
    script = AUTOLOAD_SCRIPT.format(adapter=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["at_start"] == {"peft": False, "torch": False, "hooked": switch == "on"}
    assert seen["after_find_spec"] is False
    assert seen["registered"] is (switch == "on")
    assert seen["config"] == ("SoftPromptConfig" if switch == "on" else None)


def test_unknown_adapter_names_are_clear_errors():
    model = get_peft_model(tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"No soft-prompt adapter 'nope'; this model has \['default'\]"):
        model.set_requires_grad("nope")
    with pytest.raises(ValueError, match="No soft-prompt adapter 'nope'"):
        model.prompt_embeddings("nope")


def test_merge_and_unload_explains_there_is_nothing_to_merge():
    model = get_peft_model(tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    for method in (model.merge_and_unload, model.merge_adapter, model.unload):
        with pytest.raises(NotImplementedError, match="no weights to merge.*export_prompt_embeds"):
            method()
