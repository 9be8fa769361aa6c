"""save_pretrained / from_pretrained (in a fresh process), resuming training, several adapters, bad adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tiny
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_softprompt_ext import SoftPromptConfig, SoftPromptModelForCausalLM

P = 4
TESTS = os.path.dirname(__file__)


def trained(arch: str = "llama", steps: int = 3, **kw):
    model = get_peft_model(tiny.causal_lm(arch), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw))
    tiny.train_steps(model, steps)
    return model


def run_fresh(code: str) -> str:
    """Run code in a new interpreter (nothing shared with this process but files)."""
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_save_writes_config_and_safetensors_only(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SOFT_PROMPT" and config["num_virtual_tokens"] == P
    assert config["vocab_size"] == tiny.VOCAB and config["token_dim"] == 32
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert list(state) == ["prompt_embeddings"]
    torch.testing.assert_close(state["prompt_embeddings"], model.prompt_embeddings().detach())


def test_save_never_runs_a_forward(tmp_path):
    model = trained()
    model.train()  # PEFT's own save runs the prompt encoder's forward in training mode

    def refuse(*_):
        raise AssertionError("save ran a forward")

    handles = [m.register_forward_pre_hook(refuse) for m in model.modules()]
    model.save_pretrained(tmp_path)
    for handle in handles:
        handle.remove()
    assert (tmp_path / "adapter_model.safetensors").exists()


def from_saved_base(model, path):
    """Reload the base from disk so the adapter config records a real base_model_name_or_path."""
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


def test_reload_in_fresh_process_gives_the_same_prompt_and_logits(tmp_path):
    model = get_peft_model(
        from_saved_base(tiny.causal_lm("llama"), tmp_path / "base"),
        SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, init="random"),
    ).eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = tiny.random_ids(2, 5)
    with torch.no_grad():  # as the reloaded, frozen adapter runs: same kernels (autograd can pick others)
        logits = model(input_ids=ids).logits
    expected = {"ids": ids, "logits": logits, "prompt": model.prompt_embeddings().detach()}
    torch.save(expected, tmp_path / "expected.pt")
    run_fresh(f"""
        import torch, peft_softprompt_ext
        from peft import PeftModel, AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        for model in (PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}),
                      AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r})):
            assert type(model).__name__ == "SoftPromptModelForCausalLM", type(model)
            assert not any(p.requires_grad for p in model.parameters())
            assert torch.equal(model.prompt_embeddings(), expected["prompt"])  # the saved prompt, bit for bit
            # another process may pick other CPU kernels (thread split, ISA): equal up to float rounding
            logits = model.eval()(input_ids=expected["ids"]).logits
            torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)
        print("ok")
    """)


def test_auto_sequence_classification_reload_keeps_the_head(tmp_path):
    cls, make_config = tiny.SEQ_CLS["llama"]
    base = from_saved_base(tiny.build(cls, make_config, num_labels=3), tmp_path / "base")
    model = get_peft_model(base, SoftPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5)  # the head and prompt differ from the base's
    model.save_pretrained(tmp_path / "adapter")
    assert any("score" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    ids = tiny.random_ids(2, 5)
    torch.save({"ids": ids, "logits": model.eval()(input_ids=ids).logits.detach()}, tmp_path / "expected.pt")
    run_fresh(f"""
        import torch, peft_softprompt_ext
        from peft import AutoPeftModelForSequenceClassification
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoPeftModelForSequenceClassification.from_pretrained({str(tmp_path / "adapter")!r})
        assert type(model).__name__ == "SoftPromptModelForSequenceClassification", type(model)
        torch.testing.assert_close(model.eval()(input_ids=expected["ids"]).logits, expected["logits"])
        print("ok")
    """)


def test_from_pretrained_is_trainable_resumes_training(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path, is_trainable=True)
    assert isinstance(resumed, SoftPromptModelForCausalLM)
    weight = resumed.prompt_encoder["default"].embedding.weight
    assert weight.requires_grad and not resumed.peft_config["default"].inference_mode
    torch.testing.assert_close(weight.detach(), model.prompt_embeddings().detach())
    optimizer = torch.optim.AdamW([weight], lr=0.05)
    ids = tiny.random_ids(4, 6)
    resumed.train()
    first = resumed(input_ids=ids, labels=ids).loss
    first.backward()
    optimizer.step()
    assert resumed(input_ids=ids, labels=ids).loss < first


def test_several_adapters_set_delete_disable(tmp_path):
    model = trained()
    other = trained(steps=6, init_seed=5)
    other.save_pretrained(tmp_path / "other")
    ids = tiny.random_ids(2, 5)
    default_logits = model(input_ids=ids).logits

    model.load_adapter(str(tmp_path / "other"), adapter_name="other")
    model.add_adapter("fresh", SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert set(model.peft_config) == {"default", "other", "fresh"}
    model.set_adapter("other")
    torch.testing.assert_close(model(input_ids=ids).logits, other(input_ids=ids).logits)
    model.set_adapter("fresh")
    assert model(input_ids=ids).logits.shape == (2, 5, tiny.VOCAB)
    model.set_adapter("default")
    torch.testing.assert_close(model(input_ids=ids).logits, default_logits)

    with model.disable_adapter():
        bare = model(input_ids=ids).logits
        bare_generation = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    base = model.get_base_model()
    torch.testing.assert_close(bare, base(input_ids=ids).logits)
    assert torch.equal(bare_generation, base.generate(input_ids=ids, max_new_tokens=3, do_sample=False))

    model.delete_adapter("other")
    assert "other" not in model.peft_config and "other" not in model.prompt_encoder
    torch.testing.assert_close(model(input_ids=ids).logits, default_logits)


def test_loading_into_other_hidden_size_or_vocab_is_an_error(tmp_path):
    trained().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="token_dim=32; this model has 48"):
        PeftModel.from_pretrained(tiny.causal_lm("llama", hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match=f"vocab_size={tiny.VOCAB}; this model's embedding table has 80 rows"):
        PeftModel.from_pretrained(tiny.causal_lm("llama", vocab_size=80), tmp_path)


def test_adapter_dir_without_safetensors_never_loads_pickle(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    marker = tmp_path / "unpickled"
    torch.save(state, tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="a pickle, which is never loaded"):
        PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path)
    assert not marker.exists()


def test_trust_remote_code_in_saved_config_is_ignored(tmp_path):
    trained().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_kwargs"] = {"trust_remote_code": True}
    path.write_text(json.dumps(config))
    model = PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path)
    assert model.peft_config["default"].tokenizer_kwargs == {}


def test_saved_prompt_shape_mismatch_is_an_error(tmp_path):
    trained().save_pretrained(tmp_path)
    save_file({"prompt_embeddings": torch.zeros(P + 1, 32)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"shape \(5, 32\).*\(4, 32\)"):
        PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path)


def test_text_init_with_in_memory_tokenizer_reloads(tmp_path, tokenizer):
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, init="text", init_text="w5 w6", tokenizer=tokenizer
    )
    model = get_peft_model(tiny.causal_lm("llama"), config)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path)
    torch.testing.assert_close(reloaded.prompt_embeddings(), model.prompt_embeddings())
